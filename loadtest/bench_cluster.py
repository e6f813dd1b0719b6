"""The cluster part of `make bench`: warm /rank against a Redis Cluster beside the same
against one Redis, in one run, interleaved.

A local cluster (3 primaries, a replica each, `loadtest.redis_cluster`) is seeded with the
same warm users as the single Redis of the main run. Four service processes start, one
per (backend, warm check): `push` (a warm answer asks Redis nothing while nothing
changed) and `strict` (one Redis command per request: the warm path's one EVALSHA, routed
by slot on the cluster). Each is primed, then every repeat measures each of them in turn,
so the box's drift falls on all four alike. The idle ones cost nothing but their pings.
"""

from __future__ import annotations

import http.client
import logging
import tempfile
from pathlib import Path
from typing import Any

from loadtest.bench_http import Loader, median_summary, post, rank_body
from loadtest.bench_plan import BenchPlan
from loadtest.redis_cluster import LocalRedisCluster
from loadtest.seed import connect, seed_synthetic
from loadtest.server import LocalService

log = logging.getLogger(__name__)

MODES = ("push", "strict")
BACKENDS = ("redis", "cluster")


def runs(plan: BenchPlan, mode: str) -> tuple[int, ...]:
    """The concurrencies measured per warm-check mode."""
    return plan.cluster_concurrency if mode == "push" else plan.cluster_concurrency[:1]


def cluster_bench(
    plan: BenchPlan,
    artifacts: str,
    redis_url: str,
    users: list[str],
    bodies: list[bytes | None],
    tool: str,
    out_dir: Path,
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="ifa-bench-cluster-") as tmp,
        LocalRedisCluster(Path(tmp)) as cluster,
    ):
        client = connect(cluster.url, cluster=True)
        try:  # the main run's warm users, the same seed: the same histories
            seed_synthetic(
                client,
                plan.warm_users,
                plan.n_events,
                items=plan.items,
                prefix="warm",
                seed=11,
                progress=False,
            )
        finally:
            client.close()
        urls = {"redis": redis_url, "cluster": cluster.url}
        services: dict[tuple[str, str], LocalService] = {}
        try:
            for mode in MODES:
                for backend in BACKENDS:
                    env = {"IFA_WARM_CHECK": mode}
                    if backend == "cluster":
                        env["IFA_REDIS_CLUSTER"] = "true"
                    svc = LocalService(
                        artifacts_dir=artifacts,
                        redis_url=urls[backend],
                        env=env,
                        log_path=out_dir / f"bench-server-{backend}-{mode}.log",
                    )
                    services[(backend, mode)] = svc
                    svc.start_service()
                    conn = http.client.HTTPConnection(svc.host, svc.port, timeout=120)
                    for u in users:  # warm: the state built (or read) and cached
                        post(conn, "/rank", rank_body(u, [1, 2, 3], budget_ms=60_000))
                    conn.close()
            series: dict[str, list[dict[str, Any]]] = {}
            for rep in range(plan.repeats):
                for (backend, mode), svc in services.items():
                    for c in runs(plan, mode):
                        r = Loader(tool, svc).run("POST", "/rank", bodies, c, plan)
                        series.setdefault(f"{backend}_{mode}_c{c}", []).append(r)
                        log.info(
                            "rep %d %-7s %-6s c=%-3d p50 %.2f ms  p99 %.2f ms  %.0f req/s",
                            rep + 1,
                            backend,
                            mode,
                            c,
                            r["p50_ms"],
                            r["p99_ms"],
                            r["rps"],
                        )
        finally:
            for svc in services.values():
                svc.stop()
    out: dict[str, Any] = {
        "topology": "3 primaries + 1 replica each, loopback",
        "runs": {k: median_summary(v) for k, v in series.items()},
    }
    for mode in MODES:
        for c in runs(plan, mode):
            single = out["runs"][f"redis_{mode}_c{c}"]["p50_ms"]
            on_cluster = out["runs"][f"cluster_{mode}_c{c}"]["p50_ms"]
            out[f"p50_ratio_{mode}_c{c}"] = on_cluster / single if single else None
    return out
