"""The interleaved variants of `make bench`: warm /rank on a Redis Cluster beside one
Redis, and with the impression log off beside on (its default), in one run.

A local cluster (3 primaries, a replica each, `loadtest.redis_cluster`) is seeded with the
same warm users as the single Redis of the main run. Six service processes start:

    redis/push, cluster/push      push warm check: a warm answer asks Redis nothing
    redis/strict, cluster/strict  one Redis command per request (the warm path's EVALSHA,
                                  routed by slot on the cluster)
    redis/push/nolog              IFA_IMPRESSION_LOG=false: what logging the answers costs
    redis/push/unordered          IFA_STARTS_PER_ITERATION=0: every request read in one poll
                                  runs back to back (service/engine/turnstile.py)

Each is primed, then every repeat measures each of them in turn, so the box's drift falls
on all alike. The idle ones cost nothing but their pings.
"""

from __future__ import annotations

import http.client
import logging
import tempfile
from pathlib import Path
from typing import Any

from loadtest.bench_http import seed_warm_users
from loadtest.bench_measure import Loader, median_summary, post, rank_body
from loadtest.bench_plan import BenchPlan
from loadtest.redis_cluster import LocalRedisCluster
from loadtest.seed import connect
from loadtest.server import LocalService
from service.store.embedded_redis import RedisServer, free_port

log = logging.getLogger(__name__)

# name -> (backend, extra settings); the first concurrency only unless "all"
VARIANTS: dict[str, tuple[str, dict[str, str], bool]] = {
    "redis_push": ("redis", {"IFA_WARM_CHECK": "push"}, True),
    "cluster_push": ("cluster", {"IFA_WARM_CHECK": "push"}, True),
    "redis_strict": ("redis", {"IFA_WARM_CHECK": "strict"}, False),
    "cluster_strict": ("cluster", {"IFA_WARM_CHECK": "strict"}, False),
    "redis_push_nolog": ("redis", {"IFA_WARM_CHECK": "push", "IFA_IMPRESSION_LOG": "false"}, True),
    "redis_push_unordered": (
        "redis",
        {"IFA_WARM_CHECK": "push", "IFA_STARTS_PER_ITERATION": "0"},
        True,
    ),
}
# the ratios reported: (name, figure, numerator variant, denominator variant)
RATIOS = (
    ("p50_ratio_push", "p50_ms", "cluster_push", "redis_push"),
    ("p50_ratio_strict", "p50_ms", "cluster_strict", "redis_strict"),
    ("p50_ratio_impression_log", "p50_ms", "redis_push", "redis_push_nolog"),
    ("p99_ratio_ordered_starts", "p99_ms", "redis_push", "redis_push_unordered"),
)


def runs(plan: BenchPlan, variant: str) -> tuple[int, ...]:
    every = VARIANTS[variant][2]
    return plan.cluster_concurrency if every else plan.cluster_concurrency[:1]


def variants_bench(
    plan: BenchPlan,
    artifacts: str,
    users: list[str],
    bodies: list[bytes | None],
    tool: str,
    out_dir: Path,
) -> dict[str, Any]:
    """On a Redis and a cluster of their own (whatever the main run used), each seeded
    with the main run's warm users."""
    with (
        tempfile.TemporaryDirectory(prefix="ifa-bench-variants-") as tmp,
        LocalRedisCluster(Path(tmp) / "cluster") as cluster,
    ):
        single = RedisServer(Path(tmp) / "redis", port=free_port(), persist=False).start()
        try:
            return _measure(plan, artifacts, single.url, cluster.url, users, bodies, tool, out_dir)
        finally:
            single.stop()


def _measure(
    plan: BenchPlan,
    artifacts: str,
    redis_url: str,
    cluster_url: str,
    users: list[str],
    bodies: list[bytes | None],
    tool: str,
    out_dir: Path,
) -> dict[str, Any]:
    for url, is_cluster in ((redis_url, False), (cluster_url, True)):
        client = connect(url, cluster=is_cluster)
        try:
            seed_warm_users(client, plan)  # the main run's warm users
        finally:
            client.close()
    urls = {"redis": redis_url, "cluster": cluster_url}
    services: dict[str, LocalService] = {}
    try:
        for name, (backend, env, _) in VARIANTS.items():
            env = {**env, "IFA_REDIS_CLUSTER": "true" if backend == "cluster" else "false"}
            svc = LocalService(
                artifacts_dir=artifacts,
                redis_url=urls[backend],
                env=env,
                log_path=out_dir / f"bench-server-{name}.log",
            )
            services[name] = svc
            svc.start_service()
            conn = http.client.HTTPConnection(svc.host, svc.port, timeout=120)
            for u in users:  # warm: the state built (or read) and cached
                post(conn, "/rank", rank_body(u, [1, 2, 3], budget_ms=60_000))
            conn.close()
        series: dict[str, list[dict[str, Any]]] = {}
        for rep in range(plan.repeats):
            for name, svc in services.items():
                for c in runs(plan, name):
                    r = Loader(tool, svc).run("POST", "/rank", bodies, c, plan)
                    series.setdefault(f"{name}_c{c}", []).append(r)
                    log.info(
                        "rep %d %-17s c=%-3d p50 %.2f ms  p99 %.2f ms  %.0f req/s",
                        rep + 1,
                        name,
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
    for ratio, figure, top, bottom in RATIOS:
        for c in runs(plan, top):
            over = out["runs"].get(f"{bottom}_c{c}", {}).get(figure)
            under = out["runs"].get(f"{top}_c{c}", {}).get(figure)
            out[f"{ratio}_c{c}"] = under / over if over and under else None
    return out
