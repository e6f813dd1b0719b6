"""A real `uvicorn --factory service.app:app_from_env` process for tests (shared helper).

Used by tests/e2e (imported as `uvicorn_proc`) and tests/deploy (as `e2e.uvicorn_proc`):
`Service(service_env(redis_url, artifacts), log_path).start()` waits for /readyz,
`.stop()` sends SIGTERM and reports whether the shutdown was clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-admin-token"


class Service:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        cmd = [
            sys.executable, "-m", "uvicorn", "--factory", "service.app:app_from_env",
            "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service not ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> bool:
        """SIGTERM: drain, flush states, close. True when it shut down cleanly (uvicorn
        re-raises the signal after a graceful shutdown, so -SIGTERM counts as clean)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return True
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False
        return rc in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


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
