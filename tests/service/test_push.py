"""Warm requests without a Redis round trip, kept correct by pushed invalidations: a real
Redis (CLIENT TRACKING in broadcast mode), the real app, the exported model. A strict-mode
app on the same Redis is the reference answer."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import (
    ClusterUrl,
    make_settings,
    metric_value,
    push_and_strict,
    random_events,
    seed_sequence,
    sync_redis,
    user,
    wait_until,
)

from service.app import create_app
from service.engine.freshness import Freshness
from service.store.embedded_redis import RedisServer

CANDS = list(range(40))


def snapshots(url: str) -> int:
    """EVALSHA calls the server has run (the snapshot script is the warm path's one call)."""
    with sync_redis(url) as r:
        if isinstance(url, ClusterUrl):
            per_node: dict[str, Any] = r.info("commandstats", target_nodes=r.PRIMARIES)
        else:
            per_node = {"redis": r.info("commandstats")}
    return sum(int(s.get("cmdstat_evalsha", {}).get("calls", 0)) for s in per_node.values())


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """Every test here runs against one Redis and against a Redis Cluster."""
    return redis_any


def scores(client: TestClient, u: str) -> list[float]:
    r = client.post("/rank", json={"user_id": u, "candidates": CANDS})
    assert r.status_code == 200, r.text
    return [it["score"] for it in sorted(r.json()["items"], key=lambda it: it["item_id"])]


def verified_user(push: TestClient, redis_url: str, n: int) -> tuple[str, list[float]]:
    """A user with n events whose state the push app has built (first answer) and verified
    against Redis (second answer); returns the user and that answer's scores."""
    u = user()
    seed_sequence(redis_url, u, n)
    scores(push, u)
    return u, scores(push, u)


@pytest.fixture
def apps(redis_url: str, tiny_artifacts: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with push_and_strict(redis_url, tiny_artifacts) as (push, strict):
        wait_until(lambda: metric_value(push, "ifa_push_channel_up") == 1)
        yield push, strict


def test_a_warm_user_is_answered_without_asking_redis(
    apps: tuple[TestClient, TestClient], redis_url: str
) -> None:
    push, strict = apps
    u = user()
    seed_sequence(redis_url, u, 300)
    first = scores(push, u)  # builds
    scores(push, u)  # the read that verifies it
    before = snapshots(redis_url)
    again = [scores(push, u) for _ in range(20)]
    assert snapshots(redis_url) == before  # twenty answers, no Redis call
    assert all(a == first for a in again)
    np.testing.assert_allclose(first, scores(strict, u), atol=1e-6)
    before = snapshots(redis_url)
    for _ in range(5):
        scores(strict, u)
    assert snapshots(redis_url) - before == 5  # strict mode: one call per request


def test_an_append_through_this_replica_is_in_the_next_answer(
    apps: tuple[TestClient, TestClient], redis_url: str
) -> None:
    push, strict = apps
    u, old = verified_user(push, redis_url, 200)
    r = push.post("/events", json={"user_id": u, "events": random_events(30, seed=5)})
    assert r.status_code == 200
    new = scores(push, u)  # no wait: the append was acknowledged by this replica
    assert new != old
    np.testing.assert_allclose(new, scores(strict, u), atol=1e-6)


def test_an_append_elsewhere_reaches_this_replica_by_push(
    apps: tuple[TestClient, TestClient], redis_url: str
) -> None:
    push, strict = apps
    u, old = verified_user(push, redis_url, 200)
    heard = metric_value(push, "ifa_push_invalidations_total")
    r = strict.post("/events", json={"user_id": u, "events": random_events(30, seed=6)})
    assert r.status_code == 200
    wait_until(lambda: metric_value(push, "ifa_push_invalidations_total") > heard)
    new = scores(push, u)
    assert new != old
    np.testing.assert_allclose(new, scores(strict, u), atol=1e-6)


def test_a_broken_channel_falls_back_to_asking_redis(
    apps: tuple[TestClient, TestClient], redis_url: str
) -> None:
    push, _ = apps
    listener = push.app.state.push  # type: ignore[attr-defined]
    u = user()
    seed_sequence(redis_url, u, 100)
    scores(push, u)
    scores(push, u)
    with sync_redis(redis_url) as r:
        kill = {"target_nodes": r.PRIMARIES} if isinstance(redis_url, ClusterUrl) else {}
        r.client_kill_filter(_type="pubsub", **kill)  # the channel's subscriber connection
    wait_until(lambda: listener.sessions >= 2)  # noticed, forgot, reconnected
    before = snapshots(redis_url)
    scores(push, u)  # what it knew before the break is not trusted: asked again
    assert snapshots(redis_url) - before == 1
    scores(push, u)
    assert snapshots(redis_url) - before == 1  # and verified again


def test_a_user_asked_for_often_is_rechecked_off_the_request_path(
    redis_url: str, tiny_artifacts: Path
) -> None:
    """Past half the staleness bound a warm user's length is re-read in the background:
    Redis is asked (the bound holds), but no answer waits for it."""
    with push_and_strict(redis_url, tiny_artifacts, push_max_staleness_ms=200) as (push, _):
        wait_until(lambda: metric_value(push, "ifa_push_channel_up") == 1)
        u = user()
        seed_sequence(redis_url, u, 100)
        scores(push, u)
        scores(push, u)  # verified
        before = snapshots(redis_url)
        waited = []
        for _ in range(40):  # 40 x 25 ms: well past the 200 ms bound, several times
            r = push.post("/rank", json={"user_id": u, "candidates": CANDS})
            assert r.status_code == 200 and r.json()["degraded"] is None
            waited.append(r.json()["timings_ms"]["redis"])
            time.sleep(0.025)
        assert snapshots(redis_url) - before >= 2  # re-checked, more than once
        assert waited == [0.0] * 40  # by none of the answers


def test_freshness_due_halfway_once_per_read() -> None:
    now = [0.0]
    f = Freshness(capacity=4, max_age_s=1.0, clock=lambda: now[0])
    f.set_up(True)
    f.end("a", f.begin("a"), 5)
    assert not f.due("a") and not f.due("nobody")
    now[0] = 0.6
    assert f.due("a") and f.fresh("a", 5)  # due for a re-check, still fresh meanwhile
    token = f.begin("a")
    assert not f.due("a")  # one re-check at a time
    f.end("a", token, 5)
    assert not f.due("a") and f.fresh("a", 5)  # renewed at 0.6
    now[0] = 1.5
    assert f.fresh("a", 5)
    f.end("a", f.begin("a"), 7)  # the re-check saw appends whose push was lost
    assert not f.fresh("a", 5)  # the cached state no longer counts as current


def test_freshness_race_age_and_capacity() -> None:
    now = [0.0]
    f = Freshness(capacity=2, max_age_s=1.0, clock=lambda: now[0])
    assert not f.fresh("a", 5)  # nothing while the channel is down
    f.set_up(True)
    token = f.begin("a")
    f.invalidate("a")  # an append lands while the read is in flight
    f.end("a", token, 5)
    assert not f.fresh("a", 5)  # the read may predate it: not trusted
    f.end("a", f.begin("a"), 5)
    assert f.fresh("a", 5) and not f.fresh("a", 6)
    now[0] = 1.5
    assert not f.fresh("a", 5)  # older than max_age: asked again
    token = f.begin("b")
    f.set_up(False)
    f.set_up(True)
    f.end("b", token, 3)  # read across a reconnect: pushes may have been missed
    assert not f.fresh("b", 3)
    for u in ("c", "d", "e"):
        f.end(u, f.begin(u), 1)
    assert len(f) == 2 and not f.fresh("c", 1) and f.fresh("e", 1)


def test_a_hung_redis_stops_the_channel_then_answers_are_flagged_stale(
    private_redis: RedisServer, tiny_artifacts: Path
) -> None:
    settings = make_settings(private_redis.url, tiny_artifacts, redis_timeout_ms=150)
    u = user()
    assert private_redis.proc is not None
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: metric_value(client, "ifa_push_channel_up") == 1)
        client.post("/events", json={"user_id": u, "events": random_events(10)})
        scores(client, u)
        os.kill(private_redis.proc.pid, signal.SIGSTOP)  # no pong, no append, no answer
        try:
            # nobody can append to a hung Redis, so the cached state stays current until
            # the missing pongs end the channel; from then on answers are flagged
            wait_until(lambda: metric_value(client, "ifa_push_channel_up") == 0)
            r = client.post("/rank", json={"user_id": u, "candidates": CANDS})
            assert r.status_code == 200 and r.json()["degraded"] == "stale_state"
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        wait_until(lambda: metric_value(client, "ifa_push_channel_up") == 1)
        wait_until(
            lambda: (
                client.post("/rank", json={"user_id": u, "candidates": CANDS}).json()["degraded"]
                is None
            )
        )
