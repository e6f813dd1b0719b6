"""Every metric the dashboard and the rules use is in the metrics contract (docs/design.md §7).

`collect_metric_names()` is meant for reuse: the live check (names against a running
service's /metrics) compares the same set with what the service exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .conftest import DEPLOY, load_yaml_docs
from .test_deploy_prometheus import DASHBOARDS, RULES, dashboard_exprs

# docs/design.md §7: name -> type. Names and labels are a contract.
CONTRACT: dict[str, str] = {
    "ifa_rank_request_duration_seconds": "histogram",
    "ifa_rank_stage_duration_seconds": "histogram",
    "ifa_state_cache_total": "counter",
    "ifa_rank_degraded_total": "counter",
    "ifa_rank_candidates": "histogram",
    "ifa_sequence_length": "histogram",
    "ifa_inflight_requests": "gauge",
    "ifa_events_appended_total": "counter",
    "ifa_model_info": "gauge",
}
# Labels the contract gives each metric (besides job/instance added by Prometheus).
CONTRACT_LABELS: dict[str, set[str]] = {
    # `version` (and ifa_model_info's `role`): safe rollouts compare versions (docs/deploy.md)
    "ifa_rank_request_duration_seconds": {"outcome", "version", "le"},
    "ifa_rank_stage_duration_seconds": {"stage", "version", "le"},
    "ifa_state_cache_total": {"result"},
    "ifa_rank_degraded_total": {"reason", "version"},
    "ifa_rank_candidates": {"le"},
    "ifa_sequence_length": {"le"},
    "ifa_model_info": {"version", "provider", "role"},
}
LABEL_VALUES = {
    "outcome": {"ok", "degraded", "rejected", "error"},
    "stage": {"queue", "redis", "state", "score", "serialize"},
    "result": {"hit", "refresh", "miss"},
}
# Metrics every Prometheus has about its targets; not the service's to export.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_FUNCTIONS_AND_KEYWORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "absent", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "delta",
    "clamp_min", "clamp_max", "vector", "scalar", "label_values", "topk", "bottomk", "time",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (selectors), without a full parser.

    Drops string literals, label matchers `{...}`, ranges `[...]`, grouping lists
    `by (...)` etc., function names and keywords; what is left are metric names.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        word = match.group(0)
        if word.lower() in _FUNCTIONS_AND_KEYWORDS or re.match(r"\s*\(", expr[match.end() :]):
            continue
        names.add(word)
    return names


def _rules() -> tuple[list[str], set[str]]:
    exprs, recorded = [], set()
    for path in RULES:
        (doc,) = load_yaml_docs(path)
        for group in doc["groups"]:
            for rule in group["rules"]:
                exprs.append(rule["expr"])
                if "record" in rule:
                    recorded.add(rule["record"])
    return exprs, recorded


def _all_exprs() -> tuple[list[str], set[str]]:
    exprs, recorded = _rules()
    for path in DASHBOARDS:
        dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
        for expr in dashboard_exprs(dashboard):
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
            exprs.append(match.group(1) if match else expr)
    return exprs, recorded


def collect_metric_names() -> set[str]:
    """The service's metric names (as exported: histograms without suffix) that
    deploy/ uses, with recording-rule outputs and Prometheus built-ins left out."""
    exprs, recorded = _all_exprs()
    names: set[str] = set()
    for expr in exprs:
        for name in metric_names_in(expr) - recorded - BUILTIN:
            base = name
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in CONTRACT:
                    base = name[: -len(suffix)]
            names.add(base)
    return names


def test_parser_sees_the_names() -> None:
    expr = (
        'sum by (job, le) (rate(ifa_rank_request_duration_seconds_bucket{outcome!="rejected"}[5m]))'
        ' / on (job) ifa:rank_requests:rate5m > 0.04 and up{job="ifa-rank"} == 1'
    )
    assert metric_names_in(expr) == {
        "ifa_rank_request_duration_seconds_bucket",
        "ifa:rank_requests:rate5m",
        "up",
    }


# Exported by the service beyond docs/design.md §7 (docs/service.md lists them); rules may use
# them where the contract's metrics cannot say it (5xx by HTTP code: outcome="error" also
# counts client 4xx).
EXTRAS: dict[str, str] = {"ifa_http_responses_total": "counter"}


def test_every_used_metric_is_in_the_contract() -> None:
    used = collect_metric_names()
    assert used, "no metric names found"
    unknown = used - set(CONTRACT) - set(EXTRAS)
    assert not unknown, f"metrics used by deploy/ but not in docs/design.md §7: {sorted(unknown)}"


def test_dashboard_covers_the_contract() -> None:
    exprs, _ = _all_exprs()
    used = collect_metric_names()
    assert set(CONTRACT) <= used, f"never shown or alerted on: {sorted(set(CONTRACT) - used)}"
    assert exprs


def test_suffixes_match_metric_types() -> None:
    exprs, recorded = _all_exprs()
    for expr in exprs:
        for name in metric_names_in(expr) - recorded - BUILTIN:
            kinds = CONTRACT | EXTRAS
            if name in kinds:
                assert kinds[name] != "histogram", f"{name} used without _bucket/_sum/_count"
                if kinds[name] == "counter":
                    assert re.search(rf"(rate|increase)\(\s*{name}\b", expr), f"{name} not rated"
            else:
                base = next(name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s))
                assert CONTRACT[base] == "histogram", name


def test_labels_and_label_values_are_the_contract_ones() -> None:
    exprs, _ = _all_exprs()
    selector = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
    matcher = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
    for expr in exprs:
        for name, body in selector.findall(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base not in CONTRACT:
                continue
            for label, op, value in matcher.findall(body):
                if label in {"job", "instance"}:
                    continue
                assert label in CONTRACT_LABELS.get(base, set()), f"{name}: label {label}"
                if label in LABEL_VALUES and "$" not in value:
                    values = set(value.split("|")) if op in ("=~", "!~") else {value}
                    assert values <= LABEL_VALUES[label], f"{name}: {label}{op}{value!r}"


def test_compose_and_k8s_scrape_the_job_the_rules_select() -> None:
    for config_file in ("prometheus.yml", "prometheus-k8s.yml"):
        (config,) = load_yaml_docs(DEPLOY / "prometheus" / config_file)
        assert "ifa-rank" in {j["job_name"] for j in config["scrape_configs"]}
