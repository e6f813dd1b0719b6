"""Two service processes (replicas) on one Redis, and on a Redis Cluster: real uvicorn
processes over HTTP. Events through one are in the other's next answer; a state one
built is reused by the other (no second build); a reload on one leaves the other be."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.http_traffic import Http
from e2e.uvicorn_proc import TOKEN, Service, service_env, two_replicas
from svc_helpers import ClusterUrl, random_events, seed_sequence, sync_redis, user, wait_until

from service.store.redis_store import state_key

CANDS = list(range(30))


def rank(http: Http, u: str) -> dict[str, Any]:
    status, body = http.post("/rank", {"user_id": u, "candidates": CANDS})
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def scores(body: dict[str, Any]) -> list[float]:
    return [it["score"] for it in sorted(body["items"], key=lambda it: it["item_id"])]


@pytest.fixture
def replicas(
    redis_any: str, tiny_artifacts_two_versions: Path, tmp_path: Path
) -> Iterator[tuple[Service, Service]]:
    extra = {"IFA_REDIS_CLUSTER": "true"} if isinstance(redis_any, ClusterUrl) else {}
    env = service_env(redis_any, tiny_artifacts_two_versions, **extra)
    with two_replicas(env, tmp_path) as pair:
        yield pair


def test_events_through_one_are_in_the_others_next_answer(
    replicas: tuple[Service, Service],
) -> None:
    a, b = replicas
    ha, hb = Http(a.port), Http(b.port)
    u = user("rep")
    assert ha.post("/events", {"user_id": u, "events": random_events(20, seed=1)})[0] == 200
    first = rank(hb, u)  # B builds and caches the state of 20 events
    assert scores(rank(hb, u)) == scores(first)  # warm: the same answer
    more = random_events(5, seed=2, t0=1_800_000_000)
    assert ha.post("/events", {"user_id": u, "events": more})[0] == 200
    # B's cached state is behind now: its very next answer has the five new events (B
    # learns of the append by push, or asks Redis; it never answers from the old state)
    after = rank(hb, u)
    assert after["degraded"] is None and scores(after) != scores(first)
    assert scores(after) == pytest.approx(scores(rank(ha, u)), abs=1e-6)


def test_a_state_built_by_one_is_reused_by_the_other(
    replicas: tuple[Service, Service], redis_any: str
) -> None:
    a, b = replicas
    u = user("reuse")
    seed_sequence(redis_any, u, 3000, seed=5)
    built = rank(Http(a.port), u)  # A reads 3000 events and builds
    with sync_redis(redis_any) as r:
        wait_until(lambda: r.exists(state_key(u, "v1")) == 1, what="A wrote the state back")
    builds_before = b.metric("ifa_state_source_total", source="build")
    from_redis_before = b.metric("ifa_state_source_total", source="redis")
    got = rank(Http(b.port), u)
    assert b.metric("ifa_state_source_total", source="redis") == from_redis_before + 1
    assert b.metric("ifa_state_source_total", source="build") == builds_before  # no rebuild
    assert scores(got) == pytest.approx(scores(built), abs=1e-6)


def test_a_reload_on_one_leaves_the_other_serving(replicas: tuple[Service, Service]) -> None:
    a, b = replicas
    ha, hb = Http(a.port), Http(b.port)
    u = user("reload")
    ha.post("/events", {"user_id": u, "events": random_events(10, seed=3)})
    status, body = ha.post("/admin/reload", {"version": "v2"}, token=TOKEN)
    assert status == 200, body
    assert rank(ha, u)["model_version"] == "v2"
    for _ in range(20):  # B is not in A's worker group: it keeps its own model, unharmed
        answer = rank(hb, u)
        assert answer["model_version"] == "v1" and answer["degraded"] is None
