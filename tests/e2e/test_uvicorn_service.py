"""End to end: a real `uvicorn --factory service.app:app_from_env` process, real Redis, HTTP."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e.uvicorn_proc import Service, service_env, start_service
from prometheus_client.parser import text_string_to_metric_families
from svc_helpers import wait_until

from service.store.embedded_redis import RedisServer

T0 = 1_700_000_000


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("e2e") / "service.log"
    svc = start_service(redis_server, tiny_artifacts, log)
    yield svc
    assert svc.stop(), log.read_text()[-3000:]


def events(n: int, seed: int, t0: int = T0) -> list[dict[str, int]]:
    rng = np.random.default_rng(seed)
    return [
        {"item_id": int(rng.integers(0, 80)), "ts": t0 + 60 * i, "action": int(rng.integers(0, 3))}
        for i in range(n)
    ]


def by_item(resp: dict[str, Any]) -> list[float]:
    return [s for _, s in sorted((it["item_id"], it["score"]) for it in resp["items"])]


def test_contract_over_http(service: Service) -> None:
    with httpx.Client(base_url=service.base_url, timeout=30) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.post(
            "/events", json={"user_id": "e2e-u1", "events": events(20, 1), "idempotency_key": "b1"}
        )
        assert r.json() == {"user_id": "e2e-u1", "appended": 20, "length": 20}
        assert (
            c.post(
                "/events",
                json={"user_id": "e2e-u1", "events": events(20, 1), "idempotency_key": "b1"},
            ).json()["length"]
            == 20
        )
        r = c.post(
            "/rank",
            json={"user_id": "e2e-u1", "candidates": [5, 6, 7, 7], "top_k": 3, "request_id": "r1"},
        )
        body = r.json()
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert set(body) == {
            "user_id",
            "request_id",
            "model_version",
            "items",
            "degraded",
            "timings_ms",
        }
        assert body["request_id"] == "r1" and len(body["items"]) == 3 and body["degraded"] is None
        assert c.get("/v1/model").json()["version"] == "v1"
        metrics = c.get("/metrics").text
        for name in (
            "ifa_rank_request_duration_seconds_bucket",
            "ifa_model_info",
            "ifa_inflight_requests",
        ):
            assert name in metrics
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
        for path in (
            "/rank",
            "/events",
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/model",
            "/admin/reload",
        ):
            assert path in spec["paths"]


def test_garbage_never_5xx(service: Service) -> None:
    rng = np.random.default_rng(0)
    bodies: list[bytes] = [
        bytes(rng.integers(0, 256, 64, dtype=np.uint8)),
        b"[" * 5000 + b"]" * 5000,
        b'{"user_id": "u", "candidates": [1e999]}',
        b'{"user_id": "u", "candidates": [123456789012345678901234567890]}',
        b'{"user_id": "u", "candidates": [1], "top_k": 1e5}',
        b'{"user_id": "u", "candidates": [1], "budget_ms": NaN}',
        b'{"user_id": "\\u0000", "candidates": [1]}',
        b'{"user_id": "u", "events": [{"item_id": 1, "ts": 1, "category": null, "action": null}]}',
    ]
    with httpx.Client(base_url=service.base_url, timeout=30) as c:
        for body in bodies:
            for path in ("/rank", "/events", "/admin/reload"):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code < 500, (path, body[:60], r.status_code, r.text)
        r = c.post("/rank", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
        assert r.status_code == 413


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_a_client_that_drops_mid_body_is_not_a_server_error(service: Service) -> None:
    url = httpx.URL(service.base_url)
    head = (
        b"POST /rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\n\r\n"
    )
    for _ in range(5):
        with socket.create_connection((url.host, url.port or 80), timeout=10) as sock:
            sock.sendall(head + b'{"user_id": "gone", "candid')  # 27 of 1,000 bytes, then away
    with httpx.Client(base_url=service.base_url, timeout=30) as c:

        def dropped() -> float:
            text = c.get("/metrics").text
            return _sample(text, "ifa_http_responses_total", route="/rank", code="499")

        wait_until(lambda: dropped() >= 5)
        text = c.get("/metrics").text
        assert _sample(text, "ifa_http_responses_total", route="/rank", code="500") == 0
        r = c.post("/rank", json={"user_id": "after-drop", "candidates": [1, 2]})
        assert r.status_code == 200  # and the service answers the next request normally


def test_incremental_equals_fresh_across_a_process_restart(
    redis_server: RedisServer, tiny_artifacts: Path, tmp_path: Path
) -> None:
    if not redis_server.running():
        redis_server.start()
    e1, e2 = events(50, 11), events(30, 12, t0=T0 + 10_000_000)
    cands = list(range(0, 90, 3))
    svc = Service(service_env(redis_server.url, tiny_artifacts), tmp_path / "svc.log").start()
    try:
        with httpx.Client(base_url=svc.base_url, timeout=30) as c:
            c.post("/events", json={"user_id": "inc-A", "events": e1})
            c.post("/rank", json={"user_id": "inc-A", "candidates": cands})
            c.post("/events", json={"user_id": "inc-A", "events": e2})
            ra = c.post("/rank", json={"user_id": "inc-A", "candidates": cands}).json()
            c.post("/events", json={"user_id": "inc-B", "events": e1 + e2})
            rb = c.post("/rank", json={"user_id": "inc-B", "candidates": cands}).json()
    finally:
        assert svc.stop()
    np.testing.assert_allclose(by_item(ra), by_item(rb), atol=1e-4)
    svc.start()  # a fresh process: the in-process cache is empty, Redis holds the states
    try:
        with httpx.Client(base_url=svc.base_url, timeout=30) as c:
            ra2 = c.post("/rank", json={"user_id": "inc-A", "candidates": cands}).json()
            rb2 = c.post("/rank", json={"user_id": "inc-B", "candidates": cands}).json()
            text = c.get("/metrics").text
    finally:
        svc.stop()
    np.testing.assert_allclose(by_item(ra2), by_item(ra), atol=1e-4)
    np.testing.assert_allclose(by_item(rb2), by_item(rb), atol=1e-4)
    assert 'ifa_state_source_total{source="redis"} 2.0' in text


def test_redis_killed_and_restarted_under_load(
    private_redis: RedisServer, tiny_artifacts: Path, tmp_path: Path
) -> None:
    svc = Service(service_env(private_redis.url, tiny_artifacts), tmp_path / "svc.log").start()
    statuses: list[int] = []
    degraded: list[str | None] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=svc.base_url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                u = f"load-{worker}-{i % 5}"
                r = c.post("/rank", json={"user_id": u, "candidates": [1, 2, 3, 4]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    degraded.append(r.json()["degraded"])
                i += 1

    try:
        with httpx.Client(base_url=svc.base_url, timeout=30) as c:
            for w in range(3):
                for j in range(5):
                    c.post(
                        "/events",
                        json={"user_id": f"load-{w}-{j}", "events": events(10, w * 10 + j)},
                    )
        threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(statuses) >= 30, 60)
        private_redis.kill()  # a crash, under load
        wait_until(lambda: degraded.count("stale_state") + degraded.count("no_history") >= 20, 60)
        private_redis.start()
        mark = len(degraded)
        wait_until(lambda: degraded[mark:].count(None) >= 30, 60)
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        svc.stop()
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))


def test_serve_rejects_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from service.commands import serve

    assert serve(argparse.Namespace(host="127.0.0.1", port=0, workers=0)) == 2
    assert "at least 1" in capsys.readouterr().err
