"""The degradation ladder as a unit: StateResolver with an in-memory store and a counting
runtime whose cost model the test sets. Each rung is reached by construction (a deadline
far ahead, or one already passed), never by racing a clock. The same ladder against a
real Redis and ONNX Runtime is tests/service/test_degradation.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from svc_helpers import registry_value

from ifa_common.records import make_events, pack
from ifa_common.state import UserState
from service.engine.batcher import ScoreBatcher
from service.engine.context import RankContext
from service.engine.cooldown import Cooldown
from service.engine.cost import CostModel, Warmup
from service.engine.freshness import Freshness
from service.engine.pool import InferencePool
from service.engine.registry import ModelRegistry
from service.engine.slot import ModelSlot
from service.engine.state_cache import StateCache, StateWriteBack
from service.engine.state_resolver import MIN_PARTIAL_EVENTS, NoTimeForRedis, StateResolver
from service.engine.turnstile import Turnstile
from service.metrics import Metrics
from service.settings import Settings
from service.store.redis_store import AppendResult, Snapshot, StoreUnavailable
from service.usecases.rank import Overloaded, RankUseCase

USER = "u1"
T0 = 1_700_000_000


class CountingRuntime:
    """A state is the count of events it covers (S = n): enough to see what was built."""

    version = "v1"
    provider = "CPUExecutionProvider"
    dims = (1, 1, 1)

    def __init__(self) -> None:
        self.providers = ["CPUExecutionProvider"]
        self.manifest: dict[str, Any] = {}
        self.built: list[int] = []  # sizes of the event chunks built

    def _state(self, n: int, t_ref: int) -> UserState:
        return UserState(
            S=np.full((1, 1, 1), n, np.float32),
            z=np.ones((1, 1), np.float32),
            m=np.zeros(1, np.float32),
            t_ref=t_ref,
            n=n,
        )

    def empty_state(self) -> UserState:
        return UserState.empty(1, 1, 1)

    def build_state(self, events: np.ndarray) -> UserState:
        self.built.append(int(events.shape[0]))
        return self._state(int(events.shape[0]), int(events["ts"].max()) if len(events) else 0)

    def fold(self, state: UserState, partial: UserState) -> UserState:
        return self._state(state.n + partial.n, max(state.t_ref, partial.t_ref))

    def score(self, state: UserState, items: np.ndarray) -> np.ndarray:
        return np.zeros(items.shape[0], np.float32)

    def score_batch(
        self, states: Sequence[UserState], items: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        return [self.score(s, x) for s, x in zip(states, items, strict=True)]

    def serialize_state(self, state: UserState) -> bytes:
        return str(state.n).encode()

    def deserialize_state(self, buf: bytes) -> UserState:
        return self._state(int(buf), 0)


class MemoryStore:
    """The SequenceStore protocol over a list of records; `down` makes every call fail."""

    def __init__(self, n_events: int) -> None:
        self.events = make_events(np.arange(n_events), T0 + np.arange(n_events))
        self.down = False
        self.slow = 0  # the next `slow` calls time out (a late reply, not a dead server)
        self.calls: list[str] = []
        self.ranges: list[tuple[int, int]] = []  # what read_range was asked for

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise StoreUnavailable("redis down")
        if self.slow > 0:
            self.slow -= 1
            raise StoreUnavailable("redis snapshot: TimeoutError", timed_out=True)

    async def snapshot(
        self, user: str, model_version: str, have_n: int | None, tail_cap: int
    ) -> Snapshot:
        self._call("snapshot")
        n = len(self.events)
        if have_n is None or have_n > n:
            return Snapshot(length=n, tail=b"", tail_from=None, state_blob=None)
        tail = pack(self.events[have_n : min(n, have_n + tail_cap)])
        return Snapshot(length=n, tail=tail, tail_from=have_n, state_blob=None)

    async def read_range(self, user: str, start: int, stop: int) -> np.ndarray:
        self._call("read_range")
        self.ranges.append((start, stop))
        return self.events[start:stop]

    async def append(self, user: str, records: bytes, idempotency_key: str | None) -> AppendResult:
        raise NotImplementedError

    async def write_states(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        self._call("write_states")

    async def length(self, user: str) -> int:
        return len(self.events)

    async def publish(self, channel: str, message: bytes) -> None:
        self._call("publish")

    async def ping(self) -> None:
        self._call("ping")

    def scope(self, user: str) -> str | None:
        return None


def ladder(
    n_events: int, ms_per_event: float = 1e-6, inline_events: int = 256
) -> tuple[StateResolver, ModelSlot, MemoryStore, CountingRuntime, Metrics]:
    settings = Settings(redis_url="redis://127.0.0.1:1", refresh_inline_events=inline_events)
    store, runtime, metrics = MemoryStore(n_events), CountingRuntime(), Metrics()
    resolver = StateResolver(
        settings, store, metrics, InferencePool(1), StateWriteBack(store, max_pending=10)
    )
    cost = CostModel(build_per_event_ms=ms_per_event)  # the cost model the ladder plans with
    slot = ModelSlot(runtime=runtime, cache=StateCache(10), cost=cost)
    return resolver, slot, store, runtime, metrics


def context(slot: ModelSlot, budget_s: float) -> RankContext:
    return RankContext(slot, USER, deadline=time.perf_counter() + budget_s, candidates=10)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return registry_value(metrics.registry, name, **labels)


def test_cold_user_with_time_to_spare_gets_the_whole_history() -> None:
    resolver, slot, _, _, _ = ladder(1000)
    ctx = context(slot, budget_s=60)
    state = asyncio.run(resolver.resolve(ctx))
    assert (state.n, ctx.degraded) == (1000, None)
    assert slot.cache.get(USER) is not None and slot.cache.get(USER).n == 1000  # type: ignore[union-attr]
    assert (ctx.cache_result, ctx.state_source, ctx.sequence_length) == ("miss", "build", 1000)


def test_warm_user_is_one_round_trip_and_no_build() -> None:
    resolver, slot, store, runtime, _ = ladder(500)

    async def twice() -> tuple[UserState, RankContext]:
        await resolver.resolve(context(slot, 60))
        store.calls.clear()
        runtime.built.clear()
        ctx = context(slot, 60)
        return await resolver.resolve(ctx), ctx

    state, ctx = asyncio.run(twice())
    assert (state.n, ctx.degraded) == (500, None)
    assert store.calls == ["snapshot"] and runtime.built == []
    assert (ctx.cache_result, ctx.state_source) == ("hit", "local")


def test_a_state_built_while_this_request_read_redis_is_used_not_rebuilt() -> None:
    """A cold user's second request whose snapshot answers after the first request's build
    finished finds no build in flight: it must take the state that build cached."""
    resolver, slot, store, runtime, _ = ladder(800)
    first_done = asyncio.Event()
    real_snapshot = store.snapshot

    async def late_snapshot(*args: Any) -> Snapshot:
        snap = await real_snapshot(*args)
        await first_done.wait()  # answered only once the other request has its state
        return snap

    async def run() -> tuple[UserState, RankContext]:
        late_ctx = context(slot, 60)
        store.snapshot = late_snapshot  # type: ignore[method-assign,assignment]
        late = asyncio.create_task(resolver.resolve(late_ctx))
        await asyncio.sleep(0)  # it has read the (empty) cache and is waiting on Redis
        store.snapshot = real_snapshot  # type: ignore[method-assign]
        await resolver.resolve(context(slot, 60))
        first_done.set()
        return await late, late_ctx

    state, ctx = asyncio.run(run())
    assert state.n == 800 and ctx.degraded is None
    assert runtime.built == [800]  # one build, not two
    assert (ctx.cache_result, ctx.state_source) == ("hit", "local")


def test_a_short_tail_is_folded_from_the_snapshot_alone() -> None:
    resolver, slot, store, runtime, _ = ladder(300)

    async def run() -> UserState:
        await resolver.resolve(context(slot, 60))
        store.events = make_events(np.arange(340), T0 + np.arange(340))  # 40 new events
        store.calls.clear()
        runtime.built.clear()
        return await resolver.resolve(context(slot, 60))

    state = asyncio.run(run())
    assert state.n == 340
    assert store.calls == ["snapshot"]  # no second round trip for the tail
    assert runtime.built == [40]


def test_a_build_that_cannot_fit_answers_partially_and_finishes_behind() -> None:
    # the plan says 1,000 events cost 10 s; the deadline has already passed
    resolver, slot, store, runtime, metrics = ladder(1000, ms_per_event=10.0)

    async def run() -> tuple[UserState, RankContext]:
        ctx = context(slot, budget_s=-1.0)
        state = await resolver.resolve(ctx)
        await resolver.drain(timeout_s=60)  # the full build, released after the answer
        return state, ctx

    state, ctx = asyncio.run(run())
    assert ctx.degraded == "partial_state"
    assert state.n == MIN_PARTIAL_EVENTS  # the most recent events, at the floor
    full = slot.cache.get(USER)
    assert full is not None and full.n == 1000  # the next request is warm
    assert counter(metrics, "ifa_background_builds_total", result="ok") == 1
    # The full build took over the recent events the answer built: each event read and
    # built once.
    assert store.ranges == [(1000 - MIN_PARTIAL_EVENTS, 1000), (0, 1000 - MIN_PARTIAL_EVENTS)]
    assert runtime.built == [MIN_PARTIAL_EVENTS, 1000 - MIN_PARTIAL_EVENTS]


def test_a_gap_below_the_partial_floor_is_built_whole_and_not_flagged() -> None:
    # 40 events behind, over the inline-tail cap, the deadline passed: the floor builds them
    resolver, slot, store, _, _ = ladder(300, ms_per_event=10.0, inline_events=0)

    async def run() -> tuple[UserState, RankContext]:
        await resolver.resolve(context(slot, 60))
        store.events = make_events(np.arange(340), T0 + np.arange(340))
        ctx = context(slot, budget_s=-1.0)
        state = await resolver.resolve(ctx)
        await resolver.drain(timeout_s=60)
        return state, ctx

    state, ctx = asyncio.run(run())
    assert (state.n, ctx.degraded, ctx.cache_result) == (340, None, "refresh")
    assert store.ranges[-1] == (300, 340)  # read once, by the answer; the build reused it
    full = slot.cache.get(USER)
    assert full is not None and full.n == 340


def test_one_call_records_an_answered_request() -> None:
    resolver, slot, _, _, _ = ladder(100)
    ctx = context(slot, 60)
    asyncio.run(resolver.resolve(ctx))
    ctx.timings.serialize = 0.5
    metrics = Metrics()
    metrics.observe_rank(ctx)
    assert counter(metrics, "ifa_state_cache_total", result="miss") == 1
    assert counter(metrics, "ifa_state_source_total", source="build") == 1
    assert counter(metrics, "ifa_sequence_length_sum") == 100
    assert counter(metrics, "ifa_rank_candidates_sum") == 10
    assert counter(metrics, "ifa_rank_stage_duration_seconds_count", stage="serialize") == 1
    assert counter(metrics, "ifa_rank_degraded_total", reason="partial_state") == 0


@pytest.mark.parametrize("cached", [True, False])
def test_redis_down_answers_from_the_cache_or_an_empty_history(cached: bool) -> None:
    resolver, slot, store, _, _ = ladder(200)

    async def run() -> tuple[UserState, RankContext, list[str]]:
        if cached:
            await resolver.resolve(context(slot, 60))
        store.down = True
        store.calls.clear()
        ctx = context(slot, 60)
        state = await resolver.resolve(ctx)
        again = context(slot, 60)
        await resolver.resolve(again)  # inside the cooldown: Redis is not called again
        return state, ctx, list(store.calls)

    state, ctx, calls = asyncio.run(run())
    if cached:
        assert (ctx.degraded, state.n) == ("stale_state", 200)
    else:
        assert (ctx.degraded, state.n) == ("no_history", 0)
    assert calls == ["snapshot"]


def test_a_late_reply_now_and_then_does_not_take_redis_for_down() -> None:
    resolver, slot, store, _, _ = ladder(200)

    async def run() -> list[str | None]:
        await resolver.resolve(context(slot, 60))
        reasons = []
        for slow in (1, 0, 1, 0, 2, 0):  # isolated timeouts between successes
            store.slow = slow
            for _ in range(max(slow, 1)):
                ctx = context(slot, 60)
                await resolver.resolve(ctx)
                reasons.append(ctx.degraded)
        return reasons

    # each timed-out request answers from the cache; the next one asks Redis again
    stale, whole = "stale_state", None
    assert asyncio.run(run()) == [stale, whole, stale, whole, stale, stale, whole]


def test_timeouts_in_a_row_trip_the_cooldown() -> None:
    resolver, slot, store, _, _ = ladder(200)

    async def run() -> list[str]:
        await resolver.resolve(context(slot, 60))
        store.slow = 100  # a hung server: every call times out
        store.calls.clear()
        for _ in range(10):
            await resolver.resolve(context(slot, 60))
        return list(store.calls)

    assert asyncio.run(run()) == ["snapshot"] * 3  # the third timeout trips it


def test_cooldown_trips_at_once_on_a_broken_connection() -> None:
    cooldown = Cooldown(cooldown_ms=60_000, timeouts_to_trip=3)
    cooldown.failed(StoreUnavailable("late", timed_out=True))
    cooldown.failed(StoreUnavailable("late", timed_out=True))
    cooldown.succeeded()
    cooldown.failed(StoreUnavailable("late", timed_out=True))
    assert not cooldown.blocked()  # never three in a row
    cooldown.failed(StoreUnavailable("connection refused"))
    assert cooldown.blocked()
    # per node: a failure of one node's users does not block another node's
    cooldown.reset()
    cooldown.failed(StoreUnavailable("refused", scope="10.0.0.1:7000"))
    assert cooldown.blocked("10.0.0.1:7000")
    assert not cooldown.blocked("10.0.0.2:7000")
    assert not cooldown.blocked()


def use_case(turnstile: Turnstile | None = None, **settings: Any) -> tuple[RankUseCase, Metrics]:
    resolver, slot, _, _, metrics = ladder(100)
    s = Settings(redis_url="redis://127.0.0.1:1", **settings)
    registry = ModelRegistry(s, metrics, loader=lambda _: (CountingRuntime(), Warmup()))
    registry.slot = slot
    batcher = ScoreBatcher(resolver.pool, max_delay_us=0, max_batch=8, inline_ms=1.0)
    uc = RankUseCase(s, metrics, resolver.pool, registry, resolver, batcher, turnstile)
    return uc, metrics


def test_a_request_that_waited_past_its_budget_is_shed_and_counted() -> None:
    uc, metrics = use_case(shed_min_wait_ms=10)
    late = time.perf_counter() - 0.050  # arrived 50 ms ago
    with pytest.raises(Overloaded, match=r"\d+ ms waited or queued against a budget of 40 ms"):
        asyncio.run(uc.rank(USER, [1, 2], budget_ms=40, arrived=late))
    assert counter(metrics, "ifa_rank_degraded_total", reason="overloaded") == 1
    assert uc.inflight == 0


def test_the_wait_counts_as_the_queue_stage_and_against_the_budget() -> None:
    uc, _ = use_case(shed_min_wait_ms=10)
    arrived = time.perf_counter() - 0.020  # waited 20 ms of a 1 s budget: admitted
    result = asyncio.run(uc.rank(USER, [1, 2], budget_ms=1000, arrived=arrived))
    assert result.timings.queue >= 20 and result.timings.total >= result.timings.queue
    assert result.context.deadline == pytest.approx(arrived + 1.0)


def test_admission_plans_for_the_work_around_the_scorer_too() -> None:
    """A request whose wait and scorer fit the budget but not the time its answer takes
    around the scorer (observed on earlier answers) is shed: admitted, it would answer
    late. The observation is what `answered` records once an answer is serialised."""
    uc, _ = use_case(shed_min_wait_ms=1)
    slot = uc.registry.slot
    assert slot is not None
    asyncio.run(uc.rank(USER, [1, 2], budget_ms=1000))  # the user's state built and cached
    # 20 ms to spare after the wait and the scorer: room for a slow box's loop start-up
    fits_scorer = time.perf_counter() - (100.0 - slot.cost.rest_ms_now(2) - 20.0) / 1e3
    assert asyncio.run(uc.rank(USER, [1, 2], budget_ms=100, arrived=fits_scorer)).item_ids.size
    for _ in range(200):
        slot.cost.observe_around(40.0)  # answers took 40 ms around their scorer
    fits_scorer = time.perf_counter() - (100.0 - slot.cost.score_ms_now(2) - 20.0) / 1e3
    with pytest.raises(Overloaded):
        asyncio.run(uc.rank(USER, [1, 2], budget_ms=100, arrived=fits_scorer))
    result = asyncio.run(uc.rank(USER, [1, 2], budget_ms=1000))
    before = slot.cost.around.mean
    uc.answered(result.context)  # a fast answer pulls the estimate down
    assert slot.cost.around.mean < before


async def queue_at(gate: Turnstile, n: int, started: list[str]) -> list[asyncio.Task[None]]:
    """n requests at the turnstile, each noting its start in `started`; returns once the
    first has started and the others wait (call it with starts left in the iteration)."""

    async def ahead(i: int) -> None:
        await gate.enter()
        started.append(f"ahead {i}")

    tasks = [asyncio.create_task(ahead(i)) for i in range(n)]
    await asyncio.sleep(0)
    return tasks


def test_a_request_made_late_by_the_queue_ahead_is_shed_when_its_turn_comes() -> None:
    """Admission runs again when a request's turn to start comes, with its wait for the
    requests admitted before it: made late by them, it is shed then; in time, answered
    after them, the wait in its `queue` stage."""

    async def main() -> None:
        gate = Turnstile()
        uc, metrics = use_case(turnstile=gate, shed_min_wait_ms=1)
        await uc.rank(USER, [1, 2], budget_ms=1000)  # the user's state built and cached
        await asyncio.sleep(0)  # a new iteration: the turnstile has starts left
        started: list[str] = []
        queued = await queue_at(gate, 4, started)  # the first starts, three wait
        slot = uc.registry.slot
        assert slot is not None and slot.cost.rest_ms_now(2) < 10  # admitted on arrival
        waited = time.perf_counter() - 0.020  # arrived 20 ms ago: 20 ms of 40 left ...

        async def ranked(name: str, budget_ms: float) -> None:
            try:
                result = await uc.rank(USER, [1, 2], budget_ms=budget_ms, arrived=waited)
            except Overloaded:
                started.append(f"{name} shed")
                return
            started.append(f"{name} answered")
            assert result.timings.queue >= 20 + 3 * 10  # its wait and the turns ahead

        def busy() -> None:  # ... and each turn ahead takes 10 ms of the loop
            if gate.waiting:
                time.sleep(0.010)
                asyncio.get_running_loop().call_soon(busy)

        asyncio.get_running_loop().call_soon(busy)
        await asyncio.gather(ranked("late", 40), ranked("in time", 60_000), *queued)
        assert started == [
            "ahead 0",
            "ahead 1",
            "ahead 2",
            "ahead 3",
            "late shed",
            "in time answered",
        ]
        assert counter(metrics, "ifa_rank_degraded_total", reason="overloaded") == 1

    asyncio.run(main())


def test_while_most_requests_are_shed_the_admitted_ones_pass_the_turnstile_by() -> None:
    """Under overload that sheds most requests, an admitted one starts at once, as every
    request of one read did before the turnstile (waiting its turn behind the sheds of
    the ones read with it would make it late); once most are admitted again, it queues."""

    async def order(uc: RankUseCase, gate: Turnstile) -> list[str]:
        await asyncio.sleep(0)  # a new iteration: the turnstile has starts left
        started: list[str] = []
        tasks = await queue_at(gate, 3, started)  # the first starts, two wait
        await uc.rank(USER, [1, 2], budget_ms=60_000)
        started.append("ranked")
        await asyncio.gather(*tasks)
        return started

    async def main() -> None:
        gate = Turnstile()
        uc, _ = use_case(turnstile=gate, shed_min_wait_ms=1)
        await uc.rank(USER, [1, 2], budget_ms=60_000)  # the user's state built and cached
        assert await order(uc, gate) == ["ahead 0", "ahead 1", "ahead 2", "ranked"]
        for _ in range(100):
            with pytest.raises(Overloaded):  # arrived 50 ms ago with a 10 ms budget
                await uc.rank(USER, [1, 2], budget_ms=10, arrived=time.perf_counter() - 0.05)
        assert await order(uc, gate) == ["ahead 0", "ranked", "ahead 1", "ahead 2"]
        for _ in range(100):
            await uc.rank(USER, [1, 2], budget_ms=60_000)
        assert await order(uc, gate) == ["ahead 0", "ahead 1", "ahead 2", "ranked"]

    asyncio.run(main())


def test_a_tiny_budget_not_spent_waiting_is_degraded_not_shed() -> None:
    uc, _ = use_case(shed_min_wait_ms=10)
    result = asyncio.run(uc.rank(USER, [1, 2], budget_ms=0.001))  # arrived just now
    assert result.degraded is None or result.degraded == "partial_state"
    assert len(result.item_ids) == 2


def waited(slot: ModelSlot, queue_ms: float, budget_ms: float) -> RankContext:
    """A request that waited `queue_ms` for the event loop and has `budget_ms` left."""
    ctx = RankContext(slot, USER, deadline=time.perf_counter() + budget_ms / 1e3, candidates=10)
    ctx.timings.queue = queue_ms
    return ctx


def test_a_round_trip_that_cannot_come_back_in_time_is_not_started() -> None:
    """On a saturated loop a Redis reply waits as long as the request did before its
    admission: with less budget left than that, the cached state answers (stale_state)
    and Redis is not asked on the request's path; a re-check goes off the path, so the
    user's next request is warm again. The cooldown is not touched (Redis did nothing
    wrong)."""
    resolver, slot, store, _, _ = ladder(500)
    resolver.freshness = Freshness(10, 60.0)
    resolver.freshness.set_up(True)  # the push channel is up

    async def run() -> tuple[RankContext, list[str], list[str], RankContext]:
        await resolver.resolve(context(slot, 60))  # built and cached
        resolver.freshness.invalidate(USER)  # an append was pushed: not current now
        store.calls.clear()
        late = waited(slot, queue_ms=15.0, budget_ms=2.0)
        await resolver.resolve(late)
        asked_by_late = list(store.calls)
        await asyncio.sleep(0.01)  # the re-check it left behind runs
        rechecked = list(store.calls)
        roomy = waited(slot, queue_ms=15.0, budget_ms=1000.0)
        await resolver.resolve(roomy)
        return late, asked_by_late, rechecked, roomy

    late, asked_by_late, rechecked, roomy = asyncio.run(run())
    assert late.degraded == "stale_state" and late.sequence_length is None
    assert asked_by_late == [] and late.timings.redis == 0  # answered without waiting
    assert rechecked == ["snapshot"]  # one read, off the path
    assert store.calls == ["snapshot"]  # the next request found the user verified
    assert roomy.degraded is None and (roomy.cache_result, roomy.state_source) == (
        "hit",
        "local",
    )
    assert not resolver._cooldown.blocked()


def test_a_short_wait_never_skips_the_round_trip() -> None:
    """Below IFA_SHED_MIN_WAIT_MS the wait is not load: a tiny budget still reads."""
    resolver, slot, store, _, _ = ladder(500)

    async def run() -> RankContext:
        await resolver.resolve(context(slot, 60))
        store.calls.clear()
        ctx = waited(slot, queue_ms=0.0, budget_ms=0.001)
        await resolver.resolve(ctx)
        return ctx

    ctx = asyncio.run(run())
    assert ctx.degraded is None and store.calls == ["snapshot"]


def test_a_cold_user_with_no_time_for_redis_is_shed_and_counted() -> None:
    resolver, slot, store, _, _ = ladder(500)
    with pytest.raises(NoTimeForRedis):
        asyncio.run(resolver.resolve(waited(slot, queue_ms=15.0, budget_ms=2.0)))
    assert store.calls == []
    uc, metrics = use_case(shed_min_wait_ms=10)  # the resolver's default too
    arrived = time.perf_counter() - 0.015  # waited 15 ms of 17: admitted (scoring fits)
    with pytest.raises(Overloaded, match="no time left in the budget"):
        asyncio.run(uc.rank(USER, [1, 2], budget_ms=17, arrived=arrived))
    assert counter(metrics, "ifa_rank_degraded_total", reason="overloaded") == 1
    assert uc.inflight == 0
