"""`ifa-rank bench` (`make bench`): model costs in process and end-to-end HTTP latency.

One run writes `<out>/bench.json` (every figure, machine, versions, settings), the
readable `<out>/bench.md` and PNG plots. Two parts:

1. In process (`loadtest.microbench.run_microbench`): build_state vs N, fold of 100
   events, score vs M and torch `softmax_full` at the same dims, with the ratios
   softmax_full / ifa_warm and softmax_full / ifa_cold.
2. HTTP on loopback against a real service process (uvicorn, uvloop, httptools) with its
   own throwaway redis-server, seeded with users of N = 100,000 events: warm /rank at
   M = 500 under closed-loop load at concurrency 1, 2 and 8, /healthz of the same app in
   the same runs at 1 and 8 (interleaved, so drift hits both alike), cold /rank for
   never-seen users, a refresh after 100 new events, the service's own stage timings,
   its CPU per request and its memory before and after.

Every figure is the median over `repeats` runs, each after a warm-up. The load generator
is wrk or the asyncio client of `loadtest.httpload`, whichever costs less CPU per request
against /healthz (its ceiling is reported; on a 2-core box the generator's CPU is taken
from the server's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench_derive import derive
from loadtest.bench_http import http_bench
from loadtest.bench_plan import BenchPlan
from loadtest.sysinfo import cpu_ticks, machine_info, steal_pct, versions

log = logging.getLogger("loadtest.bench")

REPORT_FORMAT = 1


# ---------------------------------------------------------------------- in process
def inprocess(quick: bool, artifacts: str) -> dict[str, Any]:
    """`loadtest.microbench.run_microbench`, as is (it owns the model-side figures)."""
    from loadtest.microbench import run_microbench

    result: dict[str, Any] = run_microbench(quick, artifacts)
    return result


def resolve_artifacts(artifacts: str, tmp: Path) -> tuple[str, str]:
    """(artifacts dir the service loads, what it is). Without an exported version there,
    an untrained default-config model is exported into tmp: costs do not depend on the
    weights, and `make bench` then works on a bare checkout (needs torch)."""
    from ifa_common.manifest import ArtifactError, resolve_version

    try:
        version = resolve_version(Path(artifacts), None)
        return artifacts, f"{artifacts}/{version.name}"
    except (ArtifactError, OSError):
        pass
    import torch

    from model_export.export import export_model
    from model_export.model import build_model, default_config

    log.warning("no model version in %s: exporting an untrained default-config model", artifacts)
    cfg = default_config()
    torch.manual_seed(0)
    export_model(
        build_model(cfg).eval(), cfg, tmp, "bench-untrained", None, {"data_id": "untrained"}
    )
    return str(tmp), "untrained default-config export (no artifact in " + artifacts + ")"


# ---------------------------------------------------------------------- entry point
def run_bench(
    out_dir: Path,
    quick: bool,
    *,
    client: str = "auto",
    artifacts: str | None = None,
    repeats: int | None = None,
    duration: float | None = None,
    skip_micro: bool = False,
    skip_http: bool = False,
    plan: BenchPlan | None = None,
) -> dict[str, Any]:
    """Run the benchmark and write bench.json, bench.md and the plots into out_dir."""
    from loadtest import plots, report

    plan = plan or BenchPlan.make(quick, repeats, duration)
    artifacts = artifacts or os.environ.get("IFA_ARTIFACTS_DIR") or "artifacts"
    started = time.time()
    ticks0 = cpu_ticks()
    rep: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "mode": "quick" if quick else "full",
        "command": "ifa-rank bench" + (" --quick" if quick else ""),
        "machine": machine_info(),
        "versions": versions(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ifa-bench-artifacts-") as tmp:
        # One artifact for both parts (exported once when there is none).
        artifacts, rep["artifact"] = resolve_artifacts(artifacts, Path(tmp))
        _measure(rep, plan, artifacts, out_dir, client, skip_micro, skip_http)
    rep["derived"] = derive(rep)
    rep["machine"]["load_avg_at_end"] = list(os.getloadavg())
    rep["machine"]["steal_pct"] = steal_pct(ticks0, cpu_ticks())
    rep["elapsed_s"] = time.time() - started
    (out_dir / "bench.json").write_text(json.dumps(rep, indent=2, default=_json_default) + "\n")
    with contextlib.suppress(Exception):
        rep["plots"] = plots.write_plots(rep, out_dir)
    (out_dir / "bench.md").write_text(report.markdown(rep))
    (out_dir / "bench.json").write_text(json.dumps(rep, indent=2, default=_json_default) + "\n")
    return rep


def _measure(
    rep: dict[str, Any],
    plan: BenchPlan,
    artifacts: str,
    out_dir: Path,
    client: str,
    skip_micro: bool,
    skip_http: bool,
) -> None:
    if not skip_micro:
        t0 = time.perf_counter()
        try:
            rep["inprocess"] = inprocess(plan.quick, artifacts)
        except Exception as e:  # a missing artifact or torch must not lose the HTTP part
            log.exception("in-process microbench failed")
            rep["inprocess"] = {"error": f"{type(e).__name__}: {e}"}
        rep["inprocess_s"] = time.perf_counter() - t0
    if not skip_http:
        t0 = time.perf_counter()
        rep["http"] = http_bench(plan, artifacts, out_dir, client)
        rep["http_s"] = time.perf_counter() - t0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def main(args: argparse.Namespace) -> int:
    """Handler of `ifa-rank bench`."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    out = Path(args.out)
    rep = run_bench(
        out,
        args.quick,
        client=getattr(args, "client", "auto"),
        artifacts=getattr(args, "artifacts", None),
        repeats=getattr(args, "repeats", None),
        duration=getattr(args, "duration", None),
        skip_micro=getattr(args, "skip_micro", False),
        skip_http=getattr(args, "skip_http", False),
    )
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} in {rep['elapsed_s']:.0f} s")
    return 0
