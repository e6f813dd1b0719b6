"""A real service process for benchmarks, load tests and the end-to-end tests: its own
Redis (or a given one), uvicorn, readiness, a graceful stop. The one launcher.

    with LocalService(artifacts_dir="artifacts", log_path=Path("reports/server.log")) as svc:
        svc.redis_url, svc.base_url, svc.pid, svc.settings_env
    svc = LocalService(env=..., redis_url=..., log_path=..., log_level="info").start()
    clean = svc.stop()  # SIGTERM; True when uvicorn shut down gracefully

The Redis is a throwaway `redis-server` on a free port (no persistence), started with the
service's own helper (`service.embedded_redis.RedisServer`); the service is
`python -m uvicorn --factory service.app:app_from_env` with uvloop and httptools, access
log off, configured through `IFA_*` variables only (what a deployment does).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any

# Tuned for a small CPU box where the load generator shares the cores: one ORT thread per
# session (no oversubscription, no spinning), one executor worker per core, Redis on
# loopback. Each can be overridden from the environment (IFA_*), and the effective values
# are recorded in the report.
TUNED_ENV: dict[str, str] = {
    "IFA_INFER_THREADS": "1",
    "IFA_INFER_WORKERS": str(max(1, min(2, os.cpu_count() or 1))),
    "IFA_LOG_LEVEL": "warning",
    "IFA_MAX_INFLIGHT": "64",
    "IFA_REDIS_TIMEOUT_MS": "200",
    # stop() is the end of a run, not a rollout: no drain window (a test sets its own)
    "IFA_DRAIN_S": "0",
    # the open loop opens its connections up front and may leave some unused for a whole
    # run: the head timeout (10 s by default) must not close them under it
    "IFA_HEADER_TIMEOUT_S": "120",
}


def uvicorn_command(host: str, port: int, log_level: str = "warning") -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "service.app:app_from_env",
        "--host",
        host,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "service.http.arrival:ArrivalHttpToolsProtocol",
        "--no-access-log",
        "--log-level",
        log_level,
        "--timeout-keep-alive",
        "60",
    ]


def http_json(url: str, timeout: float = 5.0, data: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"null")
        except ValueError:
            return e.code, body.decode(errors="replace")


class LocalService:
    """Redis + the ranking service as child processes; stopped on exit."""

    def __init__(
        self,
        artifacts_dir: str | Path | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        redis_url: str | None = None,
        ready_timeout_s: float = 180.0,
        cwd: str | Path | None = None,
        log_level: str = "warning",
        stop_timeout_s: float = 15.0,
        workers: int = 1,
    ) -> None:
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.redis_url = redis_url
        self.ready_timeout_s = ready_timeout_s
        self.cwd = cwd  # where `service` is imported from (A/B runs of a patched copy)
        self.log_level = log_level  # uvicorn's own (info shows the shutdown sequence)
        self.stop_timeout_s = stop_timeout_s
        self.workers = workers  # > 1: uvicorn's worker processes, metrics merged as in serve
        self._metrics_dir: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self._redis: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: IO[bytes] | None = None
        self.settings_env: dict[str, str] = {}

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start_redis(self) -> str:
        from service.store.embedded_redis import RedisServer, free_port

        if self.redis_url is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ifa-bench-redis-")
            self._redis = RedisServer(Path(self._tmp.name), port=free_port(), persist=False)
            self._redis.start()
            self.redis_url = str(self._redis.url)
        return self.redis_url

    def start_service(self) -> None:
        from service.store.embedded_redis import free_port

        redis_url = self.start_redis()
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IFA_")}
        settings = dict(TUNED_ENV)
        settings.update({k: v for k, v in os.environ.items() if k.startswith("IFA_")})
        settings.pop("IFA_ADMIN_TOKEN", None)  # never inherited; a caller may pass one
        if self._redis is not None:  # its own throwaway server is one node, never a cluster
            settings["IFA_REDIS_CLUSTER"] = "false"
        settings.update(self.extra_env)
        settings["IFA_REDIS_URL"] = redis_url
        if self.artifacts_dir is not None:
            settings["IFA_ARTIFACTS_DIR"] = str(self.artifacts_dir.resolve())
        self.settings_env = dict(sorted(settings.items()))
        env.update(settings)
        command = uvicorn_command(self.host, self.port, self.log_level)
        if self.workers > 1:  # what `ifa-rank serve --workers N` prepares (service/commands.py)
            self._metrics_dir = tempfile.TemporaryDirectory(prefix="ifa-metrics-")
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir.name
            env["IFA_WORKER_GROUP"] = uuid.uuid4().hex[:16]
            command += ["--workers", str(self.workers)]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            command,
            env=env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"service exited with {self.proc.returncode} before it was ready"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            with contextlib.suppress(OSError):
                status, last = http_json(self.base_url + "/readyz", timeout=2.0)
                if status == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"service not ready after {self.ready_timeout_s}s: {last}")

    def start(self) -> LocalService:
        """Start Redis (unless given) and the service, wait for /readyz; returns self."""
        self.start_service()
        return self

    def stop(self) -> bool:
        """SIGTERM: drain, flush states, close. True when the service shut down cleanly
        (uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM counts)."""
        proc, self.proc = self.proc, None
        clean = True
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
            try:
                clean = proc.wait(self.stop_timeout_s) in (0, -signal.SIGTERM)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                clean = False
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._metrics_dir is not None:
            self._metrics_dir.cleanup()
            self._metrics_dir = None
        return clean

    def log(self) -> str:
        """The service's output so far ('' without a log file)."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def __enter__(self) -> LocalService:
        try:
            self.start_service()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
