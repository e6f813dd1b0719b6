"""`ifa-rank serve --workers 2` as a real process tree: one embedded Redis started by the
parent for both workers, /metrics merged over the workers, a reload on one worker
followed by the other, a clean stop."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from e2e.uvicorn_proc import ROOT, TOKEN
from svc_helpers import wait_until

from service.store.embedded_redis import free_port


def request(
    port: int, method: str, path: str, body: dict[str, object] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
        conn.request(method, path, json.dumps(body).encode() if body else None, headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def versions(port: int, n: int) -> set[str]:
    """The model versions of n /rank answers sent at once on fresh connections (so the
    kernel hands them to either worker)."""
    body: dict[str, object] = {"user_id": "w-u", "candidates": [1, 2, 3]}
    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(lambda _: request(port, "POST", "/rank", body), range(n)))
    assert all(status == 200 for status, _ in out), out[:3]
    return {json.loads(payload)["model_version"] for _, payload in out}


def test_two_workers_share_redis_metrics_and_reloads(
    tiny_artifacts_two_versions: Path, tmp_path: Path
) -> None:
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "IFA_ARTIFACTS_DIR": str(tiny_artifacts_two_versions),
        "IFA_MODEL_VERSION": "v1",
        "IFA_WARMUP_CANDIDATES": "1,16",
        "IFA_DEFAULT_BUDGET_MS": "10000",
        "IFA_ADMIN_TOKEN": TOKEN,
        "IFA_EMBEDDED_REDIS_DIR": str(tmp_path / "redis"),
        "IFA_DRAIN_S": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    env.pop("IFA_REDIS_URL", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ifa_rank.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: request(port, "GET", "/readyz")[0] == 200, timeout_s=120, tolerate=(OSError,)
        )
        wait_until(lambda: versions(port, 16) == {"v1"}, timeout_s=60)
        sent = 200
        assert versions(port, sent) == {"v1"}
        # both workers answered, and /metrics from either one counts every answer
        pids = {f.name.rsplit("_", 1)[-1] for f in metrics_dir.glob("counter_*.db")}
        assert len(pids) == 2, sorted(metrics_dir.iterdir())
        status, text = request(port, "GET", "/metrics")
        line = next(
            ln
            for ln in text.decode().splitlines()
            if ln.startswith('ifa_http_responses_total{code="200",route="/rank"}')
        )
        assert float(line.split()[-1]) >= sent
        # a reload on one worker is announced to the other, which follows
        status, payload = request(port, "POST", "/admin/reload", {"version": "v2"})
        assert status == 200, payload
        wait_until(lambda: versions(port, 32) == {"v2"}, timeout_s=60)
        _, text = request(port, "GET", "/metrics")
        assert 'ifa_model_info{provider="cpu",role="stable",version="v2"} 1.0' in text.decode()
        assert (tmp_path / "redis").is_dir()  # the parent's embedded Redis
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code in (0, -signal.SIGTERM), output[-3000:]
    assert "embedded redis-server for the workers" in output
    assert output.count("Application shutdown complete") == 2, output[-3000:]
