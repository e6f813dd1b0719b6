"""Each missed target of a bench run is explained from the run's own figures: Little's
law, CPU per request, and what meeting the target would take."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest import report
from loadtest.bench_derive import derive
from loadtest.bench_shortfall import closed_loop_figures, shortfalls
from loadtest.report import shortfall_lines


def _run(p50: float, p99: float, rps: float, **extra: Any) -> dict[str, Any]:
    return {"p50_ms": p50, "p99_ms": p99, "rps": rps, "requests": int(rps), "errors": 0, **extra}


def test_a_closed_loop_run_is_split_by_process_and_turned_into_what_the_p99_needs() -> None:
    run = _run(
        14.0,
        24.0,
        1000.0,
        mean_ms=16.0,
        server_cpu_ms_per_req=1.5,
        redis_cpu_ms_per_req=0.1,
        client_cpu_us_per_req=100.0,
        server_stage_mean_ms={"app": 12.0, "queue": 10.0},
    )
    fig = closed_loop_figures(run, 16, 15.0, cores=2.0)
    assert fig["tail_factor"] == pytest.approx(1.5)
    assert fig["box_cpu_ms"] == pytest.approx(1.7)
    assert fig["box_ceiling_rps"] == pytest.approx(2000 / 1.7)
    assert fig["outside_app_ms"] == pytest.approx(4.0)
    # p99 <= 15 at a tail of 1.5 x the mean: a mean of 10 ms, 16 connections: 1,600 req/s
    assert fig["need_mean_ms"] == pytest.approx(10.0)
    assert fig["need_rps"] == pytest.approx(1600.0)
    assert fig["need_box_cpu_ms"] == pytest.approx(1.7 * 1000 / 1600)
    assert fig["need_tail_factor_at_rate"] == pytest.approx(15 / 16)


def test_without_a_mean_from_the_generator_little_s_law_gives_it() -> None:
    fig = closed_loop_figures(_run(10.0, 20.0, 800.0), 16, 15.0, cores=None)
    assert fig["mean_ms"] == pytest.approx(20.0)
    assert fig["box_cpu_ms"] is None and fig["box_ceiling_rps"] is None


def _report(w2_p99: float, w2_rps: float) -> dict[str, Any]:
    w2_c16 = _run(
        11.0,
        w2_p99,
        w2_rps,
        mean_ms=12.5,
        server_cpu_ms_per_req=1.45,
        redis_cpu_ms_per_req=0.08,
        client_cpu_us_per_req=70.0,
        server_stage_mean_ms={"app": 11.0},
    )
    load = {
        "healthz_c1": _run(0.3, 0.6, 2500, mean_ms=0.4),
        "rank_warm_c1": _run(
            1.5,
            3.0,
            650,
            mean_ms=1.6,
            inprocess_score_ms=0.55,
            server_cpu_ms_per_req=1.4,
            server_cpu_cores=0.95,
            server_stage_mean_ms={"app": 1.3, "queue": 0.1, "score": 0.75, "serialize": 0.15},
        ),
        "rank_warm_c16": _run(
            20.0, 30.0, 700, mean_ms=22.9, server_cpu_ms_per_req=1.4, server_cpu_cores=0.98
        ),
    }
    return {
        "machine": {"cores_available": 2},
        "http": {"load": load, "workers": {"2": {"rank_warm_c16": w2_c16}}},
    }


def test_only_the_missed_targets_are_explained_each_from_its_own_run() -> None:
    rep = _report(w2_p99=20.0, w2_rps=1280.0)
    d = derive(rep)
    by_key = {e["key"]: e for e in d["shortfalls"]}
    missed = {t["key"] for t in d["targets"] if t["ok"] is False}
    assert set(by_key) == missed
    assert "rate_c16_workers2" not in by_key  # 1,280 req/s meets its target
    w2 = by_key["p99_c16_workers2"]
    assert w2["value"] == 20.0 and w2["target"] == 15.0
    assert w2["figures"]["box_cpu_ms"] == pytest.approx(1.45 + 0.08 + 0.07)
    assert w2["figures"]["need_rps"] == pytest.approx(16_000 / (15.0 / (20.0 / 12.5)))
    assert "Little's law" in w2["text"] and "1.60 × the mean" in w2["text"]
    one = by_key["rate_c16"]  # one process: a reference row, explained all the same
    assert one["judged"] is False and w2["judged"] is True
    assert one["figures"]["one_core_ceiling_rps"] == pytest.approx(1000 / 1.4)
    assert "29 % less" in one["text"]  # 1.40 -> 1.00 ms of CPU per request
    ratio = by_key["overhead_ratio"]
    # 1.5 / (0.3 + 0.55) = 1.76: the p50 may be 1.5 x 0.85 = 1.275 ms, 0.225 ms less
    assert ratio["figures"]["over_ms"] == pytest.approx(1.5 - 1.275)
    assert ratio["figures"]["scorer_excess_ms"] == pytest.approx(0.75 - 0.55)
    assert "On a cold core" not in ratio["text"]  # no in-process figures in this report
    # with them, the scorer on a cold core is set beside the stage
    micro = {"score_ms": {"500": 0.5}, "score_evicted_ms": {"1": 0.2, "500": 0.8}}
    cold = {e["key"]: e for e in derive({**rep, "inprocess": micro})["shortfalls"]}
    figures = cold["overhead_ratio"]["figures"]
    assert (figures["scorer_warm_core_ms"], figures["scorer_cold_core_ms"]) == (0.5, 0.8)
    assert "the scorer took 0.80 ms at M = 500, against 0.50 ms" in cold["overhead_ratio"]["text"]
    md = report.markdown({**rep, "derived": d, "mode": "quick", "command": "x"})
    table, _, rest = md.partition("## Missed targets: where the time went, what it would take")
    assert f"| {one['name']} | 700.00 | >= 1,000 | ref.: no |" in table
    assert f"| {w2['name']} | 20.00 | <= 15.00 | **no** |" in table
    in_targets, _, in_reference = rest.partition("## Reference rows outside the targets' limits")
    assert f"* **{w2['name']}**: 20.00 against <= 15.00. Two worker processes" in in_targets
    assert f"* **{one['name']}**: 700.00 against >= 1,000. One process" in in_reference
    assert one["name"] not in in_targets


def test_reference_rows_alone_outside_their_limits_miss_no_target() -> None:
    rep = _report(w2_p99=14.0, w2_rps=1280.0)  # the two workers meet both of theirs
    d = derive(rep)
    missed = [t["key"] for t in d["targets"] if t["ok"] is False and t["judged"]]
    outside = sorted(t["key"] for t in d["targets"] if t["ok"] is False and not t["judged"])
    assert missed == ["overhead_ratio"]  # the c=1 figures of the fixture miss it
    assert outside == ["p99_c16", "rate_c16"]  # 700 req/s, 30 ms: one core's ceiling
    md = report.markdown({**rep, "derived": d, "mode": "quick", "command": "x"})
    assert "## Reference rows outside the targets' limits" in md
    assert "ref.: a reference row, not a target." in md


def test_a_run_that_meets_every_target_it_measured_has_no_section() -> None:
    rep = _report(w2_p99=14.0, w2_rps=1280.0)
    del rep["http"]["load"]  # only the two-worker row, which meets both of its targets
    d = derive(rep)
    assert shortfalls(rep, d) == [] and shortfall_lines([]) == []
    md = report.markdown({**rep, "derived": d, "mode": "quick", "command": "x"})
    assert "Missed targets" not in md


def test_a_p99_the_rate_alone_rules_out_says_so() -> None:
    rep = _report(w2_p99=30.0, w2_rps=800.0)
    rep["http"]["workers"]["2"]["rank_warm_c16"]["mean_ms"] = 20.0  # 16 / 800 req/s
    entry = {e["key"]: e for e in shortfalls(rep, derive(rep))}["p99_c16_workers2"]
    assert entry["figures"]["need_tail_factor_at_rate"] == pytest.approx(0.75)
    assert "at this rate the mean alone is over 15 ms" in entry["text"]


def _variants(on: list[float], off: list[float]) -> dict[str, Any]:
    def summary(p50s: list[float], cpu: float) -> dict[str, Any]:
        return {
            "p50_ms": sorted(p50s)[len(p50s) // 2],
            "server_cpu_ms_per_req": cpu,
            "runs": [_run(x, 2 * x, 1000 / x) for x in p50s],
        }

    ratio = summary(on, 1.3)["p50_ms"] / summary(off, 1.2)["p50_ms"]
    cluster = {
        "runs": {"redis_push_c1": summary(on, 1.3), "redis_push_nolog_c1": summary(off, 1.2)},
        "p50_ratio_impression_log_c1": ratio,
    }
    return {"http": {"cluster": cluster}}


def test_a_variant_ratio_is_shown_with_its_runs_so_drift_can_be_told_from_a_cost() -> None:
    steady = _variants(on=[1.40, 1.42, 1.41], off=[1.10, 1.11, 1.12])
    entry = shortfalls(steady, derive(steady))[0]
    assert entry["key"] == "impression_log_c1"
    assert entry["figures"]["run_p50s_ms"]["log on"] == [1.40, 1.42, 1.41]
    assert entry["figures"]["run_spread"] == pytest.approx(1.12 / 1.10 - 1)
    assert "beyond this run's own noise" in entry["text"]
    drifting = _variants(on=[1.39, 1.42, 1.12], off=[1.22, 1.13, 1.11])
    entry = shortfalls(drifting, derive(drifting))[0]
    assert entry["figures"]["run_spread"] == pytest.approx(1.42 / 1.12 - 1)
    assert "the box's drift can explain it" in entry["text"]
