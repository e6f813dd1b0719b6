"""Shadow scoring: a sample of answered /rank requests scored again by the rollout's
shadow version, off the request path. The scores go to the impression log (type
`shadow`) and never to a client; the shadow resolves its user states like any request
(its own cache, its own `ifa:state:{u}:<version>` keys), so its latency and cache warm up
as they would if it served. Bounded: at most `max_inflight` at once, the rest skipped
(counted), so a slow shadow cannot take the stable version's CPU or memory with it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.engine.batcher import ScoreBatcher
from service.engine.context import RankContext
from service.engine.registry import ModelRegistry
from service.engine.slot import ModelSlot
from service.engine.state_resolver import StateResolver
from service.metrics import Metrics
from service.store.impressions import ImpressionLog, sampled
from service.usecases.rank import order_scores

log = logging.getLogger(__name__)


class ShadowScorer:
    def __init__(
        self,
        registry: ModelRegistry,
        states: StateResolver,
        batcher: ScoreBatcher,
        metrics: Metrics,
        impressions: ImpressionLog | None,
        budget_ms: float,
        max_inflight: int = 4,
    ) -> None:
        self.registry = registry
        self.states = states
        self.batcher = batcher
        self.metrics = metrics
        self.impressions = impressions
        self.budget_ms = budget_ms
        self.max_inflight = max_inflight
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    def offer(self, request_id: str, user: str, candidates: Sequence[int] | np.ndarray) -> None:
        """After an answer: score it with the shadow too when one is set and the request
        id is in its sample (a stable hash: a retried request is sampled alike)."""
        ro = self.registry.rollout
        if ro is None or ro.shadow is None or not sampled(request_id, ro.shadow_rate):
            return
        if len(self._tasks) >= self.max_inflight:
            self.metrics.shadow.labels("skipped").inc()
            return
        items = np.asarray(candidates, dtype=np.int64)
        task = asyncio.get_running_loop().create_task(
            self._score(ro.shadow, request_id, user, items), name=f"shadow:{request_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(self, slot: ModelSlot, request_id: str, user: str, items: np.ndarray) -> None:
        try:
            deadline = time.perf_counter() + self.budget_ms / 1e3
            ctx = RankContext(slot, user, deadline, candidates=int(items.shape[0]))
            state = await self.states.resolve(ctx)
            cost = slot.cost.score_ms(items.shape[0])
            logits = await self.batcher.score(slot.runtime, state, items, cost, False)
            order, probs = order_scores(logits, int(items.shape[0]))
            if self.impressions is not None:
                self.impressions.offer_impression(
                    request_id, user, slot.version, ctx.degraded, items[order], probs, "shadow"
                )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the shadow never fails anything but itself
            log.warning("shadow scoring of %s with %s failed: %s", request_id, slot.version, e)
            self.metrics.shadow.labels("failed").inc()
            return
        self.metrics.shadow.labels("scored").inc()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
