"""Warm /rank under services that differ in one setting, on one Redis, interleaved: the
A/B for a change that a noisy box hides between runs.

    python -m loadtest.setting_ab IFA_STARTS_PER_ITERATION=0,1,4 \\
        [--workers 1] [--connections 16] [--pairs 3] [--duration 4] [--budget-ms 60000]

One service per value starts (all at once, on one seeded Redis, the same bodies); each
pair measures every value in turn, so the box's drift falls on all alike. Prints a JSON
object: per value, each run's figures and their medians (p50/p90/p99 ms, req/s, errors).
`--budget-ms` sets the bodies' budget (a large one keeps admission from shedding, so that
only the setting differs); without it the service's default applies.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_http import seed_warm_users
from loadtest.bench_measure import Loader, candidate_sets, median_summary, post, rank_body
from loadtest.bench_plan import BenchPlan
from loadtest.seed import connect
from loadtest.server import LocalService


def parse_setting(text: str) -> tuple[str, list[str]]:
    """`IFA_NAME=a,b,c` -> ("IFA_NAME", ["a", "b", "c"]); at least two values."""
    name, sep, values = text.partition("=")
    if not sep or not name.startswith("IFA_") or len(values.split(",")) < 2:
        raise ValueError(f"expected IFA_NAME=value,value[,...], got {text!r}")
    return name, values.split(",")


def run_ab(
    name: str,
    values: list[str],
    artifacts: str,
    *,
    workers: int = 1,
    connections: int = 16,
    pairs: int = 3,
    plan: BenchPlan | None = None,
    budget_ms: float | None = None,
    tool: str = "wrk",
) -> dict[str, Any]:
    plan = plan or BenchPlan(quick=True, repeats=pairs, duration_s=4.0, warmup_s=1.0)
    from service.store.embedded_redis import RedisServer, free_port

    rng = np.random.default_rng(0)
    users = [f"warm-{i}" for i in range(plan.warm_users)]
    bodies: list[bytes | None] = [
        rank_body(users[i % len(users)], cands, budget_ms)
        for i, cands in enumerate(candidate_sets(rng, 4 * len(users), plan.m, plan.items))
    ]
    services: dict[str, LocalService] = {}
    series: dict[str, list[dict[str, Any]]] = {v: [] for v in values}
    with tempfile.TemporaryDirectory(prefix="ifa-setting-ab-") as tmp:
        redis = RedisServer(Path(tmp), port=free_port(), persist=False).start()
        try:
            client = connect(redis.url)
            try:
                seed_warm_users(client, plan)
            finally:
                client.close()
            for value in values:
                svc = LocalService(
                    artifacts_dir=artifacts,
                    redis_url=redis.url,
                    env={name: value},
                    workers=workers,
                )
                services[value] = svc
                svc.start_service()
                for _ in range(2 * workers):  # each worker builds and verifies the states
                    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=120)
                    for u in users:
                        post(conn, "/rank", rank_body(u, [1, 2, 3], budget_ms=60_000))
                    conn.close()
            for pair in range(pairs):
                # ABBA: every other pair in reverse, so that a bias toward the first or
                # the second run of a pair falls on all values alike
                order = list(services.items())
                for value, svc in order if pair % 2 == 0 else reversed(order):
                    r = Loader(tool, svc).run("POST", "/rank", bodies, connections, plan)
                    series[value].append(r)
                    print(
                        f"pair {pair + 1} {name}={value}: p50 {r['p50_ms']:.2f} "
                        f"p99 {r['p99_ms']:.2f} ms, {r['rps']:.0f} req/s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for svc in services.values():
                svc.stop()
            redis.stop()
    return {
        "setting": name,
        "workers": workers,
        "connections": connections,
        "budget_ms": budget_ms,
        "m": plan.m,
        "by_value": {v: median_summary(runs) for v, runs in series.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("setting", help="IFA_NAME=value,value[,...]")
    p.add_argument("--artifacts", default=None, help="default: IFA_ARTIFACTS_DIR or artifacts/")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    p.add_argument("--budget-ms", type=float, default=None)
    args = p.parse_args(argv)
    try:
        name, values = parse_setting(args.setting)
    except ValueError as e:
        p.error(str(e))
    from loadtest.bench import resolve_artifacts

    plan = BenchPlan(quick=True, repeats=args.pairs, duration_s=args.duration, warmup_s=1.0)
    with tempfile.TemporaryDirectory(prefix="ifa-setting-ab-artifacts-") as tmp:
        wanted = args.artifacts or os.environ.get("IFA_ARTIFACTS_DIR") or "artifacts"
        artifacts, _ = resolve_artifacts(wanted, Path(tmp))
        out = run_ab(
            name,
            values,
            artifacts,
            workers=args.workers,
            connections=args.connections,
            pairs=args.pairs,
            plan=plan,
            budget_ms=args.budget_ms,
        )
    for runs in out["by_value"].values():
        runs.pop("runs", None)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
