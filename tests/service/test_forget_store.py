"""Forgetting a user in Redis (service/store/forget.py), on one Redis and on a real Redis
Cluster: exactly the user's keys go, whatever the neighbours' ids look like."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from svc_helpers import ClusterUrl, sync_redis

from ifa_common.records import RECORD_SIZE, make_events, pack
from ifa_common.state import UserState, covered_events, serialize
from service.store.forget import ImpressionForgetter, RedisForgetter, kind_of, scan_pattern
from service.store.impressions import Click, Impression, shard_of, stream_key
from service.store.redis_store import (
    RedisSequenceStore,
    StoreUnavailable,
    idem_key,
    make_client,
    seq_key,
    state_key,
)


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """Every Redis test here runs against one Redis and against a Redis Cluster."""
    return redis_any


def with_store(url: str, fn: Callable[[RedisSequenceStore], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = make_client(url, 1000, 16, isinstance(url, ClusterUrl))
        store = RedisSequenceStore(client, timeout_ms=1000, idempotency_ttl_s=600, state_ttl_s=600)
        try:
            return await fn(store)
        finally:
            await client.aclose()

    return asyncio.run(main())


def records(n: int) -> bytes:
    return pack(make_events(list(range(n)), [1_700_000_000 + i for i in range(n)]))


def state_blob(n: int, version: str = "v1") -> bytes:
    empty = UserState.empty(1, 1, 1)
    return serialize(UserState(S=empty.S, z=empty.z, m=empty.m, t_ref=empty.t_ref, n=n), version)


# "u4" is a prefix of the others; "u4*" and "u4?" would match it if glob characters were
# not escaped (the id alphabet has none today, the store does not rely on that)
NEIGHBOURS = ("u4", "u42", "xu4", "u4:x", "u4*", "u4?", "u[4]", "u4\\")


def populate(url: str, users: tuple[str, ...]) -> dict[str, set[bytes]]:
    """For each user: a sequence, states of two versions and three idempotency keys."""
    keys: dict[str, set[bytes]] = {}
    with sync_redis(url) as r:
        for u in users:
            r.append(seq_key(u), records(3))
            r.set(state_key(u, "v1"), state_blob(3))
            r.set(state_key(u, "v2"), state_blob(3, "v2"))
            for k in ("k1", "k2", "k3"):
                r.set(idem_key(u, k), b"3:96:digest", ex=600)
            keys[u] = {
                seq_key(u).encode(),
                state_key(u, "v1").encode(),
                state_key(u, "v2").encode(),
                *(idem_key(u, k).encode() for k in ("k1", "k2", "k3")),
            }
    return keys


def existing(url: str, keys: set[bytes]) -> set[bytes]:
    with sync_redis(url) as r:
        return {k for k in keys if r.exists(k)}


@pytest.mark.parametrize("target", ["u4", "u4*", "u[4]"])
def test_exactly_the_users_keys_are_removed(redis_url: str, target: str) -> None:
    keys = populate(redis_url, NEIGHBOURS)
    removed = with_store(redis_url, lambda store: RedisForgetter(store).forget(target))
    assert removed == {"sequence": 1, "states": 2, "idempotency_keys": 3}
    assert existing(redis_url, keys[target]) == set()
    for other in NEIGHBOURS:
        if other != target:
            assert existing(redis_url, keys[other]) == keys[other], other


def test_a_user_with_nothing_removes_zeros(redis_url: str) -> None:
    populate(redis_url, ("u4",))
    removed = with_store(redis_url, lambda store: RedisForgetter(store).forget("u5"))
    assert removed == {"sequence": 0, "states": 0, "idempotency_keys": 0}


def test_many_keys_go_in_batches(redis_url: str) -> None:
    with sync_redis(redis_url) as r:
        r.append(seq_key("many"), records(1))
        for i in range(1_234):  # more than one DELETE_BATCH, more than one SCAN page
            r.set(idem_key("many", f"k{i}"), b"x", ex=600)
            r.set(idem_key("other", f"k{i}"), b"x", ex=600)
    removed = with_store(redis_url, lambda store: RedisForgetter(store).forget("many"))
    assert removed == {"sequence": 1, "states": 0, "idempotency_keys": 1_234}
    with sync_redis(redis_url) as r:
        assert r.exists(*(idem_key("other", f"k{i}") for i in range(1_234))) == 1_234


def test_a_state_written_after_the_forget_is_refused(redis_url: str) -> None:
    """The write-back keeps a state only while the sequence holds every event it covers:
    a build that read the history before its deletion cannot bring it back."""

    async def go(store: RedisSequenceStore) -> None:
        await store.append("w", records(5), None)
        await RedisForgetter(store).forget("w")
        await store.write_states([("w", "v1", state_blob(5))])  # a build from before
        await store.append("w", records(2), None)  # the user starts again
        await store.write_states([("w", "v1", state_blob(5))])
        assert (await store.snapshot("w", "v1", None, 0)).state_blob is None
        await store.write_states([("w", "v1", state_blob(2))])  # built from the new events
        assert (await store.snapshot("w", "v1", None, 0)).state_blob == state_blob(2)

    with_store(redis_url, go)
    with sync_redis(redis_url) as r:
        assert r.strlen(seq_key("w")) == 2 * RECORD_SIZE


def test_redis_down_is_store_unavailable() -> None:
    async def go(store: RedisSequenceStore) -> None:
        with pytest.raises(StoreUnavailable):
            await RedisForgetter(store).forget("u4")

    async def main() -> None:
        client = make_client("redis://127.0.0.1:1", 200, 4)
        store = RedisSequenceStore(client, timeout_ms=200, idempotency_ttl_s=60, state_ttl_s=60)
        try:
            await go(store)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_scan_pattern_and_kinds() -> None:
    assert scan_pattern("u42") == "ifa:*{u42}*"
    assert scan_pattern("a*b?[c]\\") == "ifa:*{a\\*b\\?\\[c\\]\\\\}*"
    assert kind_of(b"ifa:seq:{u4}", "u4") == "sequence"
    assert kind_of(b"ifa:seq:{u42}", "u4") is None
    assert kind_of("ifa:state:{u4}:v1", "u4") == "states"
    assert kind_of("ifa:idem:{u4}:k", "u4") == "idempotency_keys"
    assert kind_of("ifa:other:{u4}", "u4") is None  # an unknown kind is left alone


def log_entries(url: str, users: dict[str, int], shards: int) -> None:
    """`users[u]` impression-log entries for each user (impressions, every third a click)."""
    with sync_redis(url) as r:
        pipe = r.pipeline(transaction=False)
        for u, n in users.items():
            for i in range(n):
                record: Impression | Click = (
                    Click(f"r{i}", u, i, 1_700_000_000, 0)
                    if i % 3 == 2
                    else Impression.of(f"r{i}", u, 1, "v1", None, [1, 2], [0.5, 0.4])
                )
                pipe.xadd(stream_key(shard_of(u, shards)), record.fields())
        pipe.execute()


def log_count(url: str, user_id: str, shards: int) -> int:
    with sync_redis(url) as r:
        entries = r.xrange(stream_key(shard_of(user_id, shards)))
    return sum(fields[b"uid"] == user_id.encode() for _, fields in entries)


@pytest.mark.parametrize("shards", [1, 4])
def test_the_users_impression_log_entries_are_removed(redis_url: str, shards: int) -> None:
    # more entries than one XRANGE page, the target's interleaved with the others'
    users = {"u4": 1_300, "u42": 900, "xu4": 7}
    log_entries(redis_url, users, shards)

    async def go(store: RedisSequenceStore) -> dict[str, int]:
        return await ImpressionForgetter(store, shards).forget("u4")

    assert with_store(redis_url, go) == {"impressions": 1_300}
    assert log_count(redis_url, "u4", shards) == 0
    assert log_count(redis_url, "u42", shards) == 900
    assert log_count(redis_url, "xu4", shards) == 7
    assert with_store(redis_url, go) == {"impressions": 0}  # nothing left, nothing to find


def test_covered_events_reads_a_states_count_from_its_header() -> None:
    assert covered_events(state_blob(7)) == 7
    assert covered_events(state_blob(0, "a-long-model-version")) == 0
    assert covered_events(b"STATE") is None  # not a state: written unchecked, refused on read
    assert covered_events(state_blob(7)[:20]) is None
