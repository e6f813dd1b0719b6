"""The rank use case: admission, the user's state, scoring, ordering. No FastAPI here.

The degradation ladder (docs/design.md §6), in the order a request meets it:

    overloaded     in-flight >= IFA_MAX_INFLIGHT, or the time already waited since the
                   request arrived (the `queue` stage: event loop, body) plus the
                   inference queue's wait is at least IFA_SHED_MIN_WAIT_MS and, with what
                   the answer still costs (the scorer as it runs now and the work around
                   it, both observed), past the budget: `Overloaded` (503 + Retry-After)
                   at once; and the same check again when its turn to start comes
                   (engine/turnstile.py, IFA_STARTS_PER_ITERATION), with the wait for
                   the requests admitted before it. (A budget too small for the work
                   but not spent waiting is the ladder's to degrade, not a reason to
                   shed.) Also a user with no cached state whose Redis read cannot come
                   back within the budget (`NoTimeForRedis`: on a saturated loop the
                   reply waits as long as the request did before admission).
    warm / refresh / cold (partial_state) / Redis down (stale_state, no_history):
                   `engine.state_resolver.StateResolver`
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from ifa_common.state import UserState
from service.engine.batcher import ScoreBatcher
from service.engine.context import RankContext, Timings
from service.engine.pool import InferencePool
from service.engine.registry import ModelRegistry
from service.engine.slot import ModelSlot
from service.engine.state_resolver import NoTimeForRedis, StateResolver
from service.engine.turnstile import Turnstile
from service.metrics import Metrics
from service.settings import Settings

RETRY_AFTER_S: Final = 1
# Past this share of requests shed (at admission or at their turn) the turnstile is
# passed by (`_gate`); the share is a moving average, each decision weighing SHARE_EWMA.
OVERLOAD_SHARE: Final = 0.5
SHARE_EWMA: Final = 0.02


class Overloaded(RuntimeError):
    """More work than the service can start within the request's budget."""

    retry_after_s = RETRY_AFTER_S

    def __init__(self, message: str, version: str | None = None) -> None:
        super().__init__(message)
        self.version = version  # of the slot the request would have used


@dataclass(slots=True)
class RankResult:
    user_id: str
    request_id: str
    model_version: str
    item_ids: np.ndarray  # int64, best first (the answer; the impression log stores them)
    scores: np.ndarray  # their probabilities, the same order
    degraded: str | None
    context: RankContext  # what Metrics.observe_rank records once the answer is serialised

    @property
    def timings(self) -> Timings:
        return self.context.timings


class RankUseCase:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        pool: InferencePool,
        registry: ModelRegistry,
        states: StateResolver,
        batcher: ScoreBatcher,
        turnstile: Turnstile | None = None,
    ) -> None:
        self.settings = settings
        self.turnstile = turnstile
        self._shed_share = 0.0  # moving share of requests shed (`_admit`)
        self.metrics = metrics
        self.pool = pool
        self.registry = registry
        self.states = states
        self.batcher = batcher
        self.inflight = 0

    async def rank(
        self,
        user_id: str,
        candidates: Sequence[int] | np.ndarray,
        top_k: int | None = None,
        budget_ms: float | None = None,
        request_id: str | None = None,
        arrived: float | None = None,
    ) -> RankResult:
        """`arrived`: perf_counter() when the request came in (None: now); the budget
        runs from there."""
        now = time.perf_counter()
        t0 = now if arrived is None else min(arrived, now)
        slot = self.registry.for_user(user_id)
        budget = float(budget_ms or self.settings.default_budget_ms)
        deadline = t0 + budget / 1000.0
        gate = self._gate()
        self._admit(slot, len(candidates), budget, (now - t0) * 1e3)
        self.inflight += 1
        self.metrics.inflight_now.inc()
        try:
            queued_ms = (now - t0) * 1e3
            if gate is not None:
                await gate.enter()
                # its wait for the turn is known now: a request it made late is shed
                queued_ms = (time.perf_counter() - t0) * 1e3
                self._admit(slot, len(candidates), budget, queued_ms, started=True)
            ctx = RankContext(slot, user_id, deadline, candidates=len(candidates))
            ctx.timings.queue = queued_ms
            return await self._rank(ctx, candidates, top_k, request_id, t0)
        except NoTimeForRedis as e:
            self.metrics.degraded.labels("overloaded", slot.version).inc()
            raise Overloaded(f"overloaded: {e}; retry later", slot.version) from None
        finally:
            self.inflight -= 1
            self.metrics.inflight_now.dec()

    def _gate(self) -> Turnstile | None:
        """The turnstile, unless most requests are being shed: under that much overload
        its order costs more than it gives (each request admitted behind it waits for the
        sheds of the ones read with it), and every request read in one poll runs back to
        back, the first ones answered, the rest shed."""
        return self.turnstile if self._shed_share < OVERLOAD_SHARE else None

    def _admit(
        self,
        slot: ModelSlot,
        candidates: int,
        budget: float,
        queued_ms: float,
        started: bool = False,
    ) -> None:
        """Raises Overloaded when the request cannot start (`started`: it is counted in
        flight already and this is the check at its turn), or cannot finish in budget
        after the `queued_ms` it has waited."""
        wait_ms = queued_ms + self.pool.expected_wait_ms()
        late = (
            wait_ms >= self.settings.shed_min_wait_ms
            and wait_ms + slot.cost.rest_ms_now(candidates) > budget
        )
        shed = late or (not started and self.inflight >= self.settings.max_inflight)
        if shed or not started:  # admitted counts 0, a shed 1 (at admission or at its turn)
            self._shed_share += SHARE_EWMA * (float(shed) - self._shed_share)
        if shed:
            self.metrics.degraded.labels("overloaded", slot.version).inc()
            raise Overloaded(
                f"overloaded: {wait_ms:.0f} ms waited or queued against a budget of "
                f"{budget:.0f} ms; retry later",
                slot.version,
            )

    def answered(self, ctx: RankContext) -> None:
        """The answer of `ctx` is sent: what it took around its stages (its send
        included) is what admission plans for the next ones."""
        ctx.slot.cost.observe_around(ctx.around_ms())

    async def _rank(
        self,
        ctx: RankContext,
        candidates: Sequence[int] | np.ndarray,
        top_k: int | None,
        request_id: str | None,
        t0: float,
    ) -> RankResult:
        slot = ctx.slot
        items = np.asarray(candidates, dtype=np.int64)
        k = ctx.candidates if top_k is None else min(int(top_k), ctx.candidates)
        state = await self.states.resolve(ctx)
        order, probs = await self._score(slot, state, items, k, ctx.timings)
        tm = ctx.timings
        tm.total = (time.perf_counter() - t0) * 1e3
        return RankResult(
            user_id=ctx.user,
            request_id=request_id or uuid.uuid4().hex,
            model_version=slot.version,
            item_ids=items[order],
            scores=probs,
            degraded=ctx.degraded,
            context=ctx,
        )

    async def _score(
        self, slot: ModelSlot, state: UserState, items: np.ndarray, k: int, tm: Timings
    ) -> tuple[np.ndarray, np.ndarray]:
        t = time.perf_counter()
        cost_ms = slot.cost.score_ms(items.shape[0])
        alone = self.inflight <= 1
        logits = await self.batcher.score(slot.runtime, state, items, cost_ms, alone)
        out = order_scores(logits, k)
        took = (time.perf_counter() - t) * 1e3
        tm.score += took
        if cost_ms < self.batcher.inline_ms:  # no queue in it: the scorer's own time
            slot.cost.observe_score(items.shape[0], took)
        return out


def order_scores(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (sigmoid of the logits), best first, ties in request order; top k."""
    x = np.asarray(logits, dtype=np.float64)
    probs = 0.5 * (1.0 + np.tanh(0.5 * x))  # sigmoid without overflow
    order = np.argsort(-probs, kind="stable")[:k]
    return order, probs[order]
