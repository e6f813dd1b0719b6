"""What an answered /rank's metrics cost the event loop: the calls the request path makes
(`inflight_now` up and down, `observe_rank`, `count_response`, `observe_request`), timed
in a loop, with the values buffered (`IFA_METRICS_FLUSH_MS` > 0, a flush after each
block as a scrape would do) and written through (0), in one process and as a worker of
`ifa-rank serve --workers N` (prometheus_client's multiprocess mode, which it picks at
import: each case runs in a child process of its own).

    python -m loadtest.metrics_cost [--blocks 15] [--calls 3000]

Prints one JSON object: µs per request, median and minimum over the blocks, per case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

CASES = (
    ("one process", False, True),
    ("one process", False, False),
    ("worker", True, True),
    ("worker", True, False),
)


def time_requests(buffered: bool, blocks: int, calls: int) -> list[float]:
    """µs per request of each block, in this process."""
    from service.metrics import Metrics

    metrics = Metrics(buffered=buffered)
    metrics.set_model("v1", "cpu")
    timings = SimpleNamespace(queue=0.05, redis=0.0, state=0.01, score=0.5, serialize=0.1)
    record = SimpleNamespace(
        version="v1",
        candidates=500,
        timings=timings,
        degraded=None,
        sequence_length=1_200,
        cache_result="hit",
        state_source="local",
    )
    per_request = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(calls):
            metrics.inflight_now.inc()
            metrics.observe_rank(record)
            metrics.inflight_now.dec()
            metrics.count_response("/rank", 200)
            metrics.observe_request("ok", "v1", 0.001)
        metrics.flush()
        per_request.append((time.perf_counter() - t) / calls * 1e6)
    return per_request


def run_case(multiprocess: bool, buffered: bool, blocks: int, calls: int) -> list[float]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as shared:
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = shared
        command = [sys.executable, "-m", "loadtest.metrics_cost", "--child"]
        command += ["--blocks", str(blocks), "--calls", str(calls)]
        if buffered:
            command.append("--buffered")
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    per_request: list[float] = json.loads(out.stdout)
    return per_request


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--buffered", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(time_requests(args.buffered, args.blocks, args.calls)))
        return
    report = {}
    for where, multiprocess, buffered in CASES:
        per_request = run_case(multiprocess, buffered, args.blocks, args.calls)
        name = f"{where}, {'buffered' if buffered else 'written through'}"
        report[name] = {
            "us_per_request_median": round(statistics.median(per_request), 2),
            "us_per_request_min": round(min(per_request), 2),
        }
        print(f"{name}: {report[name]}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
