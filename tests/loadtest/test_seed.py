"""`ifa-rank seed` writes exactly the seeded records, in the store's layout, into a real Redis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from ifa_common.records import RECORD_SIZE, unpack
from ifa_rank.cli import build_parser
from loadtest import seed
from service.store.redis_store import seq_key, state_key


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_fixed_length_users_get_exactly_their_records(client: redis.Redis) -> None:
    result = seed.seed_synthetic(client, 7, 1000, items=500, prefix="t", seed=3, progress=False)
    assert (result.users, result.events) == (7, 7000)
    for i in range(7):
        assert client.strlen(seq_key(f"t-{i}")) == 1000 * RECORD_SIZE
    assert not client.exists(seq_key("t-7"))
    raw = client.get(seq_key("t-2"))
    assert isinstance(raw, bytes)
    ev = unpack(raw)
    assert ev.shape == (1000,)
    assert np.all(np.diff(ev["ts"]) > 0), "a history is in time order"
    assert ev["item_id"].min() >= 0 and ev["item_id"].max() < 500
    assert np.array_equal(ev["category"], ev["item_id"] % 200)


def test_reseed_resets_and_append_keeps(client: redis.Redis) -> None:
    seed.seed_synthetic(client, 3, 100, prefix="r", progress=False)
    client.set(state_key("r-1", "v1"), b"stale state")
    client.set(state_key("other-1", "v1"), b"not ours")
    seed.seed_synthetic(client, 3, 100, prefix="r", progress=False)
    assert client.strlen(seq_key("r-1")) == 100 * RECORD_SIZE, "reseeding must not double"
    assert not client.exists(state_key("r-1", "v1")), "a state of the old history must go"
    assert client.exists(state_key("other-1", "v1"))
    seed.seed_synthetic(client, 3, 100, prefix="r", reset=False, progress=False)
    assert client.strlen(seq_key("r-1")) == 200 * RECORD_SIZE


def test_same_seed_same_histories(client: redis.Redis) -> None:
    seed.seed_synthetic(client, 2, 50, prefix="a", seed=9, progress=False)
    seed.seed_synthetic(client, 2, 50, prefix="b", seed=9, progress=False)
    assert client.get(seq_key("a-1")) == client.get(seq_key("b-1"))
    assert client.get(seq_key("a-0")) != client.get(seq_key("a-1"))


def test_loguniform_lengths_land_per_user(client: redis.Redis) -> None:
    lengths = seed.user_lengths(40, 5000, "loguniform", min_length=10, seed=1)
    assert lengths.min() >= 10 and lengths.max() <= 5000 and len(set(lengths.tolist())) > 10
    seed.seed_synthetic(
        client, 40, 5000, prefix="l", dist="loguniform", min_length=10, seed=1, progress=False
    )
    got = [client.strlen(seq_key(f"l-{i}")) // RECORD_SIZE for i in range(40)]
    assert got == lengths.tolist()


def test_cli_handler_seeds_through_the_parser(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        [
            "seed",
            "--redis-url",
            redis_url,
            "--users",
            "12",
            "--length",
            "300",
            "--prefix",
            "cli",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    with redis.Redis.from_url(redis_url) as c:
        assert [c.strlen(seq_key(f"cli-{i}")) for i in range(12)] == [300 * RECORD_SIZE] * 12
    assert '"events": 3600' in capsys.readouterr().out


def test_pipelines_span_many_round_trips(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seed, "PIPELINE_BYTES", 10_000)  # ~3 users per round trip
    seed.seed_synthetic(client, 25, 100, prefix="p", progress=False)
    assert [client.strlen(seq_key(f"p-{i}")) for i in range(25)] == [100 * RECORD_SIZE] * 25


@pytest.mark.slow
def test_via_http_goes_through_events_and_a_rerun_appends_nothing(
    redis_url: str, tiny_artifacts: Path
) -> None:
    from loadtest.server import LocalService

    lengths = np.array([1500, 30], dtype=np.int64)
    with LocalService(artifacts_dir=tiny_artifacts, redis_url=redis_url) as svc:
        for _ in range(2):  # the second pass replays every batch's idempotency key
            users = seed.synthetic_users("h", lengths, items=50, categories=7, seed=0)
            result = seed.write_via_http(svc.base_url, users, batch=1000, progress=False)
            assert (result.users, result.events) == (2, 1530)
    with redis.Redis.from_url(redis_url) as c:
        assert c.strlen(seq_key("h-0")) == 1500 * RECORD_SIZE
        assert c.strlen(seq_key("h-1")) == 30 * RECORD_SIZE
        _, first = next(seed.synthetic_users("h", lengths, 50, 7, 0))
        assert c.get(seq_key("h-0")) == first.tobytes(), "the service stores the seeded records"
