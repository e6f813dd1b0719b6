"""The bench's derived figures: the targets of docs/design.md §8 and the ratios, from the
measured ones."""

from __future__ import annotations

from typing import Any

from loadtest.bench_shortfall import dig as _get
from loadtest.bench_shortfall import shortfalls


def derive(report: dict[str, Any]) -> dict[str, Any]:
    """The ratios and targets of docs/design.md §8 from the measured figures."""
    from loadtest.report import inprocess_figures

    ip = inprocess_figures(report.get("inprocess") or {})
    http = report.get("http") or {}
    load = http.get("load") or {}
    # the scorer timed between the c=1 runs; the in-process part's figure otherwise
    score_ms = _get(load, "rank_warm_c1", "inprocess_score_ms") or ip.get("score_ms_500")
    derived: dict[str, Any] = {"inprocess": ip}
    hz = _get(load, "healthz_c1", "p50_ms")
    rank = _get(load, "rank_warm_c1", "p50_ms")
    if hz is not None and rank is not None and score_ms is not None:
        derived["overhead_ratio"] = rank / (hz + score_ms)
        derived["overhead_terms_ms"] = {
            "rank_warm_p50": rank,
            "healthz_p50": hz,
            "inprocess_score_m500": score_ms,
        }
    # where a warm request's time goes, from the service's own histograms over the
    # same c=1 runs (means): the app's time (middleware to middleware) and its stages
    st = _get(load, "rank_warm_c1", "server_stage_mean_ms")
    mean = _get(load, "rank_warm_c1", "mean_ms")
    hz_mean = _get(load, "healthz_c1", "mean_ms")
    if isinstance(st, dict) and "app" in st and mean is not None and hz_mean is not None:
        stages = {k: v for k, v in st.items() if k != "app"}
        derived["time_split_ms"] = {
            "client_mean": mean,
            "healthz_mean": hz_mean,
            "app_mean": st["app"],
            **{f"stage_{k}": v for k, v in stages.items()},
            "app_other": st["app"] - sum(stages.values()),
            "outside_app": mean - st["app"],
        }
    targets: list[dict[str, Any]] = []

    def target(
        key: str,
        name: str,
        value: Any,
        limit: float,
        higher_is_better: bool = False,
        judged: bool = True,
    ) -> None:
        # key: a stable id (bench_shortfall explains a missed target by it); name: for
        # people; judged=False: a reference row, held to the limit but not a target
        row: dict[str, Any] = {"key": key, "name": name, "target": limit, "judged": judged}
        if value is None:
            targets.append({**row, "value": None, "ok": None})
            return
        ok = value >= limit if higher_is_better else value <= limit
        targets.append(
            {
                **row,
                "value": float(value),
                "op": ">=" if higher_is_better else "<=",
                "ok": bool(ok),
            }
        )

    # The three figures of docs/design.md §8 in the same closed-loop runs (c=1: latency is
    # not inflated by queueing), then the saturated rate (c=8), whose latency is c / rate
    # by Little's law (8 / 300 req/s = 27 ms) and so is reported, not targeted.
    target("p50_c1", "warm /rank p50 ms (N=100k, M=500, c=1)", rank, 3.0)
    p99_c1, c1 = _get(load, "rank_warm_c1", "p99_ms"), _get(load, "rank_warm_c1", "rps")
    target("p99_c1", "warm /rank p99 ms (N=100k, M=500, c=1)", p99_c1, 10.0)
    target(
        "rate_c1", "warm /rank req/s in the same c=1 runs (generator on the box)", c1, 300.0, True
    )
    c8 = _get(load, "rank_warm_c8", "rps")
    target("rate_c8", "warm /rank req/s (c=8, saturated)", c8, 300.0, higher_is_better=True)
    # The throughput targets are judged on the service as deployed for throughput: two
    # worker processes, one per core (IFA_WORKERS=2, deploy/k8s/configmap.yaml). One
    # process runs its Python on one core, so its 16-connection rate is capped near its
    # c=1 rate; its rows stay beside them for reference, held to the same limits but not
    # judged (the report says why they fall outside).
    c16 = _get(load, "rank_warm_c16", "rps")
    target("rate_c16", "warm /rank req/s (c=16, one process)", c16, 1000.0, True, judged=False)
    p99_one = _get(load, "rank_warm_c16", "p99_ms")
    target("p99_c16", "warm /rank p99 ms (c=16, one process)", p99_one, 15.0, judged=False)
    target("p50_c1_throughput", "warm /rank p50 ms (M=500, c=1), throughput target", rank, 2.0)
    p99_m2000 = _get(load, "rank_warm_m2000_c1", "p99_ms")
    target("p99_m2000_c1", "warm /rank p99 ms (M=2000, c=1)", p99_m2000, 10.0)
    if c16 is not None and c1:
        derived["rate_c16_over_c1"] = c16 / c1
    target(
        "rate_c16_over_c1",
        "warm /rank req/s c=16 / c=1, one process",
        derived.get("rate_c16_over_c1"),
        1.0,
        True,
        judged=False,
    )
    w2 = _get(http, "workers", "2") or {}
    target(
        "rate_c16_workers2",
        "warm /rank req/s (c=16, 2 workers)",
        _get(w2, "rank_warm_c16", "rps"),
        1000.0,
        True,
    )
    target(
        "p99_c16_workers2",
        "warm /rank p99 ms (c=16, 2 workers)",
        _get(w2, "rank_warm_c16", "p99_ms"),
        15.0,
    )
    # (one process at one connection is already busy all the time: wrk sends the next
    # request while the last answer's bookkeeping runs, so its rate at 16 can only equal
    # it within the box's noise; the two workers' ratio is the one that can rise)
    w2_c16, w2_c1 = _get(w2, "rank_warm_c16", "rps"), _get(w2, "rank_warm_c1", "rps")
    if w2_c16 is not None and w2_c1:
        derived["rate_c16_over_c1_workers2"] = w2_c16 / w2_c1
    target(
        "rate_c16_over_c1_workers2",
        "warm /rank req/s c=16 / c=1, 2 workers",
        derived.get("rate_c16_over_c1_workers2"),
        1.0,
        True,
    )
    # what the second worker buys, from runs of the same rounds (not a target)
    beside = _get(http, "workers_beside", "2") or {}
    one_c16 = _get(beside, "rank_warm_c16", "rps")
    if w2_c16 is not None and one_c16:
        derived["rate_workers2_over_one_c16"] = w2_c16 / one_c16
    cl = _get(http, "cluster") or {}
    target(
        "cluster_push_c1",
        "warm /rank p50 cluster / one Redis (push, c=1)",
        cl.get("p50_ratio_push_c1"),
        1.2,
    )
    target(
        "cluster_strict_c1",
        "warm /rank p50 cluster / one Redis (strict, c=1)",
        cl.get("p50_ratio_strict_c1"),
        1.2,
    )
    # "the warm path's cost must not rise measurably": within the box's run-to-run noise
    target(
        "impression_log_c1",
        "warm /rank p50 impression log on / off (c=1)",
        cl.get("p50_ratio_impression_log_c1"),
        1.1,
    )
    target(
        "overhead_ratio",
        "overhead ratio (rank p50 / (healthz p50 + score))",
        derived.get("overhead_ratio"),
        1.5,
    )
    cold_total = _get(http, "cold", "server_timings_ms_median")
    cold_build = None
    if isinstance(cold_total, dict) and "redis" in cold_total and "state" in cold_total:
        cold_build = cold_total["redis"] + cold_total["state"]
    target("cold_build", "cold build ms, N=100k (server: redis + state)", cold_build, 40.0)
    target("fold_100", "fold 100 events ms (in process)", ip.get("fold_100_ms"), 1.0)
    target(
        "softmax_over_ifa_warm",
        "softmax_full / ifa warm (N=100k, M=500)",
        ip.get("ratio_warm"),
        1000.0,
        True,
    )
    target(
        "softmax_over_ifa_cold",
        "softmax_full / ifa cold (N=100k, M=500)",
        ip.get("ratio_cold"),
        20.0,
        True,
    )
    target("state_bytes", "state bytes per user", ip.get("state_bytes"), 20_000.0)
    derived["targets"] = targets
    derived["shortfalls"] = shortfalls(report, derived)
    return derived
