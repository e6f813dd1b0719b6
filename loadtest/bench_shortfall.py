"""Each missed target of a bench run, explained from the run's own figures: what was
measured, where the time went, and what meeting the target would take.

The issue behind the throughput targets asks for that whenever a target is missed. The
history of what was tried is in docs/performance.md. This part is arithmetic on the run
itself, so that every report carries its own account:

* closed-loop rows (16 connections): Little's law (mean = connections / rate), the tail
  as a multiple of the mean, the CPU per request of each process on the box (the
  service, Redis, the load generator) and the rate those costs allow. Meeting the p99 at
  the same tail factor needs the mean, so the rate and CPU per request, that follow;
* the overhead ratio and the c=1 p50: the service's own stage means over the c=1 runs
  beside the scorer timed in the bench process.

`shortfalls(report, derived)` gives one entry per missed target (and per reference row
outside its limit, `judged` False): its key, name, value and target, the figures used,
and a sentence for the report (`report.shortfall_lines`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loadtest.report import fmt as _f

Explainer = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], tuple[dict[str, Any], str]]


def dig(d: Any, *path: str) -> Any:
    """d[path[0]][path[1]]..., or None where a step is missing (reports differ by age)."""
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def closed_loop_figures(
    run: dict[str, Any], connections: int, p99_target: float, cores: float | None
) -> dict[str, Any]:
    """Where a closed-loop run's time went, and the rate its p99 target needs at the same
    tail factor. CPU figures are per request; missing ones stay None."""
    rps = float(run.get("rps") or 0.0)
    mean = run.get("mean_ms") or (1e3 * connections / rps if rps else None)
    p99 = run.get("p99_ms")
    service = run.get("server_cpu_ms_per_req")
    redis = run.get("redis_cpu_ms_per_req")
    client_us = run.get("client_cpu_us_per_req")
    generator = client_us / 1e3 if client_us is not None else None
    parts = [x for x in (service, redis, generator) if x is not None]
    box = sum(parts) if parts else None
    out: dict[str, Any] = {
        "rps": rps,
        "connections": connections,
        "mean_ms": mean,
        "p99_ms": p99,
        "tail_factor": p99 / mean if p99 and mean else None,
        "service_cpu_ms": service,
        "redis_cpu_ms": redis,
        "generator_cpu_ms": generator,
        "box_cpu_ms": box,
        "service_cores": run.get("server_cpu_cores"),
        "cores": cores,
        "box_ceiling_rps": cores * 1e3 / box if cores and box else None,
        "app_mean_ms": dig(run, "server_stage_mean_ms", "app"),
    }
    if out["app_mean_ms"] is not None and mean is not None:
        out["outside_app_ms"] = mean - out["app_mean_ms"]
    tail = out["tail_factor"]
    if tail and mean:
        need_mean = p99_target / tail
        need_rps = 1e3 * connections / need_mean
        out.update(
            need_mean_ms=need_mean,
            need_rps=need_rps,
            # the same CPU time a second, spread over the rate the target needs
            need_box_cpu_ms=box * rps / need_rps if box else None,
            need_service_cpu_ms=service * rps / need_rps if service else None,
            need_tail_factor_at_rate=p99_target / mean,
        )
    return out


def _where_cpu(fig: dict[str, Any]) -> str:
    text = (
        f"CPU per request: the service {_f(fig['service_cpu_ms'])} ms, Redis "
        f"{_f(fig['redis_cpu_ms'], 3)} ms, the load generator {_f(fig['generator_cpu_ms'], 3)} ms"
    )
    if fig["box_ceiling_rps"] is not None:
        text += (
            f", {_f(fig['box_cpu_ms'])} ms in all: the box's {_f(fig['cores'], 0)} cores allow "
            f"{_f(fig['box_ceiling_rps'], 0)} req/s at that cost"
        )
    text += "."
    if fig.get("outside_app_ms") is not None:
        text += (
            f" The service's own clock (first byte in to last byte out) saw "
            f"{_f(fig['app_mean_ms'])} ms of the {_f(fig['mean_ms'])} ms mean; "
            f"{_f(fig['outside_app_ms'])} ms passed outside it (kernel queues, the "
            "generator waiting for a core)."
        )
    return text


def _tail_sentence(fig: dict[str, Any]) -> str:
    return (
        f"{_f(fig['rps'], 0)} req/s at {fig['connections']} connections: a mean of "
        f"{_f(fig['mean_ms'])} ms ({fig['connections']} / rate, Little's law) and a p99 of "
        f"{_f(fig['p99_ms'])} ms, {_f(fig['tail_factor'])} × the mean. "
    )


def _need_sentence(fig: dict[str, Any], target: float) -> str:
    if fig.get("need_rps") is None:
        return ""
    text = (
        f" What it would take: at this tail factor, a p99 ≤ {_f(target, 0)} ms needs a mean "
        f"≤ {_f(fig['need_mean_ms'])} ms, so {_f(fig['need_rps'], 0)} req/s at "
        f"{fig['connections']} connections"
    )
    if fig.get("need_box_cpu_ms") is not None and fig["box_cpu_ms"]:
        cut = 1 - fig["need_box_cpu_ms"] / fig["box_cpu_ms"]
        text += (
            f": {_f(fig['need_box_cpu_ms'])} ms of the box's CPU per request, "
            f"{_f(100 * cut, 0)} % less than now"
        )
    if fig["need_tail_factor_at_rate"] < 1:  # the p99 is never below the mean
        return text + f"; at this rate the mean alone is over {_f(target, 0)} ms."
    return text + (
        f"; or, at this rate, a p99 within {_f(fig['need_tail_factor_at_rate'])} × the mean."
    )


def _cores(rep: dict[str, Any]) -> float | None:
    cores = dig(rep, "machine", "cores_available") or dig(rep, "machine", "cores_logical")
    return float(cores) if cores else None


def _explain_workers_c16(
    rep: dict[str, Any], d: dict[str, Any], t: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    run = dig(rep, "http", "workers", "2", "rank_warm_c16") or {}
    fig = closed_loop_figures(run, 16, 15.0, _cores(rep))
    text = "Two worker processes, " + _tail_sentence(fig) + _where_cpu(fig)
    return fig, text + _need_sentence(fig, 15.0)


def _explain_one_process_c16(
    rep: dict[str, Any], d: dict[str, Any], t: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    run = dig(rep, "http", "load", "rank_warm_c16") or {}
    fig = closed_loop_figures(run, 16, 15.0, _cores(rep))
    service = fig["service_cpu_ms"]
    text = "One process, " + _tail_sentence(fig)
    if service:
        fig["one_core_ceiling_rps"] = 1e3 / service
        text += (
            f"One process runs its Python on one core: at {_f(service)} ms of its CPU per "
            f"request it can serve at most {_f(fig['one_core_ceiling_rps'], 0)} req/s "
            f"({_f(fig['service_cores'])} of a core in use)."
        )
    if t["key"] == "rate_c16" and service:
        text += (
            f" What it would take: 1,000 req/s needs ≤ 1.00 ms of CPU per request in one "
            f"process ({_f(100 * (1 - 1 / service), 0)} % less), or more worker processes "
            "(the two-worker rows)."
        )
    elif t["key"] == "p99_c16":
        text += _need_sentence(fig, 15.0)
    return fig, text


def _explain_c1_p50(
    rep: dict[str, Any], d: dict[str, Any], t: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The overhead ratio and the c=1 p50 targets: the service's stage means over the
    c=1 runs beside the scorer timed in the bench process."""
    terms = d.get("overhead_terms_ms") or {}
    split = d.get("time_split_ms") or {}
    p50, hz, score = (
        terms.get(k) for k in ("rank_warm_p50", "healthz_p50", "inprocess_score_m500")
    )
    if p50 is None:
        p50 = dig(rep, "http", "load", "rank_warm_c1", "p50_ms")
    fig: dict[str, Any] = {"p50_ms": p50, "healthz_p50_ms": hz, "inprocess_score_ms": score}
    if t["key"] != "overhead_ratio":
        fig["p50_limit_ms"] = float(t["target"])
    elif hz is not None and score is not None:
        fig["p50_limit_ms"] = 1.5 * (hz + score)
    text = ""
    if fig.get("p50_limit_ms") is not None and p50 is not None:
        fig["over_ms"] = p50 - fig["p50_limit_ms"]
        text += f"Warm p50 {_f(p50)} ms against {_f(fig['p50_limit_ms'])} ms"
        if t["key"] == "overhead_ratio":
            text += f" (1.5 × (/healthz {_f(hz)} + scorer {_f(score)}))"
        text += f": {_f(fig['over_ms'], 3)} ms over. "
    stage_score = split.get("stage_score")
    if split:
        fig.update(split)
        text += (
            f"Means over the c=1 runs, from the service's histograms: inside the app "
            f"{_f(split.get('app_mean'))} ms, of which the score stage {_f(stage_score)} ms, the "
            f"wait for the event loop {_f(split.get('stage_queue'))}, the answer's "
            f"serialisation {_f(split.get('stage_serialize'))} and the rest "
            f"{_f(split.get('app_other'))} ms (body and validation, routing, metrics, the rank "
            f"use case); outside the app {_f(split.get('outside_app'))} ms (HTTP on loopback; "
            f"a whole /healthz takes {_f(split.get('healthz_mean'))} ms)."
        )
    if stage_score is not None and score is not None:
        fig["scorer_excess_ms"] = stage_score - score
        text += (
            f" The score stage takes {_f(fig['scorer_excess_ms'])} ms more in the server than the "
            "scorer in a loop in the bench process: the stage also orders the answer (a "
            "sigmoid and a stable sort), which the loop leaves out, and in the server the "
            "scorer shares the core's caches with the request's other work."
        )
    hot, cold = (_at_m(dig(d, "inprocess", k), 500) for k in ("score_ms", "score_evicted_ms"))
    if hot is not None and cold is not None:
        fig["scorer_cold_core_ms"], fig["scorer_warm_core_ms"] = cold, hot
        text += (
            f" On a cold core (every cache emptied before each call) the scorer took "
            f"{_f(cold)} ms at M = 500, against {_f(hot)} ms back to back in the same "
            "process. Between two calls the request's other work evicts part of the "
            "call's code and ONNX Runtime's per-node structures, and in slow phases other "
            "tenants on the caches this vCPU shares evict more: the score stage falls "
            "between the two."
        )
    if fig.get("over_ms") is not None and fig["over_ms"] > 0:
        text += (
            f" What it would take: {_f(fig['over_ms'], 3)} ms less per warm request at c=1, "
            "from the Python around the scorer (no piece of it is above a tenth of a "
            "request), less code per scorer call (fewer ONNX Runtime nodes), or caches not "
            'shared with other tenants (docs/performance.md, "a cold core").'
        )
    return fig, text.strip()


def _at_m(by_m: Any, m: int) -> float | None:
    """The M = m figure of a {M: ms} series: int keys, or str once read back from JSON."""
    if not isinstance(by_m, dict):
        return None
    val = by_m.get(m, by_m.get(str(m)))
    return float(val) if isinstance(val, int | float) else None


def _explain_m2000(
    rep: dict[str, Any], d: dict[str, Any], t: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    run = dig(rep, "http", "load", "rank_warm_m2000_c1") or {}
    score = _at_m(dig(d, "inprocess", "score_ms"), 2000)
    fig = {
        "p50_ms": run.get("p50_ms"),
        "p99_ms": run.get("p99_ms"),
        "inprocess_score_ms": score,
        "service_cpu_ms": run.get("server_cpu_ms_per_req"),
    }
    text = f"At M = 2,000 one at a time: p50 {_f(fig['p50_ms'])} ms, p99 {_f(fig['p99_ms'])} ms"
    if score is not None:
        text += f"; the scorer alone at M = 2,000 in the bench process {_f(score)} ms"
    text += (
        ". The p99 is the p50 plus the box's hiccups (the hypervisor's share, the other "
        "processes) on a request several times as long as at M = 500."
    )
    return fig, text


def _explain_rate_ratio(
    rep: dict[str, Any], d: dict[str, Any], t: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    run = dig(rep, "http", "load", "rank_warm_c1") or {}
    fig = {"rps_c1": run.get("rps"), "service_cores_c1": run.get("server_cpu_cores")}
    text = (
        f"One process at one connection already kept {_f(fig['service_cores_c1'])} of a core "
        f"busy ({_f(fig['rps_c1'], 0)} req/s): the generator sends the next request while the "
        "last answer's bookkeeping runs, so 16 connections add queueing, not work done; the "
        "ratio is 1 within the box's noise. The two-worker ratio is the one that can rise."
    )
    return fig, text


# the interleaved variants' ratio targets: (numerator run, its label, denominator, label)
VARIANT_PAIRS: dict[str, tuple[str, str, str, str]] = {
    "impression_log_c1": ("redis_push_c1", "log on", "redis_push_nolog_c1", "log off"),
    "cluster_push_c1": ("cluster_push_c1", "cluster", "redis_push_c1", "one Redis"),
    "cluster_strict_c1": ("cluster_strict_c1", "cluster", "redis_strict_c1", "one Redis"),
}


def _explain_variant_pair(
    rep: dict[str, Any], d: dict[str, Any], t: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """A ratio of two interleaved variants: the runs behind it and their own spread, so a
    reader can tell the box's drift from a cost."""
    a_key, a_label, b_key, b_label = VARIANT_PAIRS[t["key"]]
    runs = dig(rep, "http", "cluster", "runs") or {}
    a, b = runs.get(a_key) or {}, runs.get(b_key) or {}

    def p50s(x: dict[str, Any]) -> list[float]:
        return [float(r["p50_ms"]) for r in x.get("runs") or [] if r.get("p50_ms")]

    spreads = [max(v) / min(v) - 1 for v in (p50s(a), p50s(b)) if len(v) > 1]
    fig: dict[str, Any] = {
        "p50_ms": {a_label: a.get("p50_ms"), b_label: b.get("p50_ms")},
        "run_p50s_ms": {a_label: p50s(a), b_label: p50s(b)},
        "service_cpu_ms": {
            a_label: a.get("server_cpu_ms_per_req"),
            b_label: b.get("server_cpu_ms_per_req"),
        },
        "redis_cpu_ms": {
            a_label: a.get("redis_cpu_ms_per_req"),
            b_label: b.get("redis_cpu_ms_per_req"),
        },
        "run_spread": max(spreads) if spreads else None,
    }

    def runs_text(label: str) -> str:
        return ", ".join(_f(x) for x in fig["run_p50s_ms"][label])

    text = (
        f"In the same rounds, p50 {_f(a.get('p50_ms'))} ms {a_label} (runs: {runs_text(a_label)}) "
        f"against {_f(b.get('p50_ms'))} ms {b_label} (runs: {runs_text(b_label)}); CPU per "
        f"request: the service {_f(a.get('server_cpu_ms_per_req'))} against "
        f"{_f(b.get('server_cpu_ms_per_req'))} ms, Redis "
        f"{_f(a.get('redis_cpu_ms_per_req'), 3)} against {_f(b.get('redis_cpu_ms_per_req'), 3)} ms."
    )
    value = t.get("value")
    if fig["run_spread"] is not None and value is not None:
        if fig["run_spread"] >= value - 1:
            text += (
                f" One variant's p50 moved by up to {_f(100 * fig['run_spread'], 0)} % between "
                "its own runs of this bench, as much as the ratio's distance from 1: the box's "
                "drift can explain it. Rerun (or `python -m loadtest.setting_ab`) before "
                "reading it as a cost."
            )
        else:
            text += (
                f" Each variant's runs agree within {_f(100 * fig['run_spread'], 0)} %: "
                "a difference beyond this run's own noise."
            )
    return fig, text


EXPLAINERS: dict[str, Explainer] = {
    **dict.fromkeys(VARIANT_PAIRS, _explain_variant_pair),
    "p99_c16_workers2": _explain_workers_c16,
    "rate_c16_workers2": _explain_workers_c16,
    "p99_c16": _explain_one_process_c16,
    "rate_c16": _explain_one_process_c16,
    "overhead_ratio": _explain_c1_p50,
    "p50_c1_throughput": _explain_c1_p50,
    "p50_c1": _explain_c1_p50,
    "p99_m2000_c1": _explain_m2000,
    "rate_c16_over_c1": _explain_rate_ratio,
}


def shortfalls(report: dict[str, Any], derived: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per row outside its limit (ok is False), in the targets' order: the
    missed targets, and the reference rows (judged False) with the same explanations."""
    out = []
    for t in derived.get("targets", []):
        if t.get("ok") is not False:
            continue
        entry = {k: t.get(k) for k in ("key", "name", "value", "target", "op", "judged")}
        explain = EXPLAINERS.get(t.get("key") or "")
        if explain is None:
            entry["figures"], entry["text"] = {}, "No breakdown for this figure."
        else:
            entry["figures"], entry["text"] = explain(report, derived, t)
        out.append(entry)
    return out
