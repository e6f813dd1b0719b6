"""`make loadtest` (`python -m loadtest.run`): locust, headless, bounded, with an SLO gate.

Without `--host`: starts the service locally (own throwaway redis-server, the artifact in
IFA_ARTIFACTS_DIR / --artifacts), seeds warm users (log-uniform 1k..100k events) and a
pool of never-ranked cold users, ranks each warm user once so that their states are
cached, then runs locust. With `--host URL`: runs against that deployment as is (seed
its Redis beforehand with `ifa-rank seed`, same prefixes).

Writes `<out>/locust_stats.csv`, `_stats_history.csv`, `_failures.csv`,
`_exceptions.csv`, `<out>/locust.html` and `<out>/loadtest.json` (the gate's inputs and
verdict, plus the service's memory at start and end when it was started here). Exits 1
when any request failed or a /rank p99 is above `--p99-ms`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.server import LocalService, http_json
from loadtest.sysinfo import proc_rss_mib

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=None, help="a running deployment (default: start one here)")
    p.add_argument("--users", type=int, default=int(os.environ.get("LOADTEST_USERS", 20)))
    p.add_argument(
        "--spawn-rate", type=float, default=float(os.environ.get("LOADTEST_SPAWN_RATE", 10))
    )
    p.add_argument("--run-time", default=os.environ.get("LOADTEST_RUN_TIME", "60s"))
    p.add_argument("--rate", type=float, default=5.0, help="mean req/s per simulated user")
    p.add_argument(
        "--p99-ms",
        type=float,
        default=float(os.environ.get("LOADTEST_P99_MS", 100)),
        help="fail when a /rank p99 exceeds this (ms, client side)",
    )
    p.add_argument("--out", default="reports")
    p.add_argument("--artifacts", default=None)
    p.add_argument("--warm-users", type=int, default=50)
    p.add_argument("--warm-max-length", type=int, default=100_000)
    p.add_argument("--cold-users", type=int, default=200)
    p.add_argument("--cold-max-length", type=int, default=20_000)
    p.add_argument("--items", type=int, default=20_000)
    return p.parse_args(argv)


def prepare_local(svc: LocalService, args: argparse.Namespace) -> dict[str, Any]:
    """Seed warm and cold pools into the service's Redis and warm the warm users up."""
    import redis

    from loadtest.seed import seed_synthetic

    client = redis.Redis.from_url(svc.start_redis(), socket_timeout=60)
    warm = seed_synthetic(
        client,
        args.warm_users,
        args.warm_max_length,
        items=args.items,
        prefix="warm",
        dist="loguniform",
        min_length=1000,
        seed=21,
    )
    cold = seed_synthetic(
        client,
        args.cold_users,
        args.cold_max_length,
        items=args.items,
        prefix="cold",
        dist="loguniform",
        min_length=100,
        seed=22,
    )
    client.close()
    svc.start_service()
    for i in range(args.warm_users):
        body = json.dumps({"user_id": f"warm-{i}", "candidates": [1, 2, 3], "budget_ms": 60_000})
        status, answer = http_json(svc.base_url + "/rank", timeout=60, data=body.encode())
        if status != 200:
            raise RuntimeError(f"warming warm-{i}: {status} {answer}")
    return {"warm_events": warm.events, "cold_events": cold.events}


def read_stats(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def gate(rows: list[dict[str, str]], p99_ms: float) -> dict[str, Any]:
    """The verdict: no failures at all, and every /rank row's p99 within the budget."""
    total = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    if total is None:
        return {"ok": False, "reasons": ["locust wrote no Aggregated row"]}
    requests = int(total["Request Count"])
    failures = int(total["Failure Count"])
    reasons = []
    if requests == 0:
        reasons.append("no requests were made")
    if failures > 0:
        reasons.append(f"{failures} of {requests} requests failed")
    per_name = {}
    for r in rows:
        if r.get("Name") == "Aggregated" or not r.get("Name", "").startswith("/rank"):
            continue
        p99 = float(r["99%"]) if r["99%"] not in ("", "N/A") else float("nan")
        per_name[r["Name"]] = {
            "requests": int(r["Request Count"]),
            "p50_ms": float(r["50%"] or "nan"),
            "p99_ms": p99,
            "failures": int(r["Failure Count"]),
        }
        if p99 > p99_ms:
            reasons.append(f"{r['Name']} p99 {p99:.0f} ms > {p99_ms:.0f} ms")
    return {
        "ok": not reasons,
        "reasons": reasons,
        "requests": requests,
        "failures": failures,
        "error_rate": failures / requests if requests else None,
        "rps": float(total["Requests/s"]),
        "rank": per_name,
    }


def run_locust(host: str, args: argparse.Namespace, out: Path) -> int:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "locust.html"),
        "--only-summary",
        "--stop-timeout",
        "10",
        "--warm-users",
        str(args.warm_users),
        "--cold-users",
        str(args.cold_users),
        "--items",
        str(args.items),
        "--rate",
        str(args.rate),
    ]
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "args": vars(args),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    svc: LocalService | None = None
    try:
        if args.host:
            host = args.host
        else:
            svc = LocalService(artifacts_dir=args.artifacts, log_path=out / "loadtest-server.log")
            summary["seeded"] = prepare_local(svc, args)
            summary["rss_mib_start"] = proc_rss_mib(svc.pid)
            summary["settings_env"] = {
                k: v for k, v in svc.settings_env.items() if k != "IFA_REDIS_URL"
            }
            host = svc.base_url
        summary["locust_rc"] = run_locust(host, args, out)
        if svc is not None:
            summary["rss_mib_end"] = proc_rss_mib(svc.pid)
    finally:
        if svc is not None:
            svc.stop()
    stats = out / "locust_stats.csv"
    verdict: dict[str, Any] = {"ok": False, "reasons": [f"{stats} was not written"]}
    if stats.is_file():
        verdict = gate(read_stats(stats), args.p99_ms)
    summary["gate"] = verdict
    (out / "loadtest.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(verdict, indent=2))
    if not verdict["ok"]:
        print("loadtest FAILED: " + "; ".join(verdict["reasons"]), file=sys.stderr)
        return 1
    print(
        f"loadtest passed: {verdict['requests']} requests, 0 failures, /rank p99 <= {args.p99_ms:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
