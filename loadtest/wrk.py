"""Run `wrk` (C, epoll, HdrHistogram) as the closed-loop load generator.

A generated Lua script cycles through precomputed requests (so concurrent connections
rank different users) and prints one JSON line from `done()` with the percentiles we
report; wrk's own latency histogram has microsecond resolution. Warm-up is a separate,
discarded wrk run just before the measured one.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np

from loadtest.httpload import LoadResult

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "mean_us": %f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def ensure_wrk(install: bool = True) -> str | None:
    """Path of wrk; installs it with apt-get when missing and running as root."""
    path = wrk_path()
    if path or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return path
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"]):
        subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
        if wrk_path():
            break
    if not wrk_path():
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "wrk"],
            env=env,
            capture_output=True,
            timeout=300,
            check=False,
        )
    return wrk_path()


def _lua_string(data: bytes) -> str:
    """A Lua long-bracket literal that cannot be closed by the data itself."""
    text = data.decode("utf-8")
    level = 0
    while f"]{'=' * level}]" in text + f"]{'=' * level}":  # a trailing "]" closes early too
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def lua_script(method: str, path: str, bodies: Sequence[bytes | None]) -> str:
    """A wrk script that cycles through one request per body."""
    lines = ["local reqs = {}", "local i = 0", "init = function(args)"]
    for body in bodies:
        if body is None:
            lines.append(f'  reqs[#reqs + 1] = wrk.format("{method}", "{path}")')
        else:
            lines.append(
                f'  reqs[#reqs + 1] = wrk.format("{method}", "{path}", '
                f'{{["Content-Type"] = "application/json"}}, {_lua_string(body)})'
            )
    lines += [
        "end",
        "request = function()",
        "  i = i % #reqs + 1",
        "  return reqs[i]",
        "end",
    ]
    return "\n".join(lines) + "\n" + _DONE


def run_wrk(
    url: str,
    method: str,
    path: str,
    bodies: Sequence[bytes | None],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    threads: int = 1,
    timeout_s: float = 10.0,
) -> LoadResult:
    """One measured wrk run (after a discarded warm-up run of `warmup_s`)."""
    exe = wrk_path()
    if exe is None:
        raise FileNotFoundError("wrk is not installed")
    threads = max(1, min(threads, concurrency))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua_script(method, path, bodies))
        script = f.name
    try:

        def once(seconds: float) -> dict[str, float]:
            cmd = [
                exe,
                "-t",
                str(threads),
                "-c",
                str(concurrency),
                "-d",
                f"{max(1, round(seconds))}s",
                "--timeout",
                f"{int(timeout_s)}s",
                "-s",
                script,
                url,
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 30
            )
            for line in proc.stdout.splitlines():
                if line.startswith("WRKJSON "):
                    parsed: dict[str, float] = json.loads(line[len("WRKJSON ") :])
                    return parsed
            raise RuntimeError(f"wrk failed (rc {proc.returncode}): {proc.stderr or proc.stdout}")

        if warmup_s > 0:
            once(warmup_s)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = once(duration_s)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(script)
    errors = int(r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"])
    duration = r["duration_us"] / 1e6
    result = LoadResult(
        tool="wrk",
        concurrency=concurrency,
        duration_s=duration,
        latencies_ms=np.zeros(0),
        errors=errors,
    )
    # wrk gives percentiles, not samples: the summary is overridden with its numbers.
    result.extra = {
        "requests": int(r["requests"]),
        "rps": r["requests"] / duration if duration > 0 else 0.0,
        "p50_ms": r["p50_us"] / 1e3,
        "p90_ms": r["p90_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "max_ms": r["max_us"] / 1e3,
        "mean_ms": r["mean_us"] / 1e3,
        "client_cpu_us_per_req": 1e6
        * (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        / max(int(r["requests"]), 1),
    }
    return result
