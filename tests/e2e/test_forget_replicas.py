"""DELETE /users/{id} through one replica reaches the other: two real uvicorn processes on
one Redis, over HTTP. The other replica had the user's state cached and verified (push
mode, with a staleness bound far longer than the test), and drops it on the broadcast:
seen in its metrics, and in its answer once the user starts again with more events than
the forgotten state covered (without the broadcast it would fold them onto that state)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.uvicorn_proc import TOKEN, Service, service_env, two_replicas
from svc_helpers import random_events, seed_sequence, user, wait_until

from service.store.embedded_redis import RedisServer

CANDS = list(range(30))


def call(svc: Service, method: str, path: str, body: Any = None, token: bool = False) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {TOKEN}"
    try:
        conn.request(method, path, json.dumps(body).encode() if body else None, headers)
        r = conn.getresponse()
        payload = json.loads(r.read())
        assert r.status == 200, (method, path, r.status, payload)
        return payload
    finally:
        conn.close()


def scores(svc: Service, u: str) -> list[float]:
    body = call(svc, "POST", "/rank", {"user_id": u, "candidates": CANDS})
    assert body["degraded"] is None
    return [it["score"] for it in sorted(body["items"], key=lambda it: it["item_id"])]


@pytest.fixture
def replicas(
    redis_server: RedisServer, tiny_artifacts: Path, tmp_path: Path
) -> Iterator[tuple[Service, Service]]:
    from conftest import _flushed

    env = service_env(
        _flushed(redis_server),
        tiny_artifacts,
        IFA_WARM_CHECK="push",
        IFA_PUSH_MAX_STALENESS_MS="600000",
    )
    with two_replicas(env, tmp_path) as pair:
        yield pair


@pytest.mark.slow
def test_a_forget_through_one_replica_empties_the_others_cache(
    replicas: tuple[Service, Service], redis_server: RedisServer
) -> None:
    a, b = replicas
    u, twin = user("gone"), user("twin")
    seed_sequence(redis_server.url, u, 300, seed=4)
    history = scores(b, u)  # B builds the state ...
    assert scores(b, u) == history  # ... and verifies it: now answered from B's cache
    answer = call(a, "DELETE", f"/users/{u}", token=True)
    assert answer["removed"]["sequence"] == 1
    assert answer["cached_states_dropped"] == 0  # A never served this user
    wait_until(
        lambda: b.metric("ifa_users_forgotten_total", source="broadcast") == 1,
        what="B heard of the forget",
    )
    assert b.metric("ifa_forgotten_cached_states_total", source="broadcast") == 1
    assert a.metric("ifa_users_forgotten_total", source="request") == 1
    assert a.metric("ifa_users_forgotten_total", source="broadcast") == 0  # its own message
    # the user starts again with more events than B's forgotten state covered
    again = random_events(400, seed=8)
    for who in (u, twin):
        call(a, "POST", "/events", {"user_id": who, "events": again})
    assert scores(b, u) == pytest.approx(scores(b, twin), abs=1e-6)
    assert scores(a, u) == pytest.approx(scores(b, u), abs=1e-6)
