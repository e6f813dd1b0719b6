"""Warm /rank under services that differ in one setting, or in their code, on one Redis,
interleaved: the A/B for a change that a noisy box hides between runs.

    python -m loadtest.setting_ab IFA_STARTS_PER_ITERATION=0,1,4 \\
        [--workers 1] [--connections 16] [--pairs 3] [--duration 4] [--budget-ms 60000]
    python -m loadtest.setting_ab --code BASE_DIR [--healthz] [...]

One service per value starts (all at once, on one seeded Redis, the same bodies); each
pair measures every value in turn, so the box's drift falls on all alike. Prints a JSON
object: per value, each run's figures and their medians (p50/p90/p99 ms, req/s, errors),
and per value after the first, the median over pairs of its difference from the first
(`paired`: a drift that moves both runs of a pair cancels in it).
`--budget-ms` sets the bodies' budget (a large one keeps admission from shedding, so that
only the setting differs); without it the service's default applies.

`--code BASE_DIR`: two services with the same settings, one importing `service` (and
`ifa_common`) from another checkout (`base`, e.g. a `git worktree` of main) and one from
this one (`this`): the A/B of a code change. `--healthz`: each pair also measures
`GET /healthz` one at a time on every service (`healthz_by_value`), the other term of the
overhead ratio (docs/design.md §8).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_http import seed_warm_users
from loadtest.bench_measure import Loader, candidate_sets, median_summary, post, rank_body
from loadtest.bench_plan import BenchPlan
from loadtest.seed import connect
from loadtest.server import LocalService

THIS_CHECKOUT = Path(__file__).resolve().parents[1]
PAIRED_FIGURES = ("p50_ms", "p99_ms", "rps", "server_cpu_ms_per_req")


@dataclass(frozen=True)
class Variant:
    """One service of an A/B: its label, its settings, and the checkout it imports
    `service` from (None: wherever this process would)."""

    label: str
    env: dict[str, str] = field(default_factory=dict)
    code: Path | None = None


def parse_setting(text: str) -> tuple[str, list[str]]:
    """`IFA_NAME=a,b,c` -> ("IFA_NAME", ["a", "b", "c"]); at least two values."""
    name, sep, values = text.partition("=")
    if not sep or not name.startswith("IFA_") or len(values.split(",")) < 2:
        raise ValueError(f"expected IFA_NAME=value,value[,...], got {text!r}")
    return name, values.split(",")


def setting_variants(name: str, values: list[str]) -> list[Variant]:
    """One service per value of the setting `name`, labelled by the value."""
    return [Variant(v, {name: v}) for v in values]


def code_variants(base: str | Path) -> list[Variant]:
    """`base` (another checkout) against this one; raises ValueError when `base` holds
    no `service` package to import."""
    root = Path(base).resolve()
    if not (root / "service" / "__init__.py").is_file():
        raise ValueError(f"{root} is not a checkout of this project (no service/__init__.py)")
    return [Variant("base", code=root), Variant("this", code=THIS_CHECKOUT)]


def paired(series: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per label after the first: the median over pairs of (its run - the first's run)."""
    labels = list(series)
    out: dict[str, dict[str, float]] = {}
    if not labels:
        return out
    first = series[labels[0]]
    for label in labels[1:]:
        diffs: dict[str, float] = {}
        for key in PAIRED_FIGURES:
            d = [
                b[key] - a[key]
                for a, b in zip(first, series[label], strict=True)
                if key in a and key in b
            ]
            if d:
                diffs[key] = float(statistics.median(d))
        out[label] = diffs
    return out


def run_ab(
    name: str,
    values: list[str],
    artifacts: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """Services that differ in the setting `name` only, one per value."""
    return {"setting": name, **run_variants(setting_variants(name, values), artifacts, **kwargs)}


def run_variants(
    variants: list[Variant],
    artifacts: str,
    *,
    workers: int = 1,
    connections: int = 16,
    pairs: int = 3,
    plan: BenchPlan | None = None,
    budget_ms: float | None = None,
    tool: str = "wrk",
    healthz: bool = False,
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
    series: dict[str, list[dict[str, Any]]] = {v.label: [] for v in variants}
    hz: dict[str, list[dict[str, Any]]] = {v.label: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="ifa-setting-ab-") as tmp:
        redis = RedisServer(Path(tmp), port=free_port(), persist=False).start()
        try:
            client = connect(redis.url)
            try:
                seed_warm_users(client, plan)
            finally:
                client.close()
            for variant in variants:
                svc = LocalService(
                    artifacts_dir=artifacts,
                    redis_url=redis.url,
                    env=variant.env,
                    workers=workers,
                    cwd=variant.code,
                )
                services[variant.label] = svc
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
                for label, svc in order if pair % 2 == 0 else reversed(order):
                    r = Loader(tool, svc).run("POST", "/rank", bodies, connections, plan)
                    series[label].append(r)
                    line = (
                        f"pair {pair + 1} {label}: p50 {r['p50_ms']:.3f} "
                        f"p99 {r['p99_ms']:.2f} ms, {r['rps']:.0f} req/s"
                    )
                    if healthz:
                        h = Loader(tool, svc).run("GET", "/healthz", [None], 1, plan)
                        hz[label].append(h)
                        line += f"; /healthz p50 {h['p50_ms']:.3f} ms"
                    print(line, file=sys.stderr, flush=True)
        finally:
            for svc in services.values():
                svc.stop()
            redis.stop()
    out: dict[str, Any] = {
        "workers": workers,
        "connections": connections,
        "budget_ms": budget_ms,
        "m": plan.m,
        "code": {v.label: str(v.code) for v in variants if v.code is not None} or None,
        "by_value": {label: median_summary(runs) for label, runs in series.items()},
        "paired": paired(series),
    }
    if healthz:
        out["healthz_by_value"] = {label: median_summary(runs) for label, runs in hz.items()}
        out["healthz_paired"] = paired(hz)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("setting", nargs="?", help="IFA_NAME=value,value[,...]")
    p.add_argument("--code", default=None, help="another checkout: its code against this one's")
    p.add_argument("--healthz", action="store_true", help="also /healthz, one at a time")
    p.add_argument("--artifacts", default=None, help="default: IFA_ARTIFACTS_DIR or artifacts/")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    p.add_argument("--budget-ms", type=float, default=None)
    args = p.parse_args(argv)
    if (args.setting is None) == (args.code is None):
        p.error("give either a setting (IFA_NAME=a,b) or --code BASE_DIR")
    setting: dict[str, Any] = {}
    try:
        if args.code is not None:
            variants = code_variants(args.code)
        else:
            name, values = parse_setting(args.setting)
            variants = setting_variants(name, values)
            setting = {"setting": name}
    except ValueError as e:
        p.error(str(e))
    from loadtest.bench import resolve_artifacts

    plan = BenchPlan(quick=True, repeats=args.pairs, duration_s=args.duration, warmup_s=1.0)
    with tempfile.TemporaryDirectory(prefix="ifa-setting-ab-artifacts-") as tmp:
        wanted = args.artifacts or os.environ.get("IFA_ARTIFACTS_DIR") or "artifacts"
        artifacts, _ = resolve_artifacts(wanted, Path(tmp))
        out = {
            **setting,
            **run_variants(
                variants,
                artifacts,
                workers=args.workers,
                connections=args.connections,
                pairs=args.pairs,
                plan=plan,
                budget_ms=args.budget_ms,
                healthz=args.healthz,
            ),
        }
    for key in ("by_value", "healthz_by_value"):
        for runs in (out.get(key) or {}).values():
            runs.pop("runs", None)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
