"""The HTTP half of the bench: a real service on loopback, seeded users, closed-loop load
with wrk or the asyncio client, the service's own stage timings, CPU and memory (each
run measured by `bench_measure`), the open loop, the worker counts, the cold builds."""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loadtest import httpload, openloop
from loadtest.bench_measure import (
    Loader,
    candidate_sets,
    connections_moved,
    inprocess_scorer,
    measure_ceilings,
    median_summary,
    metric_families,
    post,
    rank_body,
    scorer_median,
    stage_means,
    stage_sums,
    summarise_samples,
    timed_requests,
)
from loadtest.bench_plan import BenchPlan
from loadtest.server import LocalService, http_json
from loadtest.sysinfo import proc_rss_mib

log = logging.getLogger("loadtest.bench")


class Endpoint(Protocol):
    """Where a service listens (a `LocalService`, or a test's own server)."""

    host: str
    port: int


# ---------------------------------------------------------------------- HTTP bench
def open_loop(
    svc: Endpoint, plan: BenchPlan, bodies: list[bytes | None], load: dict[str, Any]
) -> dict[str, Any]:
    """Warm /rank at fixed arrival rates, latency from each request's intended send time:
    the tail a closed loop hides.

    The rates are fractions of the lower of two saturated rates: wrk's best closed-loop
    rate, and what the service answers beside this generator when offered more than it
    can take (`ceiling`). The generator is Python on the same box and costs several times
    wrk's CPU per request, so wrk's rate is more than the service can do beside it: 80 %
    of it was within a few percent of what the box could answer (docs/performance.md)."""
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

    def run(rate: float, connections: int) -> dict[str, Any]:
        return openloop.run_open_loop(
            svc.host,
            svc.port,
            reqs,
            rate=rate,
            duration_s=plan.duration_s,
            warmup_s=plan.warmup_s,
            connections=connections,
        ).summary()

    ceiling = run(plan.open_loop_ceiling_offer * saturated, plan.open_loop_ceiling_connections)
    reference = openloop.reference_rate(saturated, ceiling["served_rps"])
    out.update(ceiling=ceiling, ceiling_rps=ceiling["served_rps"], reference_rps=reference)
    log.info(
        "open loop ceiling: offered %.0f req/s over %d connections, answered %.0f req/s "
        "(wrk's closed loop: %.0f); fractions of %.0f",
        ceiling["target_rps"],
        plan.open_loop_ceiling_connections,
        ceiling["served_rps"],
        saturated,
        reference,
    )
    for frac in plan.open_loop_fractions:
        r = run(frac * reference, plan.open_loop_connections)
        out["runs"][f"{frac:g}"] = r
        log.info(
            "open loop %3.0f%% (%.0f req/s): p50 %.2f ms  p99 %.2f ms  achieved %.0f  errors %d",
            100 * frac,
            r["target_rps"],
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
    one: LocalService,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The warm /rank runs again against N worker processes on the same Redis (the warm
    states the single process wrote there are read once per worker, then cached), each
    run beside one of the same length against the single process `one`, in turn (every
    other round in reverse): the box's speed moves by half within minutes, so the worker
    phase is compared with single-process runs of the same rounds, not with the load
    phase minutes before. Returns (N workers, the single process beside them), by N."""
    out: dict[str, Any] = {}
    beside: dict[str, Any] = {}
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
            loaders = [(n, Loader(tool, svc)), (1, Loader(tool, one))]
            series: dict[str, list[dict[str, Any]]] = {}
            series_one: dict[str, list[dict[str, Any]]] = {}
            for rep in range(plan.repeats):
                for c in plan.worker_concurrency:
                    for k, loader in loaders if rep % 2 == 0 else loaders[::-1]:
                        if k == 1:
                            r = loader.run("POST", "/rank", bodies, c, plan)
                            series_one.setdefault(f"rank_warm_c{c}", []).append(r)
                            continue
                        # one scrape each side: the workers' own clock beside the
                        # generator's, and the generator's connections (warm-up and run)
                        # moved to even the workers' share (the scrape's own connection
                        # may be one of them)
                        scrape = metric_families(svc.base_url)
                        (moved, passed), before = connections_moved(scrape), stage_sums(scrape)
                        r = loader.run("POST", "/rank", bodies, c, plan)
                        scrape = metric_families(svc.base_url)
                        r["server_stage_mean_ms"] = stage_means(before, stage_sums(scrape))
                        moved_after, passed_after = connections_moved(scrape)
                        r["connections_moved"] = moved_after - moved
                        r["connections_passed"] = passed_after - passed
                        series.setdefault(f"rank_warm_c{c}", []).append(r)
                    r, r1 = series[f"rank_warm_c{c}"][-1], series_one[f"rank_warm_c{c}"][-1]
                    log.info(
                        "%d workers c=%-3d p50 %.2f ms  p99 %.2f ms  %.0f req/s  errors %d "
                        "(one process beside: %.0f req/s)",
                        n,
                        c,
                        r["p50_ms"],
                        r["p99_ms"],
                        r["rps"],
                        r["errors"],
                        r1["rps"],
                    )
            out[str(n)] = {k: median_summary(v) for k, v in series.items()}
            beside[str(n)] = {k: median_summary(v) for k, v in series_one.items()}
        finally:
            svc.stop()
    return out, beside


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
                    before = (
                        stage_sums(metric_families(svc.base_url)) if name == "rank_warm" else None
                    )
                    timed = name == "rank_warm" and c == 1  # the overhead ratio's run
                    before_ms = scorer() if timed else []
                    r = loader.run(method, path, bs, c, plan)
                    if timed:
                        r.update(scorer_median(before_ms, scorer()))
                    if before is not None:
                        after = stage_sums(metric_families(svc.base_url))
                        r["server_stage_mean_ms"] = stage_means(before, after)
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
        result["workers"], result["workers_beside"] = worker_runs(
            plan, artifacts, svc.start_redis(), users, bodies, loader.tool, out_dir, svc
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
