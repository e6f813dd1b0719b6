"""The admin use cases: readiness, the model being served, and a reload."""

from __future__ import annotations

from typing import Any

from service.engine.registry import ModelRegistry
from service.engine.slot import ModelSlot
from service.store.redis_store import SequenceStore, StoreUnavailable


class AdminUseCase:
    def __init__(self, registry: ModelRegistry, store: SequenceStore) -> None:
        self.registry = registry
        self.store = store

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
        """(the new slot, the previous version): load, verify, warm, swap."""
        previous = self.registry.slot.version if self.registry.slot is not None else None
        return await self.registry.load(version), previous
