"""The Redis sequence store against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from redis.crc import key_slot
from svc_helpers import ClusterUrl, sync_redis

from ifa_common.records import RECORD_SIZE, make_events, pack, unpack
from loadtest.redis_cluster import LocalRedisCluster
from service.store.redis_store import (
    IdempotencyConflict,
    RedisSequenceStore,
    StoreUnavailable,
    idem_key,
    make_client,
    seq_key,
    state_key,
)


def run_with_store(url: str, fn: Callable[[RedisSequenceStore], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        client = make_client(url, kw.pop("timeout_ms", 1000), 64, isinstance(url, ClusterUrl))
        store = RedisSequenceStore(
            client,
            timeout_ms=kw.pop("store_timeout_ms", 1000),
            idempotency_ttl_s=600,
            state_ttl_s=600,
            wait_replicas=kw.pop("wait_replicas", 0),
            wait_ms=kw.pop("wait_ms", 0),
        )
        try:
            return await fn(store)
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """Every test here runs against one Redis and against a Redis Cluster."""
    return redis_any


def records(items: list[int], t0: int = 1_700_000_000) -> bytes:
    return pack(make_events(items, [t0 + i for i in range(len(items))]))


def test_keys_put_the_user_in_a_hash_tag() -> None:
    assert seq_key("u1") == "ifa:seq:{u1}"
    assert state_key("u1", "v3") == "ifa:state:{u1}:v3"
    assert idem_key("u1", "k") == "ifa:idem:{u1}:k"


def test_append_and_read_tail(redis_url: str) -> None:
    async def go(store: RedisSequenceStore) -> None:
        r1 = await store.append("a", records([1, 2, 3]), None)
        r2 = await store.append("a", records([4, 5]), None)
        assert (r1.appended, r1.length, r2.appended, r2.length) == (3, 3, 2, 5)
        assert await store.length("a") == 5
        tail = await store.read_range("a", 3, 5)
        assert tail["item_id"].tolist() == [4, 5]
        assert (await store.read_range("a", 0, 5))["item_id"].tolist() == [1, 2, 3, 4, 5]
        assert (await store.read_range("a", 5, 5)).shape == (0,)
        assert await store.length("nobody") == 0

    run_with_store(redis_url, go)
    with sync_redis(redis_url) as c:
        raw = c.get(seq_key("a"))
        assert raw is not None and len(raw) == 5 * RECORD_SIZE  # packed binary, no JSON


def test_long_reads_are_chunked_and_exact(redis_url: str) -> None:
    n = 70_000  # > 2 GETRANGE chunks
    items = np.arange(n, dtype=np.int64)
    with sync_redis(redis_url) as c:
        c.append(seq_key("long"), pack(make_events(items, items)))

    async def go(store: RedisSequenceStore) -> np.ndarray:
        return await store.read_range("long", 1, n)

    got = run_with_store(redis_url, go)
    assert np.array_equal(got["item_id"], items[1:])


def test_snapshot_is_one_round_trip_view(redis_url: str) -> None:
    async def go(store: RedisSequenceStore) -> None:
        await store.append("s", records(list(range(10))), None)
        cold = await store.snapshot("s", "v1", have_n=None, tail_cap=4)
        assert (cold.length, cold.state_blob, cold.tail_from) == (10, None, None)
        await store.write_states([("s", "v1", b"STATE")])
        cold = await store.snapshot("s", "v1", have_n=None, tail_cap=4)
        assert cold.state_blob == b"STATE"
        assert (await store.snapshot("s", "v2", None, 4)).state_blob is None  # per version
        warm = await store.snapshot("s", "v1", have_n=7, tail_cap=4)
        assert warm.length == 10 and warm.tail_from == 7
        assert unpack(warm.tail)["item_id"].tolist() == [7, 8, 9]
        capped = await store.snapshot("s", "v1", have_n=2, tail_cap=4)
        assert unpack(capped.tail)["item_id"].tolist() == [2, 3, 4, 5]

    run_with_store(redis_url, go)


def test_idempotent_append_returns_the_original_answer(redis_url: str) -> None:
    async def go(store: RedisSequenceStore) -> None:
        first = await store.append("i", records([1, 2]), "key-1")
        await store.append("i", records([3]), None)
        again = await store.append("i", records([1, 2]), "key-1")
        assert (first.appended, first.length, first.replayed) == (2, 2, False)
        assert (again.appended, again.length, again.replayed) == (2, 2, True)
        assert await store.length("i") == 3
        with pytest.raises(IdempotencyConflict):
            await store.append("i", records([9, 9]), "key-1")
        # keys are per user
        other = await store.append("j", records([1, 2]), "key-1")
        assert (other.appended, other.replayed) == (2, False)

    run_with_store(redis_url, go)
    with sync_redis(redis_url) as c:
        ttl = c.ttl(idem_key("i", "key-1"))
        assert 0 < ttl <= 600


def test_appends_can_wait_for_replicas(redis_url: str) -> None:
    """IFA_EVENTS_WAIT_REPLICAS: an append (fresh or replayed, with or without a key)
    answers once that many replicas have it; else StoreUnavailable saying how many did.
    The test cluster has one replica per primary, the single Redis none."""
    have = 1 if isinstance(redis_url, ClusterUrl) else 0

    async def go(store: RedisSequenceStore) -> None:
        first = await store.append("w", records([1, 2]), "key-1")
        again = await store.append("w", records([1, 2]), "key-1")
        plain = await store.append("w", records([3]), None)
        assert (first.replayed, again.replayed, plain.length) == (False, True, 3)
        with pytest.raises(IdempotencyConflict):
            await store.append("w", records([9]), "key-1")

    def wanting(n: int) -> Callable[[RedisSequenceStore], Awaitable[Any]]:
        async def go_short(store: RedisSequenceStore) -> None:
            with pytest.raises(StoreUnavailable, match=f"{have} of {n} replicas"):
                await store.append("short", records([1]), "k")

        return go_short

    if have:
        run_with_store(redis_url, go, wait_replicas=have, wait_ms=500)
    run_with_store(redis_url, wanting(have + 1), wait_replicas=have + 1, wait_ms=50)
    with sync_redis(redis_url) as c:  # refused, not lost: Redis has it, a retry replays it
        assert c.strlen(seq_key("short")) == RECORD_SIZE


def test_concurrent_writers_lose_and_duplicate_nothing(redis_url: str) -> None:
    writers, per_writer = 8, 500

    async def writer(store: RedisSequenceStore, w: int) -> None:
        for i in range(per_writer):
            item = w * 1_000_000 + i
            key = f"w{w}-{i}"
            await store.append("c", records([item]), key)
            if i % 50 == 0:  # a retry of an acknowledged append must not duplicate it
                await store.append("c", records([item]), key)

    async def go(store: RedisSequenceStore) -> np.ndarray:
        await asyncio.gather(*(writer(store, w) for w in range(writers)))
        return await store.read_range("c", 0, await store.length("c"))

    got = run_with_store(redis_url, go)
    assert got.shape[0] == writers * per_writer
    expected = {w * 1_000_000 + i for w in range(writers) for i in range(per_writer)}
    assert set(got["item_id"].tolist()) == expected
    for w in range(writers):  # each writer's events stay in the order it sent them
        mine = got["item_id"][(got["item_id"] // 1_000_000) == w]
        assert np.all(np.diff(mine) > 0)


def test_unreachable_redis_is_store_unavailable() -> None:
    from service.store.embedded_redis import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"

    async def go(store: RedisSequenceStore) -> None:
        with pytest.raises(StoreUnavailable):
            await store.snapshot("x", "v1", None, 4)
        with pytest.raises(StoreUnavailable):
            await store.append("x", records([1]), "k")
        with pytest.raises(StoreUnavailable):
            await store.ping()

    run_with_store(url, go, timeout_ms=200, store_timeout_ms=200)


def test_a_fresh_cluster_client_routes_its_first_commands_right(redis_cluster_url: str) -> None:
    """redis-py picks a command's node before loading the slot map: concurrent first
    commands of a fresh client went to arbitrary nodes (a MOVED each, and after five
    redis-py closed every connection, failing the others). None may be misrouted."""
    url = ClusterUrl(redis_cluster_url)

    def moved() -> int:
        with sync_redis(url) as c:
            stats = c.info("errorstats", target_nodes=c.PRIMARIES)
        return sum(int(s.get("errorstat_MOVED", {}).get("count", 0)) for s in stats.values())

    before = moved()

    async def go(store: RedisSequenceStore) -> None:
        await asyncio.gather(*(store.append(f"first-{i}", records([i]), "k") for i in range(16)))

    run_with_store(url, go)
    assert moved() == before


def test_a_lost_primary_fails_no_command_in_flight_on_the_others(
    redis_cluster: LocalRedisCluster, redis_cluster_url: str
) -> None:
    """A pipeline of a lost primary's user fails (a chunked read here; the replicated
    append and the state write-back are pipelines too) while another primary is answering
    a command: that command must still get its answer. redis-py's own retry of the
    pipeline closed every connection to every node first."""
    url = ClusterUrl(redis_cluster_url)
    (victim, _), (other, _) = redis_cluster.masters()[:2]

    def user_on(port: int) -> str:
        return next(
            u
            for u in (f"lost-{i}" for i in range(10_000))
            if redis_cluster.master_of_slot(key_slot(seq_key(u).encode())) == port
        )

    lost, kept = user_on(victim), user_on(other)

    async def go(store: RedisSequenceStore) -> None:
        await store.append(lost, records(list(range(8))), None)
        await store.append(kept, records(list(range(8))), None)
        redis_cluster.kill(victim)
        # BLPOP on an empty list of the other primary: an answer (None) after 0.5 s
        idle = f"{seq_key(kept)}:idle"  # a key in the same slot
        busy: asyncio.Task[Any] = asyncio.create_task(
            store.client.blpop([idle], timeout=0.5)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.05)
        with pytest.raises(StoreUnavailable, match="read"):
            await store.read_range(lost, 0, 8)
        assert await busy is None
        assert (await store.read_range(kept, 0, 8))["item_id"].tolist() == list(range(8))

    run_with_store(url, go, timeout_ms=2000, store_timeout_ms=2000)
