"""Ranking logic: admission, the user's state, scoring, ordering. No FastAPI here.

The degradation ladder (docs/design.md §6), in the order a request meets it:

    overloaded     in-flight >= IFA_MAX_INFLIGHT, or the inference queue wait alone
                   would exceed the budget: `Overloaded` (503 + Retry-After) at once
    warm / refresh / cold (partial_state) / Redis down (stale_state, no_history):
                   `state_resolver.StateResolver`
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ifa_common.records import make_events, pack
from ifa_common.state import UserState

from .inference import InferencePool, ModelSlot, Runtime
from .metrics import Metrics
from .settings import Settings
from .state_cache import StateCache, StateWriteBack
from .state_resolver import StateResolver, Timings
from .store import AppendResult, SequenceStore, StoreUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S: Final = 1


class Overloaded(RuntimeError):
    """More work than the service can start within the request's budget."""

    retry_after_s = RETRY_AFTER_S


class ModelNotReady(RuntimeError):
    retry_after_s = 5


@dataclass(slots=True)
class RankResult:
    user_id: str
    request_id: str
    model_version: str
    item_ids: list[int]
    scores: list[float]
    degraded: str | None
    timings: Timings

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "request_id": self.request_id,
            "model_version": self.model_version,
            "items": [
                {"item_id": i, "score": s} for i, s in zip(self.item_ids, self.scores, strict=True)
            ],
            "degraded": self.degraded,
            "timings_ms": self.timings.as_dict(),
        }


@dataclass
class Ranker:
    settings: Settings
    store: SequenceStore
    metrics: Metrics
    pool: InferencePool
    writeback: StateWriteBack
    loader: Callable[[str | None], tuple[Runtime, dict[str, float]]]
    slot: ModelSlot | None = None
    load_error: str | None = None
    inflight: int = 0
    states: StateResolver = field(init=False)
    _reload_lock: asyncio.Lock = field(init=False)

    def __post_init__(self) -> None:
        self.states = StateResolver(
            self.settings, self.store, self.metrics, self.pool, self.writeback
        )
        self._reload_lock = asyncio.Lock()

    # ------------------------------------------------------------------ model
    async def load(self, version: str | None) -> ModelSlot:
        """Load, verify and warm `version` off the event loop, then swap it in atomically.

        Requests in flight keep the slot they started with; the old slot (its sessions
        and state cache) is freed when the last of them finishes.
        """
        async with self._reload_lock:
            runtime, warm = await asyncio.to_thread(self.loader, version)
            slot = ModelSlot(runtime=runtime, cache=StateCache(self.settings.state_cache_size))
            slot.warmup_ms = warm
            slot.calibrate(self.settings.warmup_counts())
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

    # ------------------------------------------------------------------ /rank
    async def rank(
        self,
        user_id: str,
        candidates: Sequence[int],
        top_k: int | None = None,
        budget_ms: float | None = None,
        request_id: str | None = None,
    ) -> RankResult:
        t0 = time.perf_counter()
        slot = self.slot
        if slot is None:
            raise ModelNotReady(self.load_error or "model not loaded")
        budget = float(budget_ms or self.settings.default_budget_ms)
        deadline = t0 + budget / 1000.0
        if self.inflight >= self.settings.max_inflight or self.pool.expected_wait_ms() > budget:
            self.metrics.degraded.labels("overloaded").inc()
            raise Overloaded("overloaded: retry later")
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            return await self._rank(slot, user_id, candidates, top_k, deadline, request_id, t0)
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()

    async def _rank(
        self,
        slot: ModelSlot,
        user_id: str,
        candidates: Sequence[int],
        top_k: int | None,
        deadline: float,
        request_id: str | None,
        t0: float,
    ) -> RankResult:
        tm = Timings()
        items = np.asarray(candidates, dtype=np.int64)
        m = items.shape[0]
        self.metrics.candidates.observe(m)
        k = m if top_k is None else min(int(top_k), m)
        state, degraded = await self.states.resolve(slot, user_id, deadline, m, tm)
        order, probs = await self._score(slot, state, items, k, tm)
        self.metrics.stage_duration.labels("score").observe(tm.score / 1e3)
        self.metrics.stage_duration.labels("redis").observe(tm.redis / 1e3)
        self.metrics.stage_duration.labels("state").observe(tm.state / 1e3)
        if degraded is not None:
            self.metrics.degraded.labels(degraded).inc()
        tm.total = (time.perf_counter() - t0) * 1e3
        return RankResult(
            user_id=user_id,
            request_id=request_id or uuid.uuid4().hex,
            model_version=slot.version,
            item_ids=items[order].tolist(),
            scores=probs.tolist(),
            degraded=degraded,
            timings=tm,
        )

    async def _score(
        self, slot: ModelSlot, state: UserState, items: np.ndarray, k: int, tm: Timings
    ) -> tuple[np.ndarray, np.ndarray]:
        t = time.perf_counter()
        if slot.estimate_score_ms(items.shape[0]) < self.settings.inline_score_ms:
            # Sub-millisecond work: the hops to the pool and back (a GIL handoff each way)
            # cost more than the scorer itself on 2 cores: p50 2.4 ms inline vs 4.1 ms on
            # the pool at M = 500 (docs/performance.md). Builds always go to the pool.
            out = _score_and_order(slot.runtime, state, items, k)
        else:
            out = await self.pool.run(_score_and_order, slot.runtime, state, items, k)
        tm.score += (time.perf_counter() - t) * 1e3
        return out

    # ------------------------------------------------------------------ state ladder
    async def drain(self, timeout_s: float) -> None:
        """Let background state builds finish (bounded), then cancel what is left."""
        await self.states.drain(timeout_s)

    # ------------------------------------------------------------------ /events
    async def append_events(
        self,
        user_id: str,
        item_id: Sequence[int],
        ts: Sequence[int],
        category: Sequence[int],
        action: Sequence[int],
        idempotency_key: str | None,
    ) -> AppendResult:
        records = pack(make_events(list(item_id), list(ts), list(category), list(action)))
        result = await self.store.append(user_id, records, idempotency_key)
        if not result.replayed:
            self.metrics.events_appended.inc(result.appended)
        return result

    # ------------------------------------------------------------------ readiness
    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        info: dict[str, Any] = {"model_version": self.slot.version if self.slot else None}
        reasons = []
        if self.slot is None:
            reasons.append(f"model: {self.load_error or 'not loaded'}")
        try:
            await self.store.ping()
            info["redis"] = "ok"
        except StoreUnavailable as e:
            info["redis"] = "unreachable"
            reasons.append(f"redis: {e}")
        if reasons:
            info["reason"] = "; ".join(reasons)
        return not reasons, info


def _score_and_order(
    rt: Runtime, state: UserState, items: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (sigmoid of the logits), best first, ties in request order; top k."""
    logits = np.asarray(rt.score(state, items), dtype=np.float64)
    probs = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow
    order = np.argsort(-probs, kind="stable")[:k]
    return order, probs[order]
