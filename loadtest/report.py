"""bench.json -> bench.md: the tables a reader compares between runs and machines."""

from __future__ import annotations

from typing import Any


def _num(d: Any, *keys: str) -> float | None:
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        else:
            return None
    return float(d) if isinstance(d, int | float) and not isinstance(d, bool) else None


def _series(d: Any) -> dict[int, float]:
    """{"1000": 1.2, ...} or [{"n": 1000, "ms": 1.2}, ...] -> {1000: 1.2}."""
    out: dict[int, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            val = v if isinstance(v, int | float) else _num(v, "ms") or _num(v, "median_ms")
            if val is not None and str(k).isdigit():
                out[int(k)] = float(val)
    elif isinstance(d, list):
        for row in d:
            if not isinstance(row, dict):
                continue
            size = row.get("n", row.get("m", row.get("N", row.get("M"))))
            val = row.get("ms", row.get("median_ms"))
            if isinstance(size, int) and isinstance(val, int | float):
                out[size] = float(val)
    return out


def inprocess_figures(ip: dict[str, Any]) -> dict[str, Any]:
    """Normalise run_microbench's dict into the few numbers the targets use."""
    out: dict[str, Any] = {}
    build = _series(ip.get("build_state_ms"))
    score = _series(ip.get("score_ms"))
    evicted = _series(ip.get("score_evicted_ms"))
    # softmax_full is timed at the reference point (N = 100k, M = 500): one point on the
    # score-vs-M axis.
    ref = ip.get("softmax_full_ms_100k_500")
    soft = {500: float(ref)} if isinstance(ref, int | float) else {}
    if build:
        out["build_state_ms"] = build
    if score:
        out["score_ms"] = score
        out["score_ms_500"] = score.get(500)
    if evicted:
        out["score_evicted_ms"] = evicted
    if soft:
        out["softmax_full_ms"] = soft
    if isinstance(ip.get("score_batch"), dict):
        out["score_batch"] = ip["score_batch"]
    for key in (
        "fold_100_ms",
        "state_bytes",
        "ratio_warm",
        "ratio_cold",
        "softmax_full_ms_100k_500",
        "ifa_cold_ms",
        "ifa_warm_ms",
    ):
        val = ip.get(key)
        if val is None and isinstance(ip.get("ratios"), dict):
            val = ip["ratios"].get(key.removeprefix("ratio_"))
        if isinstance(val, int | float):
            out[key] = float(val)
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _ms_table(header: str, by_size: dict[str, Any]) -> list[str]:
    """One row of sizes, one row of milliseconds (nothing when there are no figures)."""
    if not by_size:
        return []
    return [
        f"| {header} | " + " | ".join(str(k) for k in by_size) + " |",
        "|---|" + "---:|" * len(by_size),
        "| ms | " + " | ".join(fmt(x, 3) for x in by_size.values()) + " |",
        "",
    ]


def markdown(rep: dict[str, Any]) -> str:
    m = rep.get("machine", {})
    v = rep.get("versions", {})
    http = rep.get("http") or {}
    derived = rep.get("derived") or {}
    lines = [
        f"# Benchmark ({rep.get('mode')}): `{rep.get('command')}`",
        "",
        f"{rep.get('created_at')} · {m.get('cpu_model')} · {m.get('cores_available')} cores · "
        f"{m.get('memory_gib')} GiB · load avg at start {fmt((m.get('load_avg_at_start') or [None])[0])}, "
        f"end {fmt((m.get('load_avg_at_end') or [None])[0])} · hypervisor steal over the run "
        f"{fmt(m.get('steal_pct'), 1)} % of the CPU",
        f"python {v.get('python')} · onnxruntime {v.get('onnxruntime') or v.get('onnxruntime-gpu')} · "
        f"numpy {v.get('numpy')} · ifa-rank {v.get('ifa-rank')} · {v.get('git_commit', '')}",
    ]
    model = http.get("model") or {}
    if model:
        lines.append(
            f"model {model.get('version')} · providers {model.get('providers', model.get('provider'))}"
        )
    lines += [
        "",
        "## Targets (docs/design.md §8)",
        "",
        "| figure | measured | target | ok |",
        "|---|---:|---:|:-:|",
    ]
    references = False
    for t in derived.get("targets", []):
        verdict = {True: "yes", False: "no", None: "n/a"}[t.get("ok")]
        if t.get("judged") is False:  # an older report has no flag: every row a target
            ok, references = f"ref.: {verdict}", True
        else:
            ok = "**no**" if verdict == "no" else verdict
        lines.append(
            f"| {t['name']} | {fmt(t.get('value'))} | {t.get('op', '')} {fmt(t['target'])} | {ok} |"
        )
    if references:
        lines += [
            "",
            "ref.: a reference row, not a target. The throughput targets are judged on the "
            "service as deployed for throughput, two worker processes (IFA_WORKERS=2); one "
            "process runs its Python on one core and is shown beside them.",
        ]
    lines += shortfall_lines(derived.get("shortfalls") or [])

    load = http.get("load") or {}
    if load:
        gen = http.get("load_generator", {})
        lines += [
            "",
            "## HTTP on loopback (closed loop; median of "
            f"{next(iter(load.values())).get('repeats')} runs)",
            "",
            "| endpoint | conc. | p50 ms | p90 ms | p99 ms | max ms | req/s | server CPU ms/req "
            "| steal % | errors (of which 503) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, s in load.items():
            name, _, c = key.rpartition("_c")
            lines.append(
                f"| {name} | {c} | {fmt(s.get('p50_ms'))} | {fmt(s.get('p90_ms'))} | "
                f"{fmt(s.get('p99_ms'))} | {fmt(s.get('max_ms'))} | {fmt(s.get('rps'), 0)} | "
                f"{fmt(s.get('server_cpu_ms_per_req'))} | {fmt(s.get('steal_pct'), 1)} | "
                f"{s.get('errors')}{' (' + str(s['shed']) + ')' if s.get('shed') else ''} |"
            )
        for name in ("cold", "refresh_100", "first_request", "warm_single"):
            s = http.get(name)
            if not s:
                continue
            st = s.get("server_timings_ms_median", {})
            stages = ", ".join(f"{k} {fmt(x)}" for k, x in st.items())
            lines.append(
                f"| {name} (sequential) | 1 | {fmt(s.get('p50_ms'))} | {fmt(s.get('p90_ms'))} | "
                f"{fmt(s.get('p99_ms'))} | {fmt(s.get('max_ms'))} | | server: {stages} | | "
                f"{s.get('errors')}{' degraded ' + str(s['degraded']) if s.get('degraded') else ''} |"
            )
        ol = http.get("open_loop") or {}
        if ol.get("runs"):
            lines += [
                "",
                "Open loop (fixed arrival rate, latency from the intended send time, "
                f"{next(iter(ol['runs'].values())).get('concurrency')} connections; "
                f"saturated closed-loop rate {fmt(ol.get('saturated_rps'), 0)} req/s"
                + _ceiling_text(ol)
                + "):",
                "",
                "| load | target req/s | achieved req/s | p50 ms | p90 ms | p99 ms | max ms "
                "| errors (of which 503) |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for frac, r in ol["runs"].items():
                shed = (r.get("status") or {}).get("503", 0)
                lines.append(
                    f"| {float(frac):.0%} | {fmt(r.get('target_rps'), 0)} | {fmt(r.get('rps'), 0)} "
                    f"| {fmt(r.get('p50_ms'))} | {fmt(r.get('p90_ms'))} | {fmt(r.get('p99_ms'))} "
                    f"| {fmt(r.get('max_ms'))} | {r.get('errors')}{f' ({shed})' if shed else ''} |"
                )
        for n, runs in (http.get("workers") or {}).items():
            paired = (http.get("workers_beside") or {}).get(n)
            lines += [
                "",
                f"Warm /rank against {n} worker processes (same Redis, same bodies) "
                + (
                    "beside the single process in the same rounds, in turn (every other "
                    "round in reverse):"
                    if paired
                    else "and the single process above:"
                ),
                "",
                f"| conc. | 1 process p50 / p99 ms | req/s | {n} processes p50 / p99 ms | req/s "
                "| connections passed on / sent away |",
                "|---:|---:|---:|---:|---:|---:|",
            ]
            for key, r in runs.items():
                one = (paired or load).get(key) or {}
                lines.append(
                    f"| {key.rpartition('_c')[2]} | {fmt(one.get('p50_ms'))} / "
                    f"{fmt(one.get('p99_ms'))} | {fmt(one.get('rps'), 0)} | "
                    f"{fmt(r.get('p50_ms'))} / {fmt(r.get('p99_ms'))} | {fmt(r.get('rps'), 0)} "
                    f"| {fmt(r.get('connections_passed'), 0)} / "
                    f"{fmt(r.get('connections_moved'), 0)} |"
                )
            lines += [
                "",
                "Connections passed on / sent away: per run (median), those the generator "
                "opened that a worker over its share of the open connections passed, unread, "
                "to another (`ifa_connections_handed_off_total`) or answered with "
                "`Connection: close` (`ifa_connections_moved_total`; "
                "IFA_BALANCE_CONNECTIONS).",
            ]
        lines += variants_table(http.get("cluster") or {})
        lines += [
            "",
            f"Load generator: **{gen.get('chosen')}**; ceilings against /healthz "
            "(client CPU per request → requests/s it could drive per core):",
            "",
        ]
        for tool, t in (gen.get("tools") or {}).items():
            lines.append(
                f"* {tool}: {fmt(t.get('client_cpu_us_per_req'), 1)} µs CPU/req → ceiling "
                f"{fmt(t.get('ceiling_rps_per_core'), 0)} req/s per core; measured /healthz "
                f"{fmt(t.get('healthz_rps'), 0)} req/s at c={t.get('concurrency')}"
            )
        if "overhead_ratio" in derived:
            ot = derived["overhead_terms_ms"]
            lines += [
                "",
                f"Overhead ratio = warm /rank p50 {fmt(ot['rank_warm_p50'])} ms / "
                f"(/healthz p50 {fmt(ot['healthz_p50'])} ms + in-process score(M=500), "
                "timed in the bench process between the c=1 runs, "
                f"{fmt(ot['inprocess_score_m500'])} ms) = **{fmt(derived['overhead_ratio'])}**",
            ]
        split = derived.get("time_split_ms")
        if split:
            stages = ", ".join(
                f"{k.removeprefix('stage_')} {fmt(v)}"
                for k, v in split.items()
                if k.startswith("stage_")
            )
            lines += [
                "",
                f"Where a warm /rank's time goes (means over the c=1 runs; the service's own "
                f"histograms): client {fmt(split['client_mean'])} ms = inside the app "
                f"{fmt(split['app_mean'])} ms ({stages}, other {fmt(split['app_other'])}: "
                f"body read and validation, routing, the rank use case) + outside it "
                f"{fmt(split['outside_app'])} ms (HTTP on loopback; a whole /healthz takes "
                f"{fmt(split['healthz_mean'])} ms).",
            ]
        lines += [
            "",
            f"Server RSS: {fmt(http.get('rss_mib_before_load'), 1)} MiB before load, "
            f"{fmt(http.get('rss_mib_after_load'), 1)} MiB after, {fmt(http.get('rss_mib_end'), 1)} "
            "MiB at the end.",
            "",
            "Server settings: "
            + ", ".join(
                f"`{k}={val}`"
                for k, val in (http.get("settings_env") or {}).items()
                if k != "IFA_REDIS_URL"
            ),
        ]

    ip = derived.get("inprocess") or {}
    if ip:
        lines += ["", "## In process (ONNX Runtime, one call, median ms)", ""]
        for header, key in (
            ("build_state N", "build_state_ms"),
            ("score M", "score_ms"),
            ("score on a cold core (every cache emptied before each call) M", "score_evicted_ms"),
            ("softmax_full (torch, N=100k) M", "softmax_full_ms"),
        ):
            lines += _ms_table(header, ip.get(key) or {})
        batch = ip.get("score_batch") or {}
        if batch:
            lines += [
                "",
                "Cross-request batching on this machine: scorer ms per candidate set, B sets "
                "in one `score_batch` call against B separate `score` calls:",
                "",
                "| sets | batched ms/set | separate ms/set | speedup |",
                "|---|---:|---:|---:|",
            ]
            for name, row in batch.items():
                lines.append(
                    f"| {name} | {fmt(row['batched_ms_per_set'], 3)} "
                    f"| {fmt(row['separate_ms_per_set'], 3)} | {fmt(row['speedup'], 2)} |"
                )
            lines.append("")
        for key in (
            "fold_100_ms",
            "ifa_warm_ms",
            "ifa_cold_ms",
            "softmax_full_ms_100k_500",
            "ratio_warm",
            "ratio_cold",
            "state_bytes",
        ):
            if key in ip:
                lines.append(f"* {key}: {fmt(ip[key], 3)}")
    elif isinstance(rep.get("inprocess"), dict) and "error" in rep["inprocess"]:
        lines += ["", f"In-process microbench failed: {rep['inprocess']['error']}"]
    plots = rep.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        f"Elapsed {fmt(rep.get('elapsed_s'), 0)} s. Figures and per-run values: `bench.json`.",
        "",
    ]
    return "\n".join(lines)


def variants_table(cl: dict[str, Any]) -> list[str]:
    """The interleaved variants (loadtest/bench_variants.py): a Redis Cluster beside one
    Redis, the impression log off beside on, requests started as read beside in order."""
    if not cl:
        return []
    if "error" in cl:
        return ["", f"Interleaved variants run failed: {cl['error']}"]
    runs = cl.get("runs") or {}
    lines = [
        "",
        f"Warm /rank on a Redis Cluster ({cl.get('topology')}) beside one Redis, the same "
        "users and bodies, interleaved (medians over the repeats):",
        "",
        "| warm check | conc. | one Redis p50 / p99 ms | req/s | cluster p50 / p99 ms | req/s "
        "| p50 cluster / one |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("push", "strict"):
        for key, one in runs.items():
            if not key.startswith(f"redis_{mode}_c"):
                continue
            conc = key.rpartition("_c")[2]
            other = runs.get(f"cluster_{mode}_c{conc}") or {}
            lines.append(
                f"| {mode} | {conc} | {fmt(one.get('p50_ms'))} / {fmt(one.get('p99_ms'))} "
                f"| {fmt(one.get('rps'), 0)} | {fmt(other.get('p50_ms'))} / "
                f"{fmt(other.get('p99_ms'))} | {fmt(other.get('rps'), 0)} "
                f"| {fmt(cl.get(f'p50_ratio_{mode}_c{conc}'))} |"
            )
    lines += [
        "",
        "The impression log's cost, in the same rounds (one Redis, push):",
        "",
        "| conc. | log off p50 / p99 ms | req/s | log on p50 / p99 ms | req/s | p50 on / off |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for key, off in runs.items():
        if not key.startswith("redis_push_nolog_c"):
            continue
        conc = key.rpartition("_c")[2]
        on = runs.get(f"redis_push_c{conc}") or {}
        lines.append(
            f"| {conc} | {fmt(off.get('p50_ms'))} / {fmt(off.get('p99_ms'))} "
            f"| {fmt(off.get('rps'), 0)} | {fmt(on.get('p50_ms'))} / {fmt(on.get('p99_ms'))} "
            f"| {fmt(on.get('rps'), 0)} | {fmt(cl.get(f'p50_ratio_impression_log_c{conc}'))} |"
        )
    unordered = [k for k in runs if k.startswith("redis_push_unordered_c")]
    if unordered:
        lines += [
            "",
            "Requests started in the order read, a few per event-loop iteration "
            "(`IFA_STARTS_PER_ITERATION`, 1 by default) beside all of one read back to back, "
            "in the same rounds (one Redis, push):",
            "",
            "| conc. | back to back p50 / p99 ms | req/s | in order p50 / p99 ms | req/s "
            "| p99 in order / back to back |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
    for key in unordered:
        conc = key.rpartition("_c")[2]
        off, on = runs[key], runs.get(f"redis_push_c{conc}") or {}
        lines.append(
            f"| {conc} | {fmt(off.get('p50_ms'))} / {fmt(off.get('p99_ms'))} "
            f"| {fmt(off.get('rps'), 0)} | {fmt(on.get('p50_ms'))} / {fmt(on.get('p99_ms'))} "
            f"| {fmt(on.get('rps'), 0)} | {fmt(cl.get(f'p99_ratio_ordered_starts_c{conc}'))} |"
        )
    return lines


def shortfall_lines(entries: list[dict[str, Any]]) -> list[str]:
    """The section of missed targets (loadtest/bench_shortfall.py), a bullet for each, then
    the reference rows outside their limits in a section of their own."""
    lines: list[str] = []
    missed = [e for e in entries if e.get("judged") is not False]
    outside = [e for e in entries if e.get("judged") is False]
    for group, head, intro in (
        (
            missed,
            "## Missed targets: where the time went, what it would take",
            "From this run's own figures (docs/performance.md has what was tried).",
        ),
        (
            outside,
            "## Reference rows outside the targets' limits",
            "Not targets (see ref. above); why they fall outside, from this run's figures.",
        ),
    ):
        if not group:
            continue
        lines += ["", head, "", intro, ""]
        for e in group:
            lines.append(
                f"* **{e['name']}**: {fmt(e['value'])} against {e.get('op') or ''} "
                f"{fmt(e['target'])}. {e['text']}"
            )
    return lines


def _ceiling_text(ol: dict[str, Any]) -> str:
    """What the open loop's generator let the service answer, when it was measured."""
    ceiling = ol.get("ceiling")
    if not ceiling:
        return ""
    shed = (ceiling.get("status") or {}).get("503", 0)
    return (
        f" with wrk; {fmt(ol.get('ceiling_rps'), 0)} req/s beside the open-loop generator, "
        f"offered {fmt(ceiling.get('target_rps'), 0)} req/s over "
        f"{ceiling.get('concurrency')} connections"
        + (f" ({shed} shed)" if shed else "")
        + f"; the loads are fractions of the lower, {fmt(ol.get('reference_rps'), 0)} req/s"
    )
