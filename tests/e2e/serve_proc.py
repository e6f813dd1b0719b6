"""`ifa-rank serve --workers 2` as a real process tree for the e2e tests: started on a free
port with its own embedded Redis and a multiprocess metrics folder, stopped with SIGTERM.

    with ServeWorkers(artifacts, tmp_path) as serve:
        request(serve.port, "POST", "/rank", {...})
    serve.exit_code, serve.output()
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO

from e2e.uvicorn_proc import ROOT, TOKEN
from svc_helpers import wait_until

from service.store.embedded_redis import free_port


def request(
    port: int, method: str, path: str, body: dict[str, object] | None = None
) -> tuple[int, bytes]:
    """One call on a fresh connection (so the kernel hands it to either worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
        conn.request(method, path, json.dumps(body).encode() if body else None, headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def versions(port: int, user_id: str, n: int = 32) -> set[str]:
    """The model versions of n /rank answers for `user_id`, sent 8 at a time."""
    body: dict[str, object] = {"user_id": user_id, "candidates": [1, 2, 3]}
    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(lambda _: request(port, "POST", "/rank", body), range(n)))
    assert all(status == 200 for status, _ in out), out[:3]
    return {json.loads(payload)["model_version"] for _, payload in out}


class ServeWorkers:
    def __init__(self, artifacts: Path, tmp_path: Path, workers: int = 2) -> None:
        self.port = free_port()
        self.metrics_dir = tmp_path / "metrics"
        self.redis_dir = tmp_path / "redis"
        self.log_path = tmp_path / "serve.log"
        self.workers = workers
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "IFA_ARTIFACTS_DIR": str(artifacts),
            "IFA_MODEL_VERSION": "v1",
            "IFA_WARMUP_CANDIDATES": "1,16",
            "IFA_DEFAULT_BUDGET_MS": "10000",
            "IFA_ADMIN_TOKEN": TOKEN,
            "IFA_EMBEDDED_REDIS_DIR": str(self.redis_dir),
            "IFA_DRAIN_S": "0",
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        self.env.pop("IFA_REDIS_URL", None)  # the parent starts the embedded one
        self.exit_code: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> ServeWorkers:
        self.metrics_dir.mkdir()
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "ifa_rank.cli", "serve", "--port", str(self.port)]
        self._proc = subprocess.Popen(
            [*command, "--workers", str(self.workers)],
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: request(self.port, "GET", "/readyz")[0] == 200,
                timeout_s=120,
                tolerate=(OSError,),
            )
            # every worker, not just the first to answer: one still starting misses the
            # announcements made meanwhile (a reload) and serves no request yet
            wait_until(
                lambda: self.output().count("Application startup complete") >= self.workers,
                timeout_s=120,
                detail=lambda: self.output()[-3000:],
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            self.exit_code = self._proc.wait(60)
        if self._log is not None:
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text()

    def worker_pids(self) -> list[int]:
        """uvicorn's worker processes (the parent's other children: the embedded Redis,
        multiprocessing's resource tracker)."""
        assert self._proc is not None
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        pids = []
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
        return pids

    def connections_per_worker(self) -> dict[int, int]:
        """Established client connections to the service's port held by each worker."""
        return {pid: len(ports) for pid, ports in self.client_ports_per_worker().items()}

    def client_ports_per_worker(self) -> dict[int, set[int]]:
        """The client ports of the established connections each worker holds (from /proc:
        the workers' socket inodes against the kernel's TCP table)."""
        established = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local_port = int(cols[1].rsplit(":", 1)[1], 16)
                    if local_port == self.port and cols[3] == "01":  # ESTABLISHED
                        established[cols[9]] = int(cols[2].rsplit(":", 1)[1], 16)  # inode
        ports = {}
        for pid in self.worker_pids():
            fds = Path(f"/proc/{pid}/fd")
            inodes = set()
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):  # closed meanwhile
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            ports[pid] = {established[i] for i in inodes & established.keys()}
        return ports

    def clean_exit(self) -> bool:
        return self.exit_code in (0, -signal.SIGTERM)
