"""A response's head and body in one send (service/http/cork.py) through the whole stack:
the service's protocol under uvicorn, its write syscalls counted by the kernel
(`syscw` in /proc/<pid>/io: write and writev calls of every thread of the process)."""

from __future__ import annotations

import http.client
from pathlib import Path

from loadtest.server import LocalService


def write_syscalls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscw in /proc/{pid}/io")


def test_uvicorn_sends_each_answer_in_one_write(tiny_artifacts: Path, tmp_path: Path) -> None:
    with LocalService(artifacts_dir=str(tiny_artifacts), log_path=tmp_path / "server.log") as svc:
        conn = http.client.HTTPConnection(svc.host, svc.port, timeout=30)
        answers = 200

        def answer_all() -> None:
            for _ in range(answers):
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                assert (r.status, r.read()) == (200, b'{"status":"ok"}')

        answer_all()  # the connection and the route warm
        before = write_syscalls(svc.pid)
        answer_all()
        writes = write_syscalls(svc.pid) - before
        conn.close()
    # one per answer (head and body together), with room for a few writes of the
    # process' own (a log line); uvicorn alone makes two per answer
    assert answers <= writes < 1.25 * answers, writes
