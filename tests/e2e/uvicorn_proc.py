"""The end-to-end tests' service: `loadtest.server.LocalService` (the one launcher, shared
with the bench) configured for tests.

Used by tests/e2e and tests/deploy (as `e2e.uvicorn_proc`):
`Service(service_env(redis_url, artifacts), log_path).start()` waits for /readyz,
`.stop()` sends SIGTERM and reports whether the shutdown was clean.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from loadtest.server import LocalService
from service.store.embedded_redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-admin-token"


class Service(LocalService):
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__(
            env=env,
            redis_url=env["IFA_REDIS_URL"],
            log_path=log_path,
            ready_timeout_s=120.0,
            cwd=ROOT,
            log_level="info",  # the shutdown sequence is in the log
            stop_timeout_s=60.0,
        )

    def stop(self) -> bool:
        return super().stop() and "Application shutdown complete" in self.log()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` (with these labels) on the process' /metrics."""
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


def service_env(redis_url: str, artifacts: Path, **extra: str) -> dict[str, str]:
    env = {
        "IFA_REDIS_URL": redis_url,
        "IFA_ARTIFACTS_DIR": str(artifacts),
        "IFA_MODEL_VERSION": "v1",
        "IFA_WARMUP_CANDIDATES": "1,16",
        "IFA_DEFAULT_BUDGET_MS": "10000",
        "IFA_REDIS_TIMEOUT_MS": "200",
        "IFA_REDIS_COOLDOWN_MS": "100",
        "IFA_ADMIN_TOKEN": TOKEN,
        "IFA_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    }
    env.update(extra)
    return env


def start_service(
    redis_server: RedisServer, artifacts: Path, log_path: Path, **extra_env: str
) -> Service:
    """A started Service on the shared test Redis (restarted first if a test stopped it)."""
    if not redis_server.running():
        redis_server.start()
    svc = Service(service_env(redis_server.url, artifacts, **extra_env), log_path)
    svc.start()
    return svc


@contextmanager
def two_replicas(env: dict[str, str], log_dir: Path) -> Iterator[tuple[Service, Service]]:
    """Two started service processes with the same settings (a.log, b.log), both stopped
    at the end."""
    with ExitStack() as stack:
        a, b = Service(env, log_dir / "a.log"), Service(env, log_dir / "b.log")
        for svc in (a, b):
            svc.start()
            stack.callback(svc.stop)
        yield a, b
