"""The impression log and its export, against a real Redis and a real cluster: what is
written, its bounds, what it drops and counts, and the labelled training log read back
through the consumer group (resumable, windowed) and loaded by the trainer's reader."""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from svc_helpers import ClusterUrl, sync_redis

from ifa_common.records import make_events, pack
from model_export.data.logs import load_log
from model_export.data.served import export_served
from service.store.impressions import (
    OWN_ARGUMENT,
    OWN_FROM,
    Click,
    Impression,
    ImpressionLog,
    record_args,
    sampled,
    shard_of,
    stream_key,
)
from service.store.redis_store import make_client, seq_key


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """Every test here runs against one Redis and against a Redis Cluster."""
    return redis_any


class Counts:
    def __init__(self) -> None:
        self.logged = 0
        self.writes: list[int] = []  # records per write, in order
        self.dropped: Counter[str] = Counter()

    def on_logged(self, n: int) -> None:
        self.logged += n
        self.writes.append(n)

    def on_dropped(self, reason: str, n: int) -> None:
        self.dropped[reason] += n


def run_log(url: str, fn: Any, **kw: Any) -> Counts:
    counts = Counts()

    async def main() -> None:
        client = make_client(url, 1000, 16, isinstance(url, ClusterUrl))
        log = ImpressionLog(
            client,
            shards=kw.get("shards", 4),
            max_len=kw.get("max_len", 10_000),
            sample_rate=kw.get("sample_rate", 1.0),
            queue_size=kw.get("queue_size", 10_000),
            timeout_s=1.0,
            on_logged=counts.on_logged,
            on_dropped=counts.on_dropped,
            linger_s=kw.get("linger_s", 0.0),
        )
        if kw.get("start", True):
            log.start()
        try:
            done = fn(log)
            if asyncio.iscoroutine(done):
                await done
        finally:
            await log.close(10.0)
            await client.aclose()

    asyncio.run(main())
    return counts


def stream_lengths(url: str, shards: int) -> list[int]:
    with sync_redis(url) as r:
        return [int(r.xlen(stream_key(s))) for s in range(shards)]


def test_impressions_and_clicks_land_in_the_users_shard(redis_url: str) -> None:
    def go(log: ImpressionLog) -> None:
        for i in range(40):
            log.offer_impression(f"r{i}", f"u{i % 8}", "v1", None, [3, 1, 2], [0.9, 0.5, 0.1])
        log.offer_click(Click("r0", "u0", 1, 1_700_000_000, 2))

    counts = run_log(redis_url, go)
    assert counts.logged == 41 and not counts.dropped
    assert sum(stream_lengths(redis_url, 4)) == 41
    with sync_redis(redis_url) as r:
        entries = r.xrange(stream_key(shard_of("u0", 4)))
    mine = [f for _, f in entries if f[b"uid"] == b"u0"]
    assert len(mine) == 6  # five impressions and the click
    imp = mine[0]
    assert np.frombuffer(imp[b"items"], "<i8").tolist() == [3, 1, 2]
    assert np.frombuffer(imp[b"scores"], "<f4").tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert (
        imp[b"v"] == b"v1" and imp[b"deg"] == b"" and abs(int(imp[b"ts"]) / 1e3 - time.time()) < 60
    )
    assert mine[-1][b"type"] == b"click" and mine[-1][b"item"] == b"1"


@pytest.mark.parametrize("linger_s", [0.0, 0.5])
def test_the_writer_lets_records_gather_for_its_linger(redis_url: str, linger_s: float) -> None:
    """A record found alone waits `linger_s` for others to share its write (a write's
    cost to the event loop is mostly per call); without a linger it is written at once."""

    async def go(log: ImpressionLog) -> None:
        log.offer_impression("r0", "u0", "v1", None, [1], [0.5])
        await asyncio.sleep(0.01)  # the writer takes it: lingering, or writing it alone
        for i in range(1, 10):
            log.offer_impression(f"r{i}", f"u{i}", "v1", None, [1], [0.5])

    counts = run_log(redis_url, go, linger_s=linger_s)
    assert counts.logged == 10 and sum(stream_lengths(redis_url, 4)) == 10
    assert counts.writes == ([10] if linger_s else [1, 9]), counts.writes


def test_the_script_writes_the_entry_xadd_would(redis_url: str) -> None:
    """The writer lays each record out as a head and its large values, and a Lua script
    XADDs it: the entry's fields must be byte for byte those of an XADD of the record's
    fields, whether its values went in the head (few items) or on their own (many)."""
    click = Click("r-é", "u:1@x", 2**62, 1_700_000_000, 3)  # non-ASCII, a large int
    few = ([3, 1, 2], [0.9, 0.5, 0.1])
    many = (list(range(500, 0, -1)), np.linspace(1.0, 0.0, 500).tolist())

    def go(log: ImpressionLog) -> None:
        log.offer_impression("r1", "u0", "v1", "stale_state", *few)
        log.offer_click(click)
        log.offer_impression("r2", "u0", "v1", None, *many)

    counts = run_log(redis_url, go, shards=1)
    assert counts.logged == 3
    with sync_redis(redis_url) as r:
        got = [f for _, f in r.xrange(stream_key(0))]
        ts = [int(got[i][b"ts"]) for i in (0, 2)]  # the field the test cannot know beforehand
        imps = [
            Impression.of("r1", "u0", ts[0], "v1", "stale_state", *few),
            Impression.of("r2", "u0", ts[1], "v1", None, *many),
        ]
        assert len(imps[1].items) >= OWN_FROM > len(imps[0].items)  # both layouts taken
        for record in (imps[0], click, imps[1]):
            r.xadd("reference:{0}", record.fields())
        want = [f for _, f in r.xrange("reference:{0}")]
    assert got == want
    assert list(got[0]) == [b"type", b"rid", b"uid", b"ts", b"v", b"deg", b"items", b"scores"]


def test_record_args_put_short_values_in_the_head_and_long_ones_after_it() -> None:
    args: list[bytes] = [b"100"]
    long = b"z" * OWN_FROM
    record_args({"a": b"xy", "n": 12, "big": long, "s": "é"}, args)
    head, own = args[1], args[2:]
    n, *lengths = struct.unpack("<9I", head[:36])
    assert n == 8 and lengths == [1, 2, 1, 2, 3, OWN_ARGUMENT, 1, 2]
    assert head[36:] == b"axyn12bigs" + "é".encode()
    assert args[0] == b"100" and own == [long]


def test_a_stream_that_refuses_loses_only_its_own_records(redis_url: str) -> None:
    """Per stream, one call: a stream Redis refuses (here a key of the wrong type) drops
    its records, counted as `redis`, and the other streams' records are written."""
    bad = shard_of("u0", 4)
    with sync_redis(redis_url) as r:
        r.set(stream_key(bad), "not a stream")
    users = [f"u{i}" for i in range(40)]

    def go(log: ImpressionLog) -> None:
        for i, user in enumerate(users):
            log.offer_impression(f"r{i}", user, "v1", None, [1], [0.5])

    counts = run_log(redis_url, go)
    lost = sum(shard_of(u, 4) == bad for u in users)
    assert 0 < lost < len(users)
    assert counts.dropped == Counter({"redis": lost}) and counts.logged == len(users) - lost
    with sync_redis(redis_url) as r:
        r.delete(stream_key(bad))
    assert sum(stream_lengths(redis_url, 4)) == len(users) - lost


def test_bounded_stream_full_queue_and_a_dead_redis_drop_and_count() -> None:
    url = "redis://127.0.0.1:1"  # nothing listens on port 1

    def go(log: ImpressionLog) -> None:
        for i in range(5):
            log.offer_impression(f"r{i}", "u", "v1", None, [1], [0.5])

    counts = run_log(url, go, shards=1)  # offer never raises; the batch is dropped
    assert counts.logged == 0 and counts.dropped["redis"] == 5
    counts = run_log(url, go, shards=1, queue_size=2, start=False)
    assert counts.dropped["queue_full"] == 3 and counts.dropped["shutdown"] == 2


def test_the_stream_is_trimmed_to_about_its_bound(redis_url: str) -> None:
    def go(log: ImpressionLog) -> None:
        for i in range(3000):
            log.offer_impression(f"r{i}", "u", "v1", None, [1], [0.5])

    run_log(redis_url, go, shards=1, max_len=500)
    (length,) = stream_lengths(redis_url, 1)
    assert 500 <= length < 1000  # MAXLEN ~: trimmed by whole macro nodes, never below


def test_sampling_is_a_stable_share_of_request_ids() -> None:
    ids = [f"req-{i}" for i in range(4000)]
    picked = [i for i in ids if sampled(i, 0.25)]
    assert 800 < len(picked) < 1200
    assert picked == [i for i in ids if sampled(i, 0.25)]  # the same ids every time
    assert all(sampled(i, 1.0) for i in ids) and not any(sampled(i, 0.0) for i in ids)


def seed(url: str, user: str, items: list[int], ts: list[int], cats: list[int]) -> None:
    with sync_redis(url) as r:
        r.append(seq_key(user), pack(make_events(items, ts, cats, [1] * len(items))))


def test_export_labels_by_click_or_window_and_resumes(redis_url: str, tmp_path: Path) -> None:
    now = time.time()
    served = int(now)
    # history before the impression; after it: item 6 acted on in the window, item 9
    # acted on too late
    seed(redis_url, "ua", [10, 11, 12], [served - 300, served - 200, served - 100], [1, 2, 3])
    seed(redis_url, "ua", [6, 9], [served + 30, served + 7200], [4, 5])
    seed(redis_url, "ub", [20], [served - 50], [2])

    def go(log: ImpressionLog) -> None:
        log.offer_impression("r1", "ua", "v1", None, [7, 6, 5, 9], [0.9, 0.8, 0.7, 0.6])
        log.offer_impression("r2", "ub", "v1", "stale_state", [20, 21], [0.6, 0.4])
        log.offer_click(Click("r1", "ua", 7, served + 5, 2))  # names its request

    run_log(redis_url, go)
    out = tmp_path / "served.parquet"
    # too early: every impression is within its window, nothing exported or acked
    early = export_served(sync_redis(redis_url), out, shards=4, window_s=3600, now_s=now)
    assert (early.impressions, early.pending, early.out) == (0, 2, None)

    later = now + 3601
    done = export_served(sync_redis(redis_url), out, shards=4, window_s=3600, now_s=later)
    assert (done.impressions, done.pending, done.users) == (2, 0, 2)
    assert done.clicked_by_request_id == 1 and done.positives == 2  # 7 by click, 6 by window
    load_log(out)  # the trainer's own reader accepts it (it raises on a malformed log)
    df = pd.read_parquet(out)
    r1 = df[df.request_id == "r1"].set_index("item_id")
    assert r1["label"].to_dict() == {7: 1, 6: 1, 5: 0, 9: 0}
    assert r1.loc[7, "action"] == 2 and r1.loc[6, "category"] == 4
    history = df[df.request_id == ""]
    assert sorted(history.item_id) == [10, 11, 12, 20]  # before the impressions, labels 1
    assert (history.label == 1).all() and done.history_rows == 4
    # acknowledged: a second run finds nothing new
    again = export_served(sync_redis(redis_url), out, shards=4, window_s=3600, now_s=later)
    assert again.impressions == 0


def test_an_export_that_fails_to_write_acknowledges_nothing(redis_url: str, tmp_path: Path) -> None:
    seed(redis_url, "uc", [1], [1_600_000_000], [1])
    run_log(redis_url, lambda log: log.offer_impression("r9", "uc", "v1", None, [1, 2], [0.5, 0.4]))
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output's folder should be
    later = time.time() + 10
    with pytest.raises(FileExistsError):
        export_served(
            sync_redis(redis_url), blocker / "out.parquet", shards=4, window_s=1, now_s=later
        )
    # the entries the failed run read are pending for this consumer: read again
    done = export_served(
        sync_redis(redis_url), tmp_path / "out.parquet", shards=4, window_s=1, now_s=later
    )
    assert (done.impressions, done.rows, done.history_rows) == (1, 3, 1)
