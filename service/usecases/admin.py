"""The admin use cases: readiness, the model being served, a reload and a rollout (start,
promote, drop), each announced to the sibling workers of one `ifa-rank serve --workers N`,
which follow it (control messages: {"reload": v}, {"rollout": {...}}, {"promote": v},
{"drop": true})."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final

from service.engine.registry import ModelRegistry, Rollout
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
        await self._announce({"reload": slot.version})
        return slot, previous

    async def rollout(
        self, candidate: str | None, share: float, shadow: str | None, shadow_rate: float
    ) -> Rollout:
        ro = await self.registry.start_rollout(candidate, share, shadow, shadow_rate)
        await self._announce({"rollout": rollout_spec(ro)})
        return ro

    async def promote(self) -> tuple[ModelSlot, str | None]:
        """(the new stable slot, the previous stable version)."""
        previous = self.registry.slot.version if self.registry.slot is not None else None
        slot = await self.registry.promote()
        await self._announce({"promote": slot.version})
        return slot, previous

    async def drop(self) -> Rollout | None:
        ro = await self.registry.drop()
        await self._announce({"drop": True})
        return ro

    def rollout_status(self) -> dict[str, Any]:
        """The stable version and the rollout, as the admin API answers them."""
        slot, ro = self.registry.slot, self.registry.rollout
        spec = rollout_spec(ro) if ro is not None else rollout_spec(NO_ROLLOUT)
        return {"stable": slot.version if slot is not None else None, **spec}

    async def _announce(self, message: dict[str, Any]) -> None:
        if self.group is None:
            return
        try:
            await self.store.publish(control_channel(self.group), json.dumps(message).encode())
        except StoreUnavailable as e:
            log.error("%s not announced to the other workers: %s", message, e)

    def on_control(self, payload: bytes) -> None:
        """A sibling worker changed what it serves: follow it unless this one already
        serves the same (the announcing worker hears its own message too)."""
        try:
            message = json.loads(payload)
            follow = self._follower(message)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("control message ignored: %r", payload[:200])
            return
        if follow is None:
            return
        task = asyncio.get_running_loop().create_task(self._follow_change(follow, message))
        self._follow.add(task)
        task.add_done_callback(self._follow.discard)

    def _follower(self, message: dict[str, Any]) -> Any:
        """The coroutine that makes this worker serve what `message` says; None: it does."""
        reg, slot, ro = self.registry, self.registry.slot, self.registry.rollout
        if "reload" in message:
            version = str(message["reload"])
            return None if slot is not None and slot.version == version else reg.load(version)
        if "rollout" in message:
            spec = message["rollout"]
            want = (spec["candidate"], float(spec["share"]), spec["shadow"])
            want_rate = float(spec["shadow_rate"])
            if ro is not None and rollout_spec(ro) == {
                "candidate": want[0],
                "share": want[1],
                "shadow": want[2],
                "shadow_rate": want_rate,
            }:
                return None
            return reg.start_rollout(want[0], want[1], want[2], want_rate)
        if "promote" in message:
            version = str(message["promote"])
            if slot is not None and slot.version == version:
                return None
            if ro is not None and ro.candidate is not None and ro.candidate.version == version:
                return reg.promote()
            return self._reload_and_drop(version)  # joined mid-rollout: same end state
        if "drop" in message:
            return None if ro is None else reg.drop()
        raise KeyError("no known control key")

    async def _reload_and_drop(self, version: str) -> None:
        await self.registry.drop()
        await self.registry.load(version)

    async def _follow_change(self, change: Any, message: dict[str, Any]) -> None:
        try:
            await change
        except Exception as e:  # the artifact was fine for the sibling: log loudly
            log.error("following a sibling's %s failed: %s", message, e)


NO_ROLLOUT: Final = Rollout(None, 0.0, None, 0.0)


def rollout_spec(ro: Rollout) -> dict[str, Any]:
    """A rollout as the admin API and the control channel spell it."""
    return {
        "candidate": ro.candidate.version if ro.candidate is not None else None,
        "share": ro.share,
        "shadow": ro.shadow.version if ro.shadow is not None else None,
        "shadow_rate": ro.shadow_rate,
    }
