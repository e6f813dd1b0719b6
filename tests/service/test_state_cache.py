"""The in-process state cache: LRU bound, single flight, write-back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from ifa_common.state import UserState
from service.engine.state_cache import StateCache, StateWriteBack, state_bytes
from service.store.redis_store import StoreUnavailable


def state(n: int) -> UserState:
    s = UserState.empty(2, 3, 4)
    return UserState(S=s.S, z=s.z, m=s.m, t_ref=n, n=n)


def test_lru_is_bounded_and_evicts_least_recently_used() -> None:
    cache = StateCache(3)
    for u in "abc":
        cache.put(u, state(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", state(1))
    assert len(cache) == 3
    assert "b" not in cache and {"a", "c", "d"} <= {u for u in "abcd" if u in cache}
    for i in range(100):
        cache.put(f"x{i}", state(1))
    assert len(cache) == 3


def big(n: int, heads: int) -> UserState:
    s = UserState.empty(heads, 8, 8)
    return UserState(S=s.S, z=s.z, m=s.m, t_ref=n, n=n)


def test_the_byte_bound_evicts_by_memory_not_only_by_count() -> None:
    one = state_bytes(big(1, 4))
    cache = StateCache(1000, max_bytes=5 * one)
    for i in range(20):
        cache.put(f"u{i}", big(1, 4))
    assert len(cache) == 5 and cache.nbytes == 5 * one  # the count bound never came near
    assert all(f"u{i}" in cache for i in range(15, 20))  # the most recent survive
    cache.put("wide", big(1, 16))  # a larger model's state: 4x the bytes
    assert cache.nbytes <= 5 * one and "wide" in cache
    cache.put("wide", big(2, 16))  # replaced, not counted twice
    cache.discard("wide")
    assert cache.nbytes == sum(state_bytes(big(1, 4)) for _ in range(len(cache)))


def test_put_keeps_the_state_covering_more_events() -> None:
    cache = StateCache(4)
    cache.put("u", state(10))
    cache.put("u", state(7))  # a slower, older build finishing late
    got = cache.get("u")
    assert got is not None and got.n == 10
    cache.put("u", state(12))
    got = cache.get("u")
    assert got is not None and got.n == 12


def test_concurrent_requests_share_one_build() -> None:
    calls = 0
    release: asyncio.Event | None = None

    async def build() -> UserState:
        nonlocal calls
        calls += 1
        if release is not None:
            await release.wait()  # the flight stays open until every request has joined
        return state(5)

    async def main() -> list[UserState]:
        nonlocal release
        release = asyncio.Event()
        cache = StateCache(10)
        tasks = [cache.start_flight("u", build) for _ in range(20)]
        assert len({id(t) for t in tasks}) == 1
        await asyncio.sleep(0)  # the build starts and waits
        assert cache.flight("u") is not None
        release.set()
        results = await asyncio.gather(*tasks)
        await asyncio.sleep(0)  # done-callbacks run
        assert cache.flight("u") is None
        assert cache.get("u") is not None
        # a new build may start once the first is done
        await cache.start_flight("u", build)
        return list(results)

    results = asyncio.run(main())
    assert calls == 2
    assert all(r.n == 5 for r in results)


def test_a_failed_build_is_not_cached_and_can_be_retried() -> None:
    async def boom() -> UserState:
        raise StoreUnavailable("down")

    async def main() -> None:
        cache = StateCache(10)
        with pytest.raises(StoreUnavailable):
            await cache.start_flight("u", boom)
        await asyncio.sleep(0)
        assert cache.get("u") is None and cache.flight("u") is None

    asyncio.run(main())


class RecordingStore:
    def __init__(self, fail: bool = False) -> None:
        self.writes: list[tuple[str, str, bytes]] = []
        self.fail = fail

    async def write_states(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        if self.fail:
            raise StoreUnavailable("down")
        self.writes.extend(items)


def test_write_back_batches_keeps_newest_and_flushes_on_close() -> None:
    async def main() -> RecordingStore:
        store = RecordingStore()
        wb = StateWriteBack(store, max_pending=100)  # type: ignore[arg-type]
        wb.start()
        wb.submit("u", "v1", b"old")
        wb.submit("u", "v1", b"new")  # same user before the writer ran: newest wins
        wb.submit("w", "v1", b"w")
        await wb.close()
        return store

    store = asyncio.run(main())
    assert sorted(store.writes) == [("u", "v1", b"new"), ("w", "v1", b"w")]


def test_write_back_failures_are_dropped_not_raised() -> None:
    async def main() -> int:
        wb = StateWriteBack(RecordingStore(fail=True), max_pending=2)  # type: ignore[arg-type]
        wb.start()
        for i in range(5):
            wb.submit(f"u{i}", "v1", np.zeros(3).tobytes())
        assert wb.pending <= 2  # bounded backlog
        await wb.close()
        return wb.pending

    assert asyncio.run(main()) == 0
