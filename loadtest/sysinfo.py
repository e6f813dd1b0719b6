"""What a benchmark report must carry to be comparable: machine, versions, process stats."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_PACKAGES = (
    "ifa-rank",
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "fastapi",
    "uvicorn",
    "starlette",
    "pydantic",
    "redis",
    "orjson",
    "uvloop",
    "httptools",
    "torch",
    "locust",
)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "load_avg_at_start": list(os.getloadavg()),
    }
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    gpu = shutil.which("nvidia-smi")
    if gpu:
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [gpu, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["gpus"] = [g.strip() for g in out.stdout.splitlines() if g.strip()]
    return info


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    with contextlib.suppress(Exception):
        from service.store.embedded_redis import find_redis_server

        proc = subprocess.run(
            [find_redis_server(), "--version"], capture_output=True, text=True, timeout=10
        )
        out["redis_server"] = proc.stdout.split("v=")[1].split()[0]
    wrk = shutil.which("wrk")
    if wrk:
        with contextlib.suppress(Exception):
            proc = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
            out["wrk"] = (proc.stdout or proc.stderr).split()[1]
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if head:
            out["git_commit"] = head + ("-dirty" if dirty else "")
    return out


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) clock ticks of the whole machine since boot, from /proc/stat (None
    where there is none): steal is the time the hypervisor ran someone else while this
    machine's CPUs had work. On a shared VM that is what makes two runs of one build
    differ, so every measured run carries its share (`steal_pct`)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    """The share (%) of the machine's CPU time taken by the hypervisor between two
    `cpu_ticks` readings; NaN when either is missing or no time passed."""
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def descendants(pid: int) -> list[int]:
    """The pids of a process's children, theirs, and so on (from each process's parent
    in /proc; a process that exits while it is read is left out)."""
    parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parent.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parent.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants now alive: a
    service of several worker processes (uvicorn's supervisor and its workers) as one."""
    return proc_cpu_s(pid) + sum(proc_cpu_s(p) for p in descendants(pid))


def redis_cpu_s(url: str | None) -> float | None:
    """User + system CPU seconds Redis reports for itself (`INFO cpu`), or None where it
    cannot be asked. The box's third consumer beside the service and the generator: the
    warm path's push channel, the impression log and any strict check land there."""
    if not url:
        return None
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            info = client.info("cpu")
        finally:
            client.close()
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    except Exception:  # a figure left out, never a failed run
        return None


def proc_rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process' resident set in MiB (`field` "VmHWM": its peak); NaN if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")
