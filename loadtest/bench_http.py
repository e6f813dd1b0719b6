"""The HTTP half of the bench: a real service on loopback, seeded users, closed-loop load
with wrk or the asyncio client, the service's own stage timings, CPU and memory."""

from __future__ import annotations

import http.client
import json
import logging
import os
import statistics
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import httpload, openloop, wrk
from loadtest.bench_plan import FIGURES, BenchPlan
from loadtest.server import LocalService, http_json
from loadtest.sysinfo import cpu_ticks, proc_rss_mib, steal_pct, tree_cpu_s

log = logging.getLogger("loadtest.bench")


# ---------------------------------------------------------------------- HTTP helpers
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
        out["steal_pct"] = steal_pct(ticks0, cpu_ticks())
        return out


def inprocess_scorer(artifacts: str, m: int, items: int) -> Callable[[], float]:
    """A closure timing the served artifact's scorer in this process (median ms of 64
    calls at M = m, fresh candidates each): the overhead ratio's denominator, taken
    between the HTTP runs so that it sees the machine in the same state as they do."""
    from loadtest.microbench import _events
    from service.engine.runtime import ModelRuntime

    rt = ModelRuntime.load(artifacts, None, intra_op_threads=1, prefer_cuda=False)
    state = rt.build_state(_events(1_000))
    rng = np.random.default_rng(3)
    sets = [rng.integers(0, items, m) for _ in range(32)]  # new candidates each call, as served

    def measure() -> float:
        for cands in sets[:5]:
            rt.score(state, cands)
        times = []
        for i in range(64):
            t0 = time.perf_counter()
            rt.score(state, sets[i % len(sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(times))

    return measure


def metric_families(base_url: str) -> list[Any]:
    """The service's /metrics, parsed (prometheus_client's metric families)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:
        return list(text_string_to_metric_families(resp.read().decode()))


def stage_sums(base_url: str) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of the service's /rank histograms: the whole request as the
    app sees it (`app`) and each stage, read from its own /metrics."""
    sums: dict[str, list[float]] = {}
    for family in metric_families(base_url):
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


def connections_moved(base_url: str) -> float:
    """`ifa_connections_moved_total` from the service's /metrics (merged over its workers):
    connections sent to another worker to even their share."""
    for family in metric_families(base_url):
        if family.name == "ifa_connections_moved":
            return float(sum(s.value for s in family.samples if s.name.endswith("_total")))
    return 0.0


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
        "inprocess_score_ms",
        "connections_moved",
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
    ranked = sorted(out, key=lambda t: -(out[t]["ceiling_rps_per_core"] or 0.0))
    chosen = ranked[0] if choice == "auto" else (choice if choice in out else ranked[0])
    return {"tools": out, "chosen": chosen}


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


# ---------------------------------------------------------------------- HTTP bench
def open_loop(
    svc: LocalService, plan: BenchPlan, bodies: list[bytes | None], load: dict[str, Any]
) -> dict[str, Any]:
    """Warm /rank at fixed arrival rates (fractions of the best closed-loop rate), latency
    from each request's intended send time: the tail a closed loop hides."""
    saturated = max(
        (v.get("rps") or 0.0 for k, v in load.items() if k.startswith("rank_warm_c")),
        default=0.0,
    )
    out: dict[str, Any] = {"saturated_rps": saturated, "runs": {}}
    if saturated <= 0:
        return out
    reqs = [
        httpload.build_request("POST", "/rank", b, host=f"{svc.host}:{svc.port}")
        for b in bodies
        if b is not None
    ]
    for frac in plan.open_loop_fractions:
        rate = frac * saturated
        r = openloop.run_open_loop(
            svc.host,
            svc.port,
            reqs,
            rate=rate,
            duration_s=plan.duration_s,
            warmup_s=plan.warmup_s,
            connections=plan.open_loop_connections,
        ).summary()
        out["runs"][f"{frac:g}"] = r
        log.info(
            "open loop %3.0f%% (%.0f req/s): p50 %.2f ms  p99 %.2f ms  achieved %.0f  errors %d",
            100 * frac,
            rate,
            r["p50_ms"],
            r["p99_ms"],
            r["rps"],
            r["errors"],
        )
    return out


def worker_runs(
    plan: BenchPlan,
    artifacts: str,
    redis_url: str,
    users: list[str],
    bodies: list[bytes | None],
    tool: str,
    out_dir: Path,
) -> dict[str, Any]:
    """The warm /rank runs again against N worker processes on the same Redis (the warm
    states the single process wrote there are read once per worker, then cached)."""
    out: dict[str, Any] = {}
    for n in plan.worker_counts:
        svc = LocalService(
            artifacts_dir=artifacts,
            redis_url=redis_url,
            workers=n,
            log_path=out_dir / f"bench-server-w{n}.log",
        )
        try:
            svc.start_service()
            for _ in range(4 * n):  # every worker sees every user once (warm afterwards)
                for u in users:
                    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=120)
                    post(conn, "/rank", rank_body(u, [1, 2, 3], budget_ms=60_000))
                    conn.close()
            loader = Loader(tool, svc)
            series: dict[str, list[dict[str, Any]]] = {}
            for _ in range(plan.repeats):
                for c in plan.worker_concurrency:
                    moved = connections_moved(svc.base_url)
                    r = loader.run("POST", "/rank", bodies, c, plan)
                    # wrk's connections (warm-up and run) sent away to even the workers'
                    # share (the scrape's own connection may be one of them)
                    r["connections_moved"] = connections_moved(svc.base_url) - moved
                    series.setdefault(f"rank_warm_c{c}", []).append(r)
                    log.info(
                        "%d workers c=%-3d p50 %.2f ms  p99 %.2f ms  %.0f req/s  errors %d",
                        n,
                        c,
                        r["p50_ms"],
                        r["p99_ms"],
                        r["rps"],
                        r["errors"],
                    )
            out[str(n)] = {k: median_summary(v) for k, v in series.items()}
        finally:
            svc.stop()
    return out


def seed_warm_users(client: Any, plan: BenchPlan) -> None:
    """The warm users `warm-0..` (fixed seed: every run and variant has the same
    histories)."""
    from loadtest.seed import seed_synthetic

    seed_synthetic(
        client,
        plan.warm_users,
        plan.n_events,
        items=plan.items,
        prefix="warm",
        seed=11,
        progress=False,
    )


def http_bench(plan: BenchPlan, artifacts: str, out_dir: Path, choice: str) -> dict[str, Any]:
    from loadtest.seed import connect, env_cluster, seed_synthetic, seq_key

    # IFA_REDIS_URL (and IFA_REDIS_CLUSTER) name a Redis or cluster to run against; unset,
    # the bench starts a throwaway server of its own
    external = os.environ.get("IFA_REDIS_URL") or None
    cluster = external is not None and env_cluster()
    svc = LocalService(
        artifacts_dir=artifacts, redis_url=external, log_path=out_dir / "bench-server.log"
    )
    result: dict[str, Any] = {"plan": asdict(plan), "redis": "cluster" if cluster else "one"}
    try:
        client = connect(svc.start_redis(), cluster=cluster)
        t0 = time.perf_counter()
        seed_warm_users(client, plan)
        seed_synthetic(
            client, 1, plan.n_events, items=plan.items, prefix="coldsrc", seed=12, progress=False
        )
        result["seed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        svc.start_service()
        result["startup_s"] = time.perf_counter() - t0
        result["settings_env"] = svc.settings_env
        result["server_command"] = " ".join(
            ["python", "-m", "uvicorn", "--factory", "service.app:app_from_env", "..."]
        )
        _, model = http_json(svc.base_url + "/v1/model")
        result["model"] = model
        rng = np.random.default_rng(7)
        users = [f"warm-{i}" for i in range(plan.warm_users)]
        sets = candidate_sets(rng, plan.warm_users * plan.bodies_per_user, plan.m, plan.items)
        bodies: list[bytes | None] = [
            rank_body(users[i % len(users)], s) for i, s in enumerate(sets)
        ]
        big = candidate_sets(rng, plan.warm_users, plan.m_large, plan.items)
        bodies_large: list[bytes | None] = [
            rank_body(u, c) for u, c in zip(users, big, strict=True)
        ]
        conn = http.client.HTTPConnection(svc.host, svc.port, timeout=120)

        # First request per warm user: a cold build (big budget, so never partial).
        prime = [rank_body(u, sets[0], budget_ms=60_000) for u in users]
        result["first_request"] = summarise_samples(
            timed_requests(conn, "/rank", prime, lambda i: None)
        )
        warm_samples = timed_requests(conn, "/rank", [b for b in bodies if b] * 2, lambda i: None)
        result["warm_single"] = summarise_samples(warm_samples)
        result["rss_mib_before_load"] = proc_rss_mib(svc.pid)

        scorer = inprocess_scorer(artifacts, plan.m, plan.items)
        ceilings = measure_ceilings(svc, plan, choice)
        result["load_generator"] = ceilings
        loader = Loader(ceilings["chosen"], svc)
        series: dict[str, list[dict[str, Any]]] = {}
        for rep in range(plan.repeats):
            for c in plan.concurrency:
                healthz: list[bytes | None] = [None]
                runs: list[tuple[str, str, str, list[bytes | None]]] = [
                    ("rank_warm", "POST", "/rank", bodies)
                ]
                if c in plan.healthz_concurrency:
                    runs.insert(0, ("healthz", "GET", "/healthz", healthz))
                if c == 1:  # the long candidate list, one at a time
                    runs.append((f"rank_warm_m{plan.m_large}", "POST", "/rank", bodies_large))
                for name, method, path, bs in runs:
                    key = f"{name}_c{c}"
                    before = stage_sums(svc.base_url) if name == "rank_warm" else None
                    scorer_ms = scorer() if name == "rank_warm" and c == 1 else None
                    r = loader.run(method, path, bs, c, plan)
                    if scorer_ms is not None:
                        r["inprocess_score_ms"] = scorer_ms
                    if before is not None:
                        r["server_stage_mean_ms"] = stage_means(before, stage_sums(svc.base_url))
                    series.setdefault(key, []).append(r)
                    log.info(
                        "rep %d %-14s p50 %.2f ms  p99 %.2f ms  %.0f req/s  errors %d",
                        rep + 1,
                        key,
                        r["p50_ms"],
                        r["p99_ms"],
                        r["rps"],
                        r["errors"],
                    )
        result["load"] = {k: median_summary(v) for k, v in series.items()}
        result["open_loop"] = open_loop(svc, plan, bodies, result["load"])
        result["rss_mib_after_load"] = proc_rss_mib(svc.pid)

        # The load phase can outlast the server's keep-alive: reconnect on the next request.
        conn.close()
        # Cold: never-seen users whose sequence is a server-side copy of a 100k template.
        cands = sets[0]
        tag = uuid.uuid4().hex[:8]
        n_cold = plan.cold_warmup + plan.cold_requests
        cold_users = [f"cold-{tag}-{k}" for k in range(n_cold)]
        src = seq_key("coldsrc-0")

        def copy_user(i: int) -> None:
            if i > 0:
                client.delete(seq_key(cold_users[i - 1]))
            if cluster:  # COPY stays within a slot; a cold user's key is in another
                client.set(seq_key(cold_users[i]), client.get(src) or b"")
            else:
                client.copy(src, seq_key(cold_users[i]))

        cold_bodies = [rank_body(u, cands, budget_ms=60_000) for u in cold_users]
        cold = timed_requests(conn, "/rank", cold_bodies, copy_user)
        client.delete(seq_key(cold_users[-1]))
        result["cold"] = summarise_samples(cold[plan.cold_warmup :])

        # Refresh: 100 new events, then /rank folds them into the cached state.
        from loadtest.seed import synthetic_events

        samples: list[dict[str, Any]] = []
        for i in range(plan.refresh_requests):
            user = users[i % len(users)]
            ev = synthetic_events(
                100,
                plan.items,
                200,
                np.random.default_rng([99, i]),
                ts0=1_700_000_000 + i * 100_000,
            )
            events = [
                {"item_id": int(e["item_id"]), "ts": int(e["ts"]), "action": int(e["action"])}
                for e in ev
            ]
            _, status, _ = post(
                conn, "/events", json.dumps({"user_id": user, "events": events}).encode()
            )
            if status != 200:
                raise RuntimeError(f"POST /events answered {status}")
            samples += timed_requests(conn, "/rank", [rank_body(user, cands)], lambda i: None)
        result["refresh_100"] = summarise_samples(samples)
        conn.close()
        result["rss_mib_end"] = proc_rss_mib(svc.pid)
        result["workers"] = worker_runs(
            plan, artifacts, svc.start_redis(), users, bodies, loader.tool, out_dir
        )
        from loadtest.bench_variants import variants_bench

        if not plan.variants:
            return result
        try:
            result["cluster"] = variants_bench(plan, artifacts, users, bodies, loader.tool, out_dir)
        except Exception as e:  # a cluster that would not start must not lose the rest
            log.exception("cluster bench failed")
            result["cluster"] = {"error": f"{type(e).__name__}: {e}"}
        return result
    finally:
        svc.stop()
