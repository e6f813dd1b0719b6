"""How the bench measures: request bodies, one closed-loop run with the service's CPU
and the hypervisor's share (`Loader`), the service's own stage histograms, the medians
over repeats, the load generators' ceilings and the sequential timed requests. The
phases that use them are in `bench_http`."""

from __future__ import annotations

import http.client
import json
import logging
import statistics
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

from loadtest import httpload, wrk
from loadtest.bench_plan import FIGURES, BenchPlan
from loadtest.seed import env_cluster
from loadtest.server import LocalService
from loadtest.sysinfo import cpu_ticks, redis_cpu_s, steal_pct, tree_cpu_s

log = logging.getLogger("loadtest.bench")


def rank_body(user: str, cands: list[int], budget_ms: float | None = None) -> bytes:
    body: dict[str, Any] = {"user_id": user, "candidates": cands}
    if budget_ms is not None:
        body["budget_ms"] = budget_ms
    return json.dumps(body, separators=(",", ":")).encode()


def candidate_sets(rng: np.random.Generator, count: int, m: int, items: int) -> list[list[int]]:
    return [rng.integers(0, items, size=m).tolist() for _ in range(count)]


class Loader:
    """Runs one closed-loop measurement with the chosen tool; adds server CPU per request."""

    def __init__(self, tool: str, svc: LocalService) -> None:
        self.tool = tool
        self.svc = svc

    def run(
        self, method: str, path: str, bodies: list[bytes | None], concurrency: int, plan: BenchPlan
    ) -> dict[str, Any]:
        # one Redis only: INFO on one node of a cluster is a part of its CPU
        redis_url = None if env_cluster(self.svc.settings_env) else self.svc.redis_url
        redis0 = redis_cpu_s(redis_url)
        cpu0 = tree_cpu_s(self.svc.pid)  # the workers too, where there are several
        ticks0 = cpu_ticks()
        t0 = time.perf_counter()
        if self.tool == "wrk":
            res = wrk.run_wrk(
                self.svc.base_url, method, path, bodies, concurrency, plan.duration_s, plan.warmup_s
            )
        else:
            reqs = [httpload.build_request(method, path, b) for b in bodies]
            res = httpload.run_load(
                self.svc.host, self.svc.port, reqs, concurrency, plan.duration_s, plan.warmup_s
            )
        wall = time.perf_counter() - t0
        cpu = tree_cpu_s(self.svc.pid) - cpu0
        out = res.summary()
        # Server CPU over warm-up + measured window, per request served in that time.
        served = out["rps"] * wall if out["rps"] else 0.0
        out["server_cpu_ms_per_req"] = 1e3 * cpu / served if served else float("nan")
        out["server_cpu_cores"] = cpu / wall if wall else float("nan")
        redis1 = redis_cpu_s(redis_url)
        if redis0 is not None and redis1 is not None and served:
            out["redis_cpu_ms_per_req"] = 1e3 * (redis1 - redis0) / served
        out["steal_pct"] = steal_pct(ticks0, cpu_ticks())
        return out


def inprocess_scorer(artifacts: str, m: int, items: int) -> Callable[[], list[float]]:
    """A closure timing the served artifact's scorer in this process: 64 calls at M = m,
    fresh candidates each, ms per call. The overhead ratio's denominator, taken right
    before and right after each c = 1 /rank run (`scorer_median`) so that it sees the
    machine in the same state as the run does: one block of 64 calls lasts about 25 ms,
    and on this box one block has read up to 45 % slower than the other."""
    from loadtest.microbench import _events
    from service.engine.runtime import ModelRuntime

    rt = ModelRuntime.load(artifacts, None, intra_op_threads=1, prefer_cuda=False)
    state = rt.build_state(_events(1_000))
    rng = np.random.default_rng(3)
    sets = [rng.integers(0, items, m) for _ in range(32)]  # new candidates each call, as served

    def measure() -> list[float]:
        for cands in sets[:5]:
            rt.score(state, cands)
        times = []
        for i in range(64):
            t0 = time.perf_counter()
            rt.score(state, sets[i % len(sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    return measure


def scorer_median(before: list[float], after: list[float]) -> dict[str, float]:
    """The scorer's figures for one run from the blocks timed either side of it: each
    block's median, and as the ratio's term the lower of the two. A block that caught a
    slow moment (another tenant on the core, 25 % slower for tens of milliseconds) would
    otherwise lower the ratio; the median of both blocks together lands in the gap
    between them when they differ. The lower one can only raise the ratio."""
    b, a = float(statistics.median(before)), float(statistics.median(after))
    return {
        "inprocess_score_ms": min(b, a),
        "inprocess_score_before_ms": b,
        "inprocess_score_after_ms": a,
    }


def metric_families(base_url: str) -> list[Any]:
    """The service's /metrics, parsed (prometheus_client's metric families)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:
        return list(text_string_to_metric_families(resp.read().decode()))


def stage_sums(families: list[Any]) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of the service's /rank histograms: the whole request as the
    app sees it (`app`) and each stage, from a scrape of its /metrics (`metric_families`)."""
    sums: dict[str, list[float]] = {}
    for family in families:
        if family.name not in (
            "ifa_rank_request_duration_seconds",
            "ifa_rank_stage_duration_seconds",
        ):
            continue
        for sample in family.samples:
            key = sample.labels.get("stage") or "app"
            if sample.name.endswith("_sum"):
                sums.setdefault(key, [0.0, 0.0])[0] += sample.value
            elif sample.name.endswith("_count"):
                sums.setdefault(key, [0.0, 0.0])[1] += sample.value
    return {k: (v[0], v[1]) for k, v in sums.items()}


def connections_moved(families: list[Any]) -> tuple[float, float]:
    """From a scrape of the service's /metrics (merged over its workers), connections moved to even
    the workers' share: sent away with `Connection: close`
    (`ifa_connections_moved_total`) and passed on unread
    (`ifa_connections_handed_off_total`)."""
    totals = dict.fromkeys(("ifa_connections_moved", "ifa_connections_handed_off"), 0.0)
    for family in families:
        if family.name in totals:
            totals[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals["ifa_connections_moved"], totals["ifa_connections_handed_off"]


def stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean ms per request of each stage between two scrapes."""
    out = {}
    for key, (total, count) in after.items():
        t0, c0 = before.get(key, (0.0, 0.0))
        if count > c0:
            out[key] = (total - t0) / (count - c0) * 1e3
    return out


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over repeated runs; the runs themselves are kept."""
    out: dict[str, Any] = {"runs": runs, "repeats": len(runs)}
    for key in (
        *FIGURES,
        "server_cpu_ms_per_req",
        "server_cpu_cores",
        "steal_pct",
        "client_cpu_us_per_req",
        "redis_cpu_ms_per_req",
        "inprocess_score_ms",
        "inprocess_score_before_ms",
        "inprocess_score_after_ms",
        "connections_moved",
        "connections_passed",
    ):
        values = [r[key] for r in runs if key in r and r[key] == r[key]]
        if values:
            out[key] = float(statistics.median(values))
    stages = [r["server_stage_mean_ms"] for r in runs if r.get("server_stage_mean_ms")]
    if stages:
        out["server_stage_mean_ms"] = {
            k: float(statistics.median(st[k] for st in stages if k in st)) for k in stages[0]
        }
    out["requests"] = int(sum(r["requests"] for r in runs))
    out["errors"] = int(sum(r["errors"] for r in runs))
    # 503 + Retry-After: shed by admission (counted among the errors too)
    out["shed"] = int(sum(int((r.get("status") or {}).get("503", 0)) for r in runs))
    out["tool"] = runs[0]["tool"] if runs else None
    out["concurrency"] = runs[0]["concurrency"] if runs else None
    return out


def measure_ceilings(svc: LocalService, plan: BenchPlan, choice: str) -> dict[str, Any]:
    """Each available generator against /healthz at the highest concurrency.

    ceiling_rps = 1 / (client CPU per request): what the generator could drive with one
    full core to itself, however fast the server were.
    """
    tools = ["pyclient"]
    if choice in ("auto", "wrk") and wrk.ensure_wrk(install=True):
        tools.insert(0, "wrk")
    elif choice == "wrk":
        log.warning("wrk is not available; using the asyncio client")
    if choice == "pyclient":
        tools = ["pyclient"]
    c = max(plan.concurrency)
    out: dict[str, Any] = {}
    for tool in tools:
        r = Loader(tool, svc).run("GET", "/healthz", [None], c, plan)
        cpu_us = r.get("client_cpu_us_per_req") or float("nan")
        out[tool] = {
            "healthz_rps": r["rps"],
            "healthz_p50_ms": r["p50_ms"],
            "client_cpu_us_per_req": cpu_us,
            "ceiling_rps_per_core": 1e6 / cpu_us if cpu_us == cpu_us and cpu_us > 0 else None,
            "concurrency": c,
        }
    return {"tools": out, "chosen": choose_generator(out, choice)}


WRK_MARGIN = 1.25  # how much higher another generator's ceiling must be to replace wrk


def choose_generator(ceilings: dict[str, dict[str, Any]], choice: str) -> str:
    """The generator for the bench: `choice` where measured; for auto, wrk (the issue's
    targets are stated for it) unless another's ceiling is WRK_MARGIN times its own.
    The two measure within a few per cent of each other, so picking the higher ceiling
    flipped between runs on noise and made runs of one build hard to compare."""
    ranked = sorted(ceilings, key=lambda t: -(ceilings[t]["ceiling_rps_per_core"] or 0.0))
    if choice != "auto":
        return choice if choice in ceilings else ranked[0]
    if "wrk" in ceilings and ranked[0] != "wrk":
        wrk_ceiling = ceilings["wrk"]["ceiling_rps_per_core"] or 0.0
        if (ceilings[ranked[0]]["ceiling_rps_per_core"] or 0.0) < WRK_MARGIN * wrk_ceiling:
            return "wrk"
    return ranked[0]


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[float, int, Any]:
    """One POST on a keep-alive connection: (client ms, status, parsed JSON)."""
    t0 = time.perf_counter_ns()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    ms = (time.perf_counter_ns() - t0) / 1e6
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode(errors="replace")
    return ms, resp.status, parsed


def timed_requests(
    conn: http.client.HTTPConnection, path: str, bodies: list[bytes], before: Callable[[int], None]
) -> list[dict[str, Any]]:
    samples = []
    for i, body in enumerate(bodies):
        before(i)
        ms, status, parsed = post(conn, path, body)
        sample: dict[str, Any] = {"client_ms": ms, "status": status}
        if isinstance(parsed, dict):
            sample["degraded"] = parsed.get("degraded")
            sample["timings_ms"] = parsed.get("timings_ms")
        samples.append(sample)
    return samples


def summarise_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    lat = np.array([s["client_ms"] for s in samples], dtype=np.float64)
    out: dict[str, Any] = {"requests": len(samples)}
    out.update(httpload.percentiles_ms(lat))
    out["errors"] = sum(1 for s in samples if s["status"] != 200)
    degraded: dict[str, int] = {}
    for s in samples:
        if s.get("degraded"):
            degraded[str(s["degraded"])] = degraded.get(str(s["degraded"]), 0) + 1
    out["degraded"] = degraded
    stages: dict[str, list[float]] = {}
    for s in samples:
        for k, v in (s.get("timings_ms") or {}).items():
            if isinstance(v, int | float):
                stages.setdefault(k, []).append(float(v))
    out["server_timings_ms_median"] = {k: float(np.median(v)) for k, v in stages.items()}
    return out
