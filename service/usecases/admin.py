"""The admin use cases: readiness, the model being served, and a reload (announced to the
sibling workers of one `ifa-rank serve --workers N`, which load the same version)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from service.engine.registry import ModelRegistry
from service.engine.slot import ModelSlot
from service.store.redis_store import SequenceStore, StoreUnavailable

log = logging.getLogger(__name__)


def control_channel(group: str) -> str:
    return f"ifa:control:{group}"


class AdminUseCase:
    def __init__(
        self, registry: ModelRegistry, store: SequenceStore, group: str | None = None
    ) -> None:
        self.registry = registry
        self.store = store
        self.group = group  # the workers of one serve process; None: a lone process
        self._follow: set[asyncio.Task[Any]] = set()

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): a model is loaded and warm, and Redis answers."""
        slot = self.registry.slot
        info: dict[str, Any] = {"model_version": slot.version if slot else None}
        reasons = []
        if slot is None:
            reasons.append(f"model: {self.registry.load_error or 'not loaded'}")
        try:
            await self.store.ping()
            info["redis"] = "ok"
        except StoreUnavailable as e:
            info["redis"] = "unreachable"
            reasons.append(f"redis: {e}")
        if reasons:
            info["reason"] = "; ".join(reasons)
        return not reasons, info

    def model(self) -> ModelSlot:
        """The slot serving now (ModelNotReady when none)."""
        return self.registry.current()

    async def reload(self, version: str | None) -> tuple[ModelSlot, str | None]:
        """(the new slot, the previous version): load, verify, warm, swap; then tell the
        sibling workers (they load it in the background)."""
        previous = self.registry.slot.version if self.registry.slot is not None else None
        slot = await self.registry.load(version)
        if self.group is not None:
            message = json.dumps({"reload": slot.version}).encode()
            try:
                await self.store.publish(control_channel(self.group), message)
            except StoreUnavailable as e:
                log.error("reload of %s not announced to the other workers: %s", slot.version, e)
        return slot, previous

    def on_control(self, payload: bytes) -> None:
        """A sibling worker reloaded: follow it unless this one already serves it."""
        try:
            version = str(json.loads(payload)["reload"])
        except (ValueError, KeyError, TypeError):
            log.warning("control message ignored: %r", payload[:200])
            return
        slot = self.registry.slot
        if slot is not None and slot.version == version:
            return
        task = asyncio.get_running_loop().create_task(self._follow_reload(version))
        self._follow.add(task)
        task.add_done_callback(self._follow.discard)

    async def _follow_reload(self, version: str) -> None:
        try:
            await self.registry.load(version)
        except Exception as e:  # the artifact was fine for the sibling: log loudly
            log.error("following a sibling's reload to %s failed: %s", version, e)
