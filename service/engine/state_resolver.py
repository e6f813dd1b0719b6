"""The state half of a /rank: the user's state, resolved within the budget.

warm           one Redis round trip (STRLEN [+ GETRANGE of a short tail] [+ GET
               state]); the state covers the whole sequence
refresh        the state is k events behind: fold those k records in (read in the
               same round trip when k <= IFA_REFRESH_INLINE_EVENTS)
cold / behind  build from the sequence (one shared build per user); when the
               estimated cost does not fit the budget, build from the most recent
               events that fit, answer "partial_state", let the full build finish
               in the background
Redis down     the cached state: "stale_state"; none: an empty one, "no_history"
no time left   a round trip that cannot come back within the budget is not started: the
               cached state, "stale_state"; none: `NoTimeForRedis` (the use case sheds)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ifa_common.records import RECORD_SIZE, unpack
from ifa_common.state import StateFormatError, UserState
from service.engine.context import RankContext
from service.engine.cooldown import Cooldown
from service.engine.forgotten import Forgotten
from service.engine.freshness import Freshness
from service.engine.pool import InferencePool
from service.engine.slot import ModelSlot, Runtime
from service.engine.state_cache import StateWriteBack
from service.metrics import Metrics
from service.settings import Settings
from service.store.redis_store import SequenceStore, StoreUnavailable

log = logging.getLogger(__name__)

# What a round trip costs beyond waiting for the event loop (loopback, one command).
ROUND_TRIP_MS: Final = 0.3
MIN_PARTIAL_EVENTS: Final = 64  # a partial answer always uses at least this many events
# A build is split over the pool's workers when every part gets at least this many
# events (below, one job: the split's overhead would outweigh the parallel part).
MIN_PARALLEL_PART: Final = 8_192


class NoTimeForRedis(RuntimeError):
    """A user with no cached state whose Redis read cannot come back within the budget."""


@dataclass(slots=True)
class _Build:
    """Timings of one (possibly shared) state build."""

    redis_ms: float = 0.0
    state_ms: float = 0.0
    events: int = 0


@dataclass(slots=True, frozen=True)
class _Tail:
    """The state of the events [start, length) that a partial answer built."""

    start: int
    state: UserState


@dataclass
class StateResolver:
    settings: Settings
    store: SequenceStore
    metrics: Metrics
    pool: InferencePool
    writeback: StateWriteBack
    freshness: Freshness = field(default_factory=lambda: Freshness(1, 0.0))  # never up
    forgotten: Forgotten = field(default_factory=Forgotten)
    _cooldown: Cooldown = field(init=False)
    _background: set[asyncio.Task[Any]] = field(init=False)
    _checks: set[asyncio.Task[None]] = field(init=False)  # Freshness re-checks in flight

    def __post_init__(self) -> None:
        self._cooldown = Cooldown(self.settings.redis_cooldown_ms)
        self._background = set()
        self._checks = set()

    def _fallback(self, ctx: RankContext, cached: UserState | None) -> UserState:
        ctx.degraded = "stale_state" if cached is not None else "no_history"
        return cached if cached is not None else ctx.slot.runtime.empty_state()

    async def resolve(self, ctx: RankContext) -> UserState:
        """The state to score ctx's candidates with; ctx.degraded says why it is not the
        whole, current history (None when it is)."""
        slot, user, tm = ctx.slot, ctx.user, ctx.timings
        ctx.forget_mark = self.forgotten.mark()
        cached = slot.cache.get(user)
        if cached is not None and self.freshness.fresh(user, cached.n):
            # Redis pushes every append to us: no news is good news (no round trip)
            if self.freshness.due(user) and not self._cooldown.blocked(self.store.scope(user)):
                self._reverify(slot, user, cached.n)
            ctx.sequence_length = cached.n
            ctx.cache_result, ctx.state_source = "hit", "local"
            return cached
        scope = self.store.scope(user)
        if self._cooldown.blocked(scope):
            return self._fallback(ctx, cached)
        if not self._round_trip_fits(ctx):
            if cached is None:
                raise NoTimeForRedis(f"no time left in the budget to read {user}'s history")
            if self.freshness.up and not self.freshness.reading(user):
                # verify it off the path, so the user's next admitted request is warm
                # again (under overload most are shed before they could verify it)
                self._reverify(slot, user, cached.n)
            return self._fallback(ctx, cached)
        t = time.perf_counter()
        token = self.freshness.begin(user)
        answered: int | None = None
        try:
            snap = await self.store.snapshot(
                user,
                slot.version,
                cached.n if cached is not None else None,
                self.settings.refresh_inline_events,
            )
            answered = snap.length
        except StoreUnavailable as e:
            log.debug("rank %s: %s", user, e)
            self._cooldown.failed(e)
            return self._fallback(ctx, cached)
        finally:
            self.freshness.end(user, token, answered)
            tm.redis += (time.perf_counter() - t) * 1e3
        self._cooldown.succeeded(scope)
        length = ctx.sequence_length = snap.length

        base, source = cached, "local"
        if base is None:
            # another request may have built the state while this one read Redis: use it
            # (else a cold user's late request, finding no build in flight, builds again)
            # (one built from a later read, past this snapshot, is left for the next one)
            newer = slot.cache.get(user)
            base = newer if newer is not None and newer.n <= length else None
        if base is None and snap.state_blob is not None:
            base, source = self._decode(slot, user, snap.state_blob), "redis"
        if base is not None and base.n > length:
            # The sequence is shorter than the state: deleted, or Redis lost data.
            slot.cache.discard(user)
            base = None
        if base is not None and base.n == length:
            ctx.cache_result, ctx.state_source = "hit", source
            if source == "redis":
                self._keep(ctx, base)
            return base
        if base is None and length == 0:
            ctx.cache_result, ctx.state_source = "miss", "build"
            empty = slot.runtime.empty_state()
            self._keep(ctx, empty)
            return empty

        ctx.cache_result = "refresh" if base is not None else "miss"
        ctx.state_source = "build"
        if (
            base is not None
            and snap.tail_from == base.n
            and len(snap.tail) == (length - base.n) * RECORD_SIZE
        ):
            # The whole tail came with the snapshot: fold it in, no second round trip.
            t = time.perf_counter()
            state = await self.pool.run(_fold_events, slot.runtime, base, unpack(snap.tail))
            tm.state += (time.perf_counter() - t) * 1e3
            self._keep(ctx, state, write_back=True)
            return state
        return await self._advance(ctx, base, length)

    def _reverify(self, slot: ModelSlot, user: str, n: int) -> None:
        """Re-read `user`'s length off the request path (Freshness.due): the answer renews
        or ends their verification exactly as a request's own read would."""
        token = self.freshness.begin(user)  # now: the next request must not start another
        answered: list[int] = []

        async def check() -> None:
            try:
                answered.append((await self.store.snapshot(user, slot.version, n, 0)).length)
            except StoreUnavailable as e:  # counted as a request's read failure would be
                log.debug("re-check of %s: %s", user, e)
                self._cooldown.failed(e)
            else:
                self._cooldown.succeeded(self.store.scope(user))

        def done(task: asyncio.Task[None]) -> None:  # also when cancelled before it ran
            self._checks.discard(task)
            self.freshness.end(user, token, answered[0] if answered else None)

        task = asyncio.get_running_loop().create_task(check())
        self._checks.add(task)
        task.add_done_callback(done)

    def _round_trip_fits(self, ctx: RankContext) -> bool:
        """Whether a Redis round trip is expected back in time to still score within the
        budget. Its reply waits for the event loop like the request itself did, so the
        request's own wait (the `queue` stage) is the estimate of that: on a saturated
        loop it is what a read costs, far more than Redis does (an overload test saw a
        3 ms-budget answer take 190 ms that way). Judged only when the request did wait
        (IFA_SHED_MIN_WAIT_MS, as admission does): a budget too small for the work but
        not spent waiting is the ladder's to degrade as it always has."""
        waited = ctx.timings.queue
        if waited < self.settings.shed_min_wait_ms:
            return True
        need = waited + ROUND_TRIP_MS + ctx.slot.cost.rest_ms_now(ctx.candidates)
        return ctx.remaining_ms() >= need

    def _current(self, user: str, mark: int) -> bool:
        """Work that began at `mark` read nothing the user's forget removed since."""
        return not self.forgotten.since(user, mark)

    def _keep(self, ctx: RankContext, state: UserState, write_back: bool = False) -> None:
        """Cache (and write back) a state this request derived from its reads, unless the
        user was forgotten since they began: it would bring the deleted history back."""
        if self._current(ctx.user, ctx.forget_mark):
            ctx.slot.cache.put(ctx.user, state)
            if write_back:
                self._write_back(ctx.slot, ctx.user, state)

    def _decode(self, slot: ModelSlot, user: str, blob: bytes) -> UserState | None:
        try:
            return slot.runtime.deserialize_state(blob)
        except StateFormatError as e:  # another model version or a corrupt entry: rebuild
            log.debug("stored state of %s not usable: %s", user, e)
            return None

    def _estimate_ms(self, slot: ModelSlot, n: int) -> float:
        return slot.cost.build_ms(n) + slot.cost.read_ms(n)

    def _fit(self, slot: ModelSlot, available_ms: float, k: int) -> int:
        """The most events (<= k) whose read + build is estimated to fit `available_ms`."""
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._estimate_ms(slot, mid) <= available_ms:
                lo = mid
            else:
                hi = mid - 1
        return max(lo, min(k, MIN_PARTIAL_EVENTS))

    async def _advance(self, ctx: RankContext, base: UserState | None, length: int) -> UserState:
        """Bring `base` (None: nothing) up to `length` events within the budget."""
        slot, user, tm = ctx.slot, ctx.user, ctx.timings
        start = base.n if base is not None else 0
        k = length - start
        available = ctx.remaining_ms() - slot.cost.rest_ms_now(ctx.candidates)
        flight = slot.cache.flight(user)
        if flight is None:
            fits = self._estimate_ms(slot, k) <= available
            info = _Build()
            # When this request answers from a partial build, the full build waits for
            # it (so the two do not split the CPU and blow this request's budget) and
            # takes over the recent events it built instead of reading them again.
            handoff: asyncio.Future[_Tail | None] = asyncio.get_running_loop().create_future()
            if fits:
                handoff.set_result(None)
            mark = ctx.forget_mark
            flight = slot.cache.start_flight(
                user,
                lambda: self._build(slot, user, base, start, length, info, handoff, mark),
                keep=lambda: self._current(user, mark),
            )
            self._track(flight)
            if not fits:
                tail: _Tail | None = None
                try:
                    state, tail = await self._partial(ctx, base, length)
                    return state
                finally:
                    handoff.set_result(tail)
            try:
                state = await asyncio.shield(flight)
            except StoreUnavailable as e:
                self._cooldown.failed(e)
                return self._fallback(ctx, base)
            finally:
                tm.redis += info.redis_ms
                tm.state += info.state_ms
            return state
        else:
            # Another request is building this user's state: share it while the budget lasts.
            t = time.perf_counter()
            try:
                async with asyncio.timeout(max(available, 0.0) / 1e3):
                    state = await asyncio.shield(flight)
            except (TimeoutError, StoreUnavailable):
                pass
            else:
                if state.n == length:
                    return state
                if state.n < length and ctx.remaining_ms() > 0:
                    return await self._advance(ctx, state, length)
                if state.n > length:  # appended meanwhile; the newer state is fine
                    return state
            finally:
                tm.state += (time.perf_counter() - t) * 1e3
        state, _ = await self._partial(ctx, base, length)
        return state

    async def _partial(
        self, ctx: RankContext, base: UserState | None, length: int
    ) -> tuple[UserState, _Tail | None]:
        """Score with the most recent events that fit the budget (never cached). Returns
        the answer's state and the recent events' own state (None when Redis failed)."""
        slot, user, tm = ctx.slot, ctx.user, ctx.timings
        start = base.n if base is not None else 0
        available = ctx.remaining_ms() - slot.cost.rest_ms_now(ctx.candidates)
        n = self._fit(slot, available, length - start)
        info = _Build()
        try:
            recent = await self._read_and_build(slot, user, None, length - n, length, info)
        except StoreUnavailable as e:
            self._cooldown.failed(e)
            return self._fallback(ctx, base), None
        finally:
            tm.redis += info.redis_ms
            tm.state += info.state_ms
        # A short gap is built whole even past the budget (MIN_PARTIAL_EVENTS): then the
        # answer is not partial and is not flagged.
        ctx.degraded = "partial_state" if n < length - start else None
        state = recent if base is None else slot.runtime.fold(base, recent)
        return state, _Tail(length - n, recent)

    async def _build(
        self,
        slot: ModelSlot,
        user: str,
        base: UserState | None,
        start: int,
        length: int,
        info: _Build,
        handoff: asyncio.Future[_Tail | None],
        mark: int,
    ) -> UserState:
        tail = await handoff
        stop = tail.start if tail is not None else length
        state = base
        if stop > start:
            state = await self._read_and_build(slot, user, base, start, stop, info)
            slot.cost.observe_read(info.events, info.redis_ms)
        if tail is not None:
            state = tail.state if state is None else slot.runtime.fold(state, tail.state)
        assert state is not None  # stop > start or a tail: some events were built
        if self._current(user, mark):
            self._write_back(slot, user, state)
        return state

    async def _read_and_build(
        self,
        slot: ModelSlot,
        user: str,
        base: UserState | None,
        start: int,
        stop: int,
        info: _Build,
    ) -> UserState:
        """`base` folded with the events [start, stop): one pipelined read, then the
        events split over every pool worker (states are additive, so the parts fold
        exactly). Faster on 2 cores than one job, and than building each part while the
        next is read (the reads then wait for the GIL; docs/performance.md)."""
        t = time.perf_counter()
        try:
            events = await self.store.read_range(user, start, stop)
        finally:
            info.redis_ms += (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        n = int(events.shape[0])
        info.events += n
        parts = max(1, min(self.pool.workers, n // MIN_PARALLEL_PART))
        bounds = [n * i // parts for i in range(parts + 1)]
        partials = await asyncio.gather(
            *(
                self.pool.run(slot.runtime.build_state, events[lo:hi])
                for lo, hi in itertools.pairwise(bounds)
            )
        )
        if base is None and len(partials) == 1:
            state = partials[0]
        else:
            state = await self.pool.run(_fold_all, slot.runtime, base, list(partials))
        info.state_ms += (time.perf_counter() - t) * 1e3
        return state

    def _write_back(self, slot: ModelSlot, user: str, state: UserState) -> None:
        self.writeback.submit(user, slot.version, slot.runtime.serialize_state(state))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            ok = not t.cancelled() and t.exception() is None
            self.metrics.background_builds.labels("ok" if ok else "failed").inc()
            error = None if t.cancelled() else t.exception()
            if isinstance(error, StoreUnavailable):
                self._cooldown.failed(error)

        task.add_done_callback(done)

    async def drain(self, timeout_s: float) -> None:
        """Let background builds finish (bounded), then cancel what is left."""
        for check in list(self._checks):  # re-checks only renew a verification
            check.cancel()
        tasks = list(self._background)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()


def _fold_all(rt: Runtime, base: UserState | None, partials: list[UserState]) -> UserState:
    """`base` (None: nothing) folded with every partial state; partials is never empty."""
    state = partials[0] if base is None else rt.fold(base, partials[0])
    for part in partials[1:]:
        state = rt.fold(state, part)
    return state


def _fold_events(rt: Runtime, base: UserState | None, events: np.ndarray) -> UserState:
    partial = rt.build_state(events)
    return partial if base is None else rt.fold(base, partial)
