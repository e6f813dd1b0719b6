"""The degradation ladder (docs/design.md §6) with a real Redis that is stopped, hung, restarted."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import make_settings, metric_value, random_events, seed_sequence, user, wait_until

from service.app import create_app
from service.store.embedded_redis import RedisServer

CANDS = [1, 5, 9, 13, 60, 61]


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """The tests here that take `redis_url` run against one Redis and against a cluster."""
    return redis_any


def rank(client: TestClient, u: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/rank", json={"user_id": u, "candidates": CANDS, **extra})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def scores(resp: dict[str, Any]) -> list[float]:
    return [s for _, s in sorted((it["item_id"], it["score"]) for it in resp["items"])]


def test_redis_stopped_then_restarted(private_redis: RedisServer, tiny_artifacts: Path) -> None:
    settings = make_settings(private_redis.url, tiny_artifacts, redis_timeout_ms=200)
    a, b = user("A"), user("B")
    with TestClient(create_app(settings)) as client:
        client.post("/events", json={"user_id": a, "events": random_events(30)})
        client.post("/events", json={"user_id": b, "events": random_events(30)})
        before = rank(client, a)
        assert before["degraded"] is None

        private_redis.stop()  # Redis goes away (snapshot saved)
        for _ in range(5):
            ra, rb = rank(client, a), rank(client, b)
            assert ra["degraded"] == "stale_state"  # A's state was cached in-process
            assert rb["degraded"] == "no_history"  # B was never ranked here
            assert scores(ra) == scores(before)
            assert all(np.isfinite(scores(rb)))
        r = client.post("/events", json={"user_id": a, "events": random_events(1)})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert client.get("/healthz").status_code == 200
        assert metric_value(client, "ifa_rank_degraded_total", reason="stale_state") >= 5
        assert metric_value(client, "ifa_rank_degraded_total", reason="no_history") >= 5
        assert (
            metric_value(client, "ifa_rank_request_duration_seconds_count", outcome="degraded")
            >= 10
        )

        private_redis.start()  # same port and data directory
        after = wait_until(lambda: (x := rank(client, a))["degraded"] is None and x)
        assert scores(after) == scores(before)
        wait_until(lambda: rank(client, b)["degraded"] is None)
        r = client.post("/events", json={"user_id": a, "events": random_events(1)})
        assert r.status_code == 200 and r.json()["length"] == 31


def test_hung_redis_times_out_into_degraded_answers(
    private_redis: RedisServer, tiny_artifacts: Path
) -> None:
    # strict: every request asks Redis (push mode's view of a hung Redis: test_push.py)
    settings = make_settings(
        private_redis.url, tiny_artifacts, redis_timeout_ms=150, warm_check="strict"
    )
    a = user("A")
    assert private_redis.proc is not None
    pid = private_redis.proc.pid
    with TestClient(create_app(settings)) as client:
        client.post("/events", json={"user_id": a, "events": random_events(10)})
        rank(client, a)
        os.kill(pid, signal.SIGSTOP)  # accepts nothing, answers nothing
        try:
            statuses = set()
            for _ in range(3):
                r = client.post("/rank", json={"user_id": a, "candidates": CANDS})
                statuses.add(r.status_code)
                assert r.json()["degraded"] == "stale_state"
                r = client.post("/rank", json={"user_id": user("new"), "candidates": CANDS})
                assert r.json()["degraded"] == "no_history"
            r = client.post("/events", json={"user_id": a, "events": random_events(1)})
            assert r.status_code == 503
            assert client.get("/readyz").status_code == 503
            assert statuses == {200}
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: rank(client, a)["degraded"] is None)


def test_small_budget_gives_partial_state_then_warm(redis_url: str, tiny_artifacts: Path) -> None:
    n = 30_000
    cold, twin = user("cold"), user("twin")
    seed_sequence(redis_url, cold, n, seed=4)
    seed_sequence(redis_url, twin, n, seed=4)
    # a request that waited 10 ms on a loaded box would be shed (503) against this budget:
    # shedding is not what this test is about
    settings = make_settings(redis_url, tiny_artifacts, shed_min_wait_ms=60_000)
    with TestClient(create_app(settings)) as client:
        first = rank(client, cold, budget_ms=0.001)  # nothing fits: the recent tail only
        assert first["degraded"] == "partial_state"
        later = rank(client, cold, budget_ms=60_000)  # shares the background build
        assert later["degraded"] is None
        again = rank(client, cold, budget_ms=60_000)
        assert again["degraded"] is None
        full = rank(client, twin, budget_ms=60_000)  # the same history built in one go
        np.testing.assert_allclose(scores(again), scores(full), atol=1e-4)
        assert scores(first) != scores(full)
        assert metric_value(client, "ifa_rank_degraded_total", reason="partial_state") == 1
        assert metric_value(client, "ifa_state_cache_total", result="hit") >= 1


def test_concurrent_cold_requests_share_one_build(redis_url: str, tiny_artifacts: Path) -> None:
    u = user("cold")
    seed_sequence(redis_url, u, 40_000, seed=2)
    with TestClient(create_app(make_settings(redis_url, tiny_artifacts))) as client:
        out: list[dict[str, Any]] = []
        threads = [
            threading.Thread(target=lambda: out.append(rank(client, u, budget_ms=60_000)))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r["degraded"] for r in out] == [None] * 6
        assert len({tuple(scores(r)) for r in out}) == 1
        assert metric_value(client, "ifa_background_builds_total", result="ok") == 1


def test_overload_is_503_with_retry_after_at_once(redis_url: str, tiny_artifacts: Path) -> None:
    settings = make_settings(redis_url, tiny_artifacts, max_inflight=2)
    with TestClient(create_app(settings)) as client:
        rank = client.app.state.rank  # type: ignore[attr-defined]
        rank.inflight = 2  # two requests are being served
        r = client.post("/rank", json={"user_id": "u", "candidates": CANDS})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        rank.inflight = 0
        assert client.post("/rank", json={"user_id": "u", "candidates": CANDS}).status_code == 200
        assert metric_value(client, "ifa_rank_degraded_total", reason="overloaded") == 1
        assert (
            metric_value(client, "ifa_rank_request_duration_seconds_count", outcome="rejected") == 1
        )
