"""POST /rank and /events through the app (TestClient runs the lifespan): real Redis, real ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import (
    make_settings,
    metric_value,
    random_events,
    seed_sequence,
    sync_redis,
    user,
    wait_until,
)

from ifa_common.records import make_events, unpack
from service.app import create_app
from service.engine.runtime import ModelRuntime
from service.engine.state_resolver import MIN_PARALLEL_PART
from service.store.redis_store import seq_key, state_key

CANDIDATES = [3, 17, 42, 42, 99, 1000, 7, 0, 123456789, 2**62]


def rank(client: TestClient, user_id: str, **body: Any) -> dict[str, Any]:
    r = client.post("/rank", json={"user_id": user_id, "candidates": CANDIDATES, **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def by_item(resp: dict[str, Any]) -> list[tuple[int, float]]:
    return sorted((it["item_id"], it["score"]) for it in resp["items"])


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """Every test here runs against one Redis and against a Redis Cluster."""
    return redis_any


@pytest.fixture
def client(redis_url: str, tiny_artifacts: Path) -> Any:
    with TestClient(create_app(make_settings(redis_url, tiny_artifacts))) as c:
        yield c


def test_rank_equals_the_runtime_run_directly(client: TestClient, tiny_artifacts: Path) -> None:
    u, evs = user(), random_events(40, seed=3)
    assert client.post("/events", json={"user_id": u, "events": evs}).status_code == 200
    resp = rank(client, u, request_id="req-7")
    assert resp["request_id"] == "req-7" and resp["user_id"] == u
    assert resp["model_version"] == "v1" and resp["degraded"] is None
    assert set(resp["timings_ms"]) == {"queue", "redis", "state", "score", "total"}
    assert all(v >= 0 for v in resp["timings_ms"].values())

    rt = ModelRuntime.load(tiny_artifacts, "v1")
    events = make_events(
        [e["item_id"] for e in evs],
        [e["ts"] for e in evs],
        [e.get("category", -1) for e in evs],
        [e["action"] for e in evs],
    )
    logits = rt.score(rt.build_state(events), np.array(CANDIDATES, np.int64)).astype(np.float64)
    probs = 1 / (1 + np.exp(-logits))
    expected = sorted(zip(CANDIDATES, probs.tolist(), strict=True))
    got = by_item(resp)
    assert [g[0] for g in got] == [e[0] for e in expected]
    np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected], atol=1e-6)


def test_inline_scoring_answers_the_same(redis_url: str, tiny_artifacts: Path) -> None:
    u, evs = user(), random_events(25, seed=8)
    answers: list[dict[str, Any]] = []
    for inline_ms in (0.0, 1_000.0):  # always on the pool, then always inline
        settings = make_settings(redis_url, tiny_artifacts, inline_score_ms=inline_ms)
        with TestClient(create_app(settings)) as c:
            if not answers:
                assert c.post("/events", json={"user_id": u, "events": evs}).status_code == 200
            answers.append(rank(c, u))
    assert by_item(answers[0]) == by_item(answers[1])


def test_same_input_same_output_ordering_top_k_duplicates(client: TestClient) -> None:
    u = user()
    client.post("/events", json={"user_id": u, "events": random_events(25, seed=1)})
    a, b = rank(client, u), rank(client, u)
    assert a["items"] == b["items"]
    scores = [it["score"] for it in a["items"]]
    assert len(scores) == len(CANDIDATES)  # duplicates are scored, not merged
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)  # probabilities
    dup = [it["score"] for it in a["items"] if it["item_id"] == 42]
    assert len(dup) == 2 and dup[0] == dup[1]
    top = rank(client, u, top_k=3)
    assert top["items"] == a["items"][:3]
    assert rank(client, u, top_k=10_000)["items"] == a["items"]


def test_user_without_history_gets_finite_scores(client: TestClient) -> None:
    resp = rank(client, user("new"))
    assert resp["degraded"] is None
    assert all(np.isfinite(it["score"]) for it in resp["items"])
    assert resp["request_id"]  # generated when absent


def test_long_history_built_over_every_worker_equals_one_build(
    client: TestClient, redis_url: str, tiny_artifacts: Path
) -> None:
    n = 3 * MIN_PARALLEL_PART + 11  # split over both workers, unevenly
    u = user("long")
    seed_sequence(redis_url, u, n, seed=4)
    resp = rank(client, u)
    assert resp["degraded"] is None and resp["timings_ms"]["state"] > 0
    with sync_redis(redis_url) as r:
        events = unpack(r.get(seq_key(u)) or b"")
    assert events.shape == (n,)
    rt = ModelRuntime.load(tiny_artifacts, "v1")
    logits = rt.score(rt.build_state(events), np.array(CANDIDATES, np.int64)).astype(np.float64)
    want = sorted(zip(CANDIDATES, (1 / (1 + np.exp(-logits))).tolist(), strict=True))
    np.testing.assert_allclose([s for _, s in by_item(resp)], [s for _, s in want], atol=1e-5)


def test_incremental_equals_fresh_across_users_and_restarts(
    redis_url: str, tiny_artifacts: Path
) -> None:
    e1, e2 = random_events(30, seed=5), random_events(12, seed=6, t0=1_800_000_000)
    e3 = random_events(20, seed=7, t0=1_900_000_000)  # longer than the inline tail read
    a, b = user("A"), user("B")
    settings = make_settings(redis_url, tiny_artifacts, refresh_inline_events=16)
    with TestClient(create_app(settings)) as client:
        client.post("/events", json={"user_id": a, "events": e1})
        rank(client, a)  # A's state is built and cached
        client.post("/events", json={"user_id": a, "events": e2})
        ra = rank(client, a)  # refresh: the 12 new records folded in (same round trip)
        client.post("/events", json={"user_id": b, "events": e1 + e2})
        rb = rank(client, b)  # B: built in one go
        assert ra["degraded"] is None and rb["degraded"] is None
        np.testing.assert_allclose(
            [s for _, s in by_item(ra)], [s for _, s in by_item(rb)], atol=1e-4
        )
        assert metric_value(client, "ifa_state_cache_total", result="refresh") >= 1
        client.post("/events", json={"user_id": a, "events": e3})
        ra3 = rank(client, a)  # refresh past the inline cap: a second read
        client.post("/events", json={"user_id": b, "events": e3})
    with TestClient(create_app(settings)) as client:  # restart: states come from Redis
        rb3 = rank(client, b)  # B's stored state is behind by e3: refreshed
        ra_again = rank(client, a)  # A's stored state is current
        assert metric_value(client, "ifa_state_source_total", source="redis") >= 1
        assert metric_value(client, "ifa_state_cache_total", result="miss") == 0
    for x, y in ((ra3, rb3), (ra3, ra_again)):
        np.testing.assert_allclose(
            [s for _, s in by_item(x)], [s for _, s in by_item(y)], atol=1e-4
        )


@pytest.mark.parametrize("damage", ["garbage", "foreign", "nan", "truncated"])
def test_a_bad_state_blob_in_redis_is_dropped_and_rebuilt(
    redis_url: str, tiny_artifacts: Path, damage: str
) -> None:
    u, twin = user("blob"), user("twin")
    events = random_events(40, seed=8)
    settings = make_settings(redis_url, tiny_artifacts)
    with TestClient(create_app(settings)) as client:
        for who in (u, twin):
            client.post("/events", json={"user_id": who, "events": events})
        want = by_item(rank(client, twin))
        rank(client, u)
    key = state_key(u, "v1")
    with sync_redis(redis_url) as r:
        wait_until(lambda: r.exists(key) == 1)  # written back
        good = bytes(r.get(key) or b"")
        bad = {
            "garbage": b"\x00" * 64,
            "foreign": good.replace(b"v1", b"v9", 1),  # another model version's tag
            "nan": good[:-4] + np.float32(np.nan).tobytes(),  # a poisoned last S entry
            "truncated": good[: len(good) // 2],
        }[damage]
        r.set(key, bad)
    with TestClient(create_app(settings)) as client:  # a fresh process: only Redis has it
        got = rank(client, u)
        assert got["degraded"] is None
        np.testing.assert_allclose([s for _, s in by_item(got)], [s for _, s in want], atol=1e-5)
        assert metric_value(client, "ifa_state_source_total", source="redis") == 0
        assert metric_value(client, "ifa_state_source_total", source="build") >= 1


def test_events_defaults_and_idempotency(client: TestClient) -> None:
    u = user()
    body = {"user_id": u, "events": [{"item_id": 7, "ts": 1732700000}], "idempotency_key": "k-1"}
    first = client.post("/events", json=body)
    again = client.post("/events", json=body)
    assert first.json() == again.json() == {"user_id": u, "appended": 1, "length": 1}
    other = client.post("/events", json={**body, "events": [{"item_id": 8, "ts": 1}]})
    assert other.status_code == 409 and "idempotency_key" in other.json()["error"]
    plain = client.post("/events", json={"user_id": u, "events": [{"item_id": 8, "ts": 1}]})
    assert plain.json()["length"] == 2
    assert metric_value(client, "ifa_events_appended_total") == 2
