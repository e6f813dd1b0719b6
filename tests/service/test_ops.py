"""Operations: metrics, liveness vs readiness, model info, hot reload, embedded Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_version
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from svc_helpers import make_settings, metric_value, random_events, sync_redis, user, wait_until

from service.app import create_app
from service.metrics import CONTRACT_METRICS
from service.store.embedded_redis import RedisServer
from service.store.redis_store import state_key

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """The tests here that take `redis_url` run against one Redis and against a cluster."""
    return redis_any


def families(client: TestClient) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}


def test_metrics_expose_the_contract(redis_url: str, tiny_artifacts: Path) -> None:
    with TestClient(create_app(make_settings(redis_url, tiny_artifacts))) as client:
        u = user()
        client.post("/events", json={"user_id": u, "events": random_events(5)})
        for _ in range(3):
            assert (
                client.post("/rank", json={"user_id": u, "candidates": [1, 2, 3]}).status_code
                == 200
            )
        client.post("/rank", json={"user_id": u, "candidates": []})  # a 422
        for path in ("/healthz", "/readyz", "/metrics", "/metrics"):
            client.get(path)
        fams = families(client)
        kinds = {
            "ifa_rank_request_duration_seconds": "histogram",
            "ifa_rank_stage_duration_seconds": "histogram",
            "ifa_state_cache": "counter",
            "ifa_rank_degraded": "counter",
            "ifa_rank_candidates": "histogram",
            "ifa_sequence_length": "histogram",
            "ifa_inflight_requests": "gauge",
            "ifa_events_appended": "counter",
            "ifa_model_info": "gauge",
        }
        for name, kind in kinds.items():
            assert fams[name].type == kind, name
        text = client.get("/metrics").text
        for name in CONTRACT_METRICS:
            assert name in text, name
        assert 'ifa_model_info{provider="cpu",role="stable",version="v1"} 1.0' in text
        for reason in ("partial_state", "stale_state", "no_history"):
            assert f'ifa_rank_degraded_total{{reason="{reason}",version="v1"}}' in text
        for stage in ("redis", "state", "score", "serialize"):
            assert metric_value(client, "ifa_rank_stage_duration_seconds_count", stage=stage) == 3
        assert metric_value(client, "ifa_rank_request_duration_seconds_count", outcome="ok") == 3
        assert metric_value(client, "ifa_rank_request_duration_seconds_count", outcome="error") == 1
        assert 'le="0.0005"' in text and 'le="1.0"' in text
        assert metric_value(client, "ifa_events_appended_total") == 5
        assert metric_value(client, "ifa_rank_candidates_count") == 3
        # health and metrics endpoints are not counted as requests
        assert "/healthz" not in text and "/metrics" not in text and "/readyz" not in text
        assert metric_value(client, "ifa_inflight_requests") == 0


def test_not_ready_without_a_model_but_alive(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path / "empty", admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and "model" in r.json()["reason"]
        r = client.post("/rank", json={"user_id": "u", "candidates": [1]})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert client.get("/v1/model").status_code == 503
        r = client.post("/admin/reload", json={"version": "v9"}, headers=AUTH)
        assert r.status_code == 404, r.text


def test_readyz_503_when_redis_is_down_healthz_stays_200(
    private_redis: RedisServer, tiny_artifacts: Path
) -> None:
    settings = make_settings(private_redis.url, tiny_artifacts, redis_timeout_ms=200)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "ok"
        assert ready.json()["redis_mode"].startswith("external")
        private_redis.kill()
        r = client.get("/readyz")
        assert r.status_code == 503 and "redis" in r.json()["reason"]
        assert client.get("/healthz").status_code == 200
        private_redis.start()
        wait_until(lambda: client.get("/readyz").status_code == 200)


def test_model_info(redis_url: str, tiny_artifacts: Path) -> None:
    with TestClient(create_app(make_settings(redis_url, tiny_artifacts))) as client:
        info = client.get("/v1/model").json()
        assert info["version"] == "v1" and info["provider"] == "cpu"
        assert info["providers"] == ["CPUExecutionProvider"]
        assert info["dims"] == {"heads": 2, "d_phi": 8, "d_head": 4}
        assert "state.onnx" in info["manifest"]["files"]


def test_admin_reload_auth(redis_url: str, tiny_artifacts: Path) -> None:
    with TestClient(create_app(make_settings(redis_url, tiny_artifacts))) as client:
        assert client.post("/admin/reload", headers=AUTH).status_code == 404  # no token set
    settings = make_settings(redis_url, tiny_artifacts, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        assert client.post("/admin/reload").status_code == 401
        r = client.post("/admin/reload", headers={"authorization": "Bearer wrong-token"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = client.post("/admin/reload", headers={"authorization": TOKEN})  # no scheme
        assert r.status_code == 401
        r = client.post("/admin/reload", json={"version": "../etc"}, headers=AUTH)
        assert r.status_code == 422
        r = client.post("/admin/reload", json={"version": "nope"}, headers=AUTH)
        assert r.status_code == 404
        assert client.get("/v1/model").json()["version"] == "v1"  # still serving


def test_reload_to_a_hash_consistent_but_malformed_artifact_is_a_422(
    redis_url: str, tiny_artifacts: Path, tmp_path: Path
) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, root, symlinks=True)
    copy_version(root, "v1", "listed")
    (root / "listed" / "manifest.json").write_text("[]")
    copy_version(root, "v1", "headless")
    manifest = json.loads((root / "headless" / "manifest.json").read_text())
    del manifest["dims"]["heads"]
    (root / "headless" / "manifest.json").write_text(json.dumps(manifest))
    settings = make_settings(redis_url, root, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        for version, names in (("listed", "JSON object"), ("headless", "heads")):
            r = client.post("/admin/reload", json={"version": version}, headers=AUTH)
            assert r.status_code == 422 and names in r.json()["detail"], r.text
        assert client.get("/v1/model").json()["version"] == "v1"  # still serving
        r = client.post("/rank", json={"user_id": user(), "candidates": [1, 2]})
        assert r.status_code == 200 and r.json()["model_version"] == "v1"


def test_reload_under_load_loses_no_request_and_drops_old_states(
    redis_url: str, tiny_artifacts_two_versions: Path
) -> None:
    settings = make_settings(redis_url, tiny_artifacts_two_versions, admin_token=TOKEN)
    u = user()
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()
    with TestClient(create_app(settings)) as client:
        client.post("/events", json={"user_id": u, "events": random_events(20)})

        def stream() -> None:
            while not stop.is_set():
                r = client.post("/rank", json={"user_id": u, "candidates": [1, 2, 3]})
                results.append((r.status_code, r.json().get("model_version")))

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 10)
        r = client.post("/admin/reload", json={"version": "v2"}, headers=AUTH)
        assert r.status_code == 200 and r.json() == {
            "version": "v2",
            "previous": "v1",
            "provider": "cpu",
        }
        wait_until(lambda: sum(v == "v2" for _, v in results) >= 10)
        stop.set()
        for t in threads:
            t.join()
        misses_v2 = metric_value(client, "ifa_state_cache_total", result="miss")
        assert client.get("/v1/model").json()["version"] == "v2"
        assert (
            'ifa_model_info{provider="cpu",role="stable",version="v2"} 1.0'
            in client.get("/metrics").text
        )
        # the old version's ifa_model_info series is gone (its request histograms stay a
        # while: the dashboard compares the versions across the swap)
        assert 'ifa_model_info{provider="cpu",role="stable",version="v1"}' not in (
            client.get("/metrics").text
        )
    assert all(code == 200 for code, _ in results), {c for c, _ in results}
    versions = [v for _, v in results]
    assert set(versions) == {"v1", "v2"}
    assert misses_v2 >= 2  # the v2 slot rebuilt the user: a v1 state was never applied
    with sync_redis(redis_url) as c:
        assert c.exists(state_key(u, "v1")) and c.exists(state_key(u, "v2"))


def test_embedded_redis_when_no_url(tmp_path: Path, tiny_artifacts: Path) -> None:
    settings = make_settings(None, tiny_artifacts, embedded_redis_dir=tmp_path / "r")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["redis_mode"].startswith("embedded")
        u = user()
        assert (
            client.post("/events", json={"user_id": u, "events": random_events(3)}).json()["length"]
            == 3
        )
        assert client.post("/rank", json={"user_id": u, "candidates": [1]}).status_code == 200
    assert (tmp_path / "r" / "redis.log").exists()
    with TestClient(create_app(settings)) as client:  # data survives a restart
        r = client.post("/events", json={"user_id": u, "events": random_events(1)})
        assert r.json()["length"] == 4
        server = client.app.state.embedded_redis  # type: ignore[attr-defined]
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)  # the server crashes...
        wait_until(lambda: client.get("/readyz").status_code == 200)  # ...and is restarted
        wait_until(
            lambda: (
                client.post("/rank", json={"user_id": u, "candidates": [1, 2]}).json()["degraded"]
                is None
            )
        )
        r = client.post("/events", json={"user_id": u, "events": random_events(1)})
        assert r.json()["length"] in (4, 5)  # the AOF keeps all but the last second


def test_admin_auth_comes_before_the_body_and_the_schema_says_so(
    redis_url: str, tiny_artifacts: Path
) -> None:
    settings = make_settings(redis_url, tiny_artifacts, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        for body in (b"{not json", b'{"version": 7}', b'{"version": "../../etc"}'):
            r = client.post("/admin/reload", content=body)
            assert r.status_code == 401, (body, r.text)  # no token: 401 whatever the body
        r = client.post("/admin/reload", content=b"{not json", headers=AUTH)
        assert r.status_code == 422 and "body" in r.json()["error"]
        spec = client.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
        assert spec["paths"]["/admin/reload"]["post"]["security"] == [{"adminToken": []}]
        assert "requestBody" in spec["paths"]["/admin/reload"]["post"]
        assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
