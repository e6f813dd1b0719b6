"""The model registry: which model version serves, loaded, verified and warmed off the
event loop and swapped in atomically. Requests in flight keep the slot they started with;
the old slot (its sessions and state cache) is freed when the last of them finishes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.engine.cost import CostModel, Warmup
from service.engine.slot import ModelSlot, Runtime
from service.engine.state_cache import StateCache
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

Loader = Callable[[str | None], tuple[Runtime, Warmup]]


class ModelNotReady(RuntimeError):
    """No model is loaded (yet, or the last load failed)."""

    retry_after_s = 5


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.slot: ModelSlot | None = None
        self.load_error: str | None = None
        self._lock = asyncio.Lock()

    def current(self) -> ModelSlot:
        """The slot serving now; ModelNotReady when there is none."""
        if self.slot is None:
            raise ModelNotReady(self.load_error or "model not loaded")
        return self.slot

    async def load(self, version: str | None) -> ModelSlot:
        """Load, verify and warm `version` off the event loop, then swap it in."""
        async with self._lock:
            runtime, warm = await asyncio.to_thread(self.loader, version)
            slot = ModelSlot(
                runtime=runtime,
                cache=StateCache(
                    self.settings.state_cache_size,
                    max_bytes=int(self.settings.state_cache_mb * 2**20),
                ),
                cost=CostModel.from_warmup(warm),
            )
            self.slot = slot
            self.load_error = None
            self.metrics.set_model(runtime.version, runtime.provider)
            log.info(
                "serving model %s on %s (%s)",
                runtime.version,
                runtime.provider,
                ",".join(runtime.providers),
            )
            return slot

    async def load_at_start(self, version: str) -> None:
        """The lifespan's load: a failure keeps the process up and not ready (/readyz and
        the log say why), so a bad artifact does not restart-loop every pod."""
        try:
            await self.load(version)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("no model loaded: %s", self.load_error)
