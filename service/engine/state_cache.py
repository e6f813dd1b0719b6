"""In-process cache of user states: a bounded LRU, single-flight builds, write-back to Redis.

All of it runs on the event loop thread (no locks): the cache is only touched between
awaits. One `StateCache` belongs to one model version; a reload starts a new, empty one,
so a state is never applied to a model it was not built with. The caches of the versions
served at once (stable, candidate, shadow) share one `CacheBudget`: the pod's memory
bound does not grow with a rollout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from ifa_common.state import UserState
from service.store.redis_store import SequenceStore, StoreUnavailable

log = logging.getLogger(__name__)


def state_bytes(state: UserState) -> int:
    """What one cached state holds in memory (its arrays; the object overhead is small)."""
    return int(state.S.nbytes + state.z.nbytes + state.m.nbytes) + 64


class CacheBudget:
    """States and bytes held by every cache that shares it (one per served version).

    Over the budget, the largest cache gives up its least recently used state: a cache
    never shrinks below an equal split because another grows, so a fresh candidate at 10 %
    of the users warms up next to a stable version that filled the budget alone."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.count = 0
        self.nbytes = 0
        self.caches: list[StateCache] = []  # open ones (at most stable, candidate, shadow)

    def over(self) -> bool:
        return self.count > self.capacity or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        )


class StateCache:
    """At most `capacity` states and `max_bytes` bytes of them (a larger model's states
    are larger: the byte bound is what keeps the pod inside its memory limit). With a
    shared `budget` the bounds hold for all the caches on it together (see CacheBudget)."""

    def __init__(
        self, capacity: int, max_bytes: int | None = None, budget: CacheBudget | None = None
    ) -> None:
        self.budget = budget if budget is not None else CacheBudget(capacity, max_bytes)
        self.budget.caches.append(self)
        self.nbytes = 0  # this cache's own share of the budget
        self.closed = False
        self._lru: OrderedDict[str, UserState] = OrderedDict()
        self._flights: dict[str, asyncio.Task[UserState]] = {}

    @property
    def capacity(self) -> int:
        return self.budget.capacity

    @property
    def max_bytes(self) -> int | None:
        return self.budget.max_bytes

    def close(self) -> None:
        """The slot is no longer served: give its share of the budget back. Requests still
        in flight on it keep working; what they would put is not kept."""
        if self.closed:
            return
        self.closed = True
        self.budget.caches.remove(self)
        self.budget.count -= len(self._lru)
        self.budget.nbytes -= self.nbytes
        self._lru.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, user: object) -> bool:
        return user in self._lru

    def get(self, user: str) -> UserState | None:
        state = self._lru.get(user)
        if state is not None:
            self._lru.move_to_end(user)
        return state

    def put(self, user: str, state: UserState) -> None:
        """Keep the state covering more events: an older, slower build never wins."""
        if self.closed:
            return
        old = self._lru.get(user)
        if old is not None and old.n > state.n:
            self._lru.move_to_end(user)
            return
        budget = self.budget
        if old is not None:
            self._release(old)
        self._lru[user] = state
        size = state_bytes(state)
        self.nbytes += size
        budget.nbytes += size
        budget.count += 1
        self._lru.move_to_end(user)
        while budget.over():
            victim = self
            if len(budget.caches) > 1:  # a rollout: the largest cache gives way
                victim = max(budget.caches, key=lambda c: (c.nbytes, c is self))
            if len(victim._lru) <= (1 if victim is self else 0):
                break  # never the state just put
            _, evicted = victim._lru.popitem(last=False)
            victim._release(evicted)

    def _release(self, state: UserState) -> None:
        size = state_bytes(state)
        self.nbytes -= size
        self.budget.nbytes -= size
        self.budget.count -= 1

    def discard(self, user: str) -> bool:
        old = self._lru.pop(user, None)
        if old is not None:
            self._release(old)
        return old is not None

    def forget(self, user: str) -> bool:
        """Drop the user's state, and detach a build in progress (not cancelled: requests
        already waiting on it get their answer) so that the next request starts its own.
        The detached build's result is not cached when its `keep` says no. True when a
        state was dropped."""
        self._flights.pop(user, None)
        return self.discard(user)

    # ---------------------------------------------------------------- single flight
    def flight(self, user: str) -> asyncio.Task[UserState] | None:
        """The build in progress for `user` (a finished one is not returned)."""
        task = self._flights.get(user)
        return task if task is not None and not task.done() else None

    def start_flight(
        self,
        user: str,
        build: Callable[[], Awaitable[UserState]],
        keep: Callable[[], bool] = lambda: True,
    ) -> asyncio.Task[UserState]:
        """The running build for `user`, or a new one: concurrent callers share it.
        The result goes into the LRU when `keep()` still says so as it ends (false: the
        user was forgotten meanwhile); the task is dropped from the table when done."""
        running = self.flight(user)
        if running is not None:
            return running

        async def run() -> UserState:
            state = await build()
            if keep():
                self.put(user, state)
            return state

        task = asyncio.get_running_loop().create_task(run(), name=f"state-build:{user}")
        self._flights[user] = task

        def done(t: asyncio.Task[UserState]) -> None:
            if self._flights.get(user) is t:
                del self._flights[user]
            if not t.cancelled() and t.exception() is not None:
                log.warning("state build for %s failed: %s", user, t.exception())

        task.add_done_callback(done)
        return task


class StateWriteBack:
    """Writes fresh states to Redis off the request path, batched into one pipeline.

    Pending states are kept per user (the newest wins), so the backlog is bounded by the
    number of distinct users; a failed write is dropped (the state is only a cache).
    """

    def __init__(self, store: SequenceStore, max_pending: int = 100_000) -> None:
        self._store = store
        self._pending: dict[tuple[str, str], bytes] = {}
        self._max_pending = max_pending
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="state-writeback")

    def submit(self, user: str, version: str, blob: bytes) -> None:
        if self._closing:
            return
        if len(self._pending) >= self._max_pending and (user, version) not in self._pending:
            return
        self._pending[(user, version)] = blob
        self._wake.set()

    def discard(self, user: str) -> None:
        """Drop the user's pending states (a forgotten user's must not be written)."""
        for key in [k for k in self._pending if k[0] == user]:
            del self._pending[key]

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        while self._pending:
            batch = list(self._pending.items())[:512]
            for k, _ in batch:
                self._pending.pop(k, None)
            try:
                await self._store.write_states([(u, v, b) for (u, v), b in batch])
            except StoreUnavailable as e:
                log.debug("state write-back dropped %d states: %s", len(batch), e)

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
        await self.flush()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is pending (bounded by `timeout_s`), then stop."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("state write-back: %d states not written at shutdown", self.pending)
            task.cancel()
