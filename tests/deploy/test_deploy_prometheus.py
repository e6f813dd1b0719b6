"""Prometheus config and rules checked by promtool; Grafana provisioning and dashboard."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import DEPLOY, ROOT, load_yaml_docs

PROM = DEPLOY / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml")) + sorted((PROM / "tests").glob("*.yaml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=180, check=False
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def _with_local_rules(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the container sees it, with rule_files pointing into this checkout."""
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    return {**config, "rule_files": [str(PROM / "rules" / "*.yml")]}


def test_check_config_compose(promtool: str, tmp_path: Path) -> None:
    (config,) = load_yaml_docs(PROM / "prometheus.yml")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(_with_local_rules(config)))
    out = run_promtool(promtool, "check", "config", str(path))
    # the rules were found through rule_files and checked as part of the config
    assert re.search(r"SUCCESS: [1-9]\d* rules found", out), out


def test_check_config_kubernetes(promtool: str, tmp_path: Path) -> None:
    """prometheus-k8s.yml, checked with the pod discovery swapped for a static target.

    Debian's promtool is built without the Kubernetes service discovery, so it rejects
    `kubernetes_sd_configs`; everything else (relabeling regexes, rule files) is checked.
    """
    (config,) = load_yaml_docs(PROM / "prometheus-k8s.yml")
    config = _with_local_rules(config)
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ifa-rank"
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd["role"] == "pod"
    job["static_configs"] = [{"targets": ["ifa-rank:8000"]}]
    path = tmp_path / "prometheus-k8s.yml"
    path.write_text(yaml.safe_dump(config))
    run_promtool(promtool, "check", "config", str(path))


def test_check_rules(promtool: str) -> None:
    assert RULES
    run_promtool(promtool, "check", "rules", *map(str, RULES))


def test_rule_unit_tests(promtool: str) -> None:
    assert RULE_TESTS
    out = run_promtool(promtool, "test", "rules", *[p.name for p in RULE_TESTS], cwd=PROM / "tests")
    assert "SUCCESS" in out


def _alerts() -> dict[str, dict[str, Any]]:
    alerts = {}
    for path in RULES:
        (doc,) = load_yaml_docs(path)
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    return alerts


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        (doc,) = load_yaml_docs(path)
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    required = {
        "IfaRankLatencyP99AboveBudget",
        "IfaRankDegradedRatioHigh",
        "IfaRankServerErrors",
        "IfaRankRedisUnreachable",
        "IfaStateCacheHitRatioCollapse",
        "IfaModelNotLoaded",
    }
    assert required <= alerts
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def _anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_alerts_have_severity_and_a_runbook_that_exists() -> None:
    anchors = _anchors((ROOT / "docs" / "deploy.md").read_text(encoding="utf-8"))
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        doc, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert doc == "docs/deploy.md" and anchor in anchors, f"{name}: runbook #{anchor} missing"


def test_budget_threshold_matches_configured_budget() -> None:
    config = load_yaml_docs(DEPLOY / "k8s" / "configmap.yaml")[0]["data"]
    budget_s = int(config["IFA_DEFAULT_BUDGET_MS"]) / 1000
    expr = _alerts()["IfaRankLatencyP99AboveBudget"]["expr"]
    threshold = float(expr.rsplit(">", 1)[1])
    assert threshold == pytest.approx(budget_s)


# ---- Grafana -------------------------------------------------------------------------


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and variable queries."""
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}


def _as_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    # label_values(metric, label) is Grafana's, not PromQL: check the selector inside.
    match = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
    return match.group(1) if match else expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard(path: Path, promtool: str, tmp_path: Path) -> None:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in (
        "outcome",
        "p99",
        "stage",
        "cache",
        "reason",
        "in-flight",
        "candidates",
        "sequence",
        "model",
    ):
        assert needed in titles, f"dashboard has no panel about {needed}"
    # Let promtool parse every expression: wrap them as recording rules.
    exprs = [_as_promql(e) for e in dashboard_exprs(dashboard)]
    assert not [e for e in exprs if "$" in e], "unresolved Grafana variable"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    rules_file = tmp_path / "dashboard_exprs.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    run_promtool(promtool, "check", "rules", str(rules_file))


def test_grafana_provisioning() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = load_yaml_docs(prov / "datasources" / "prometheus.yaml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (dash,) = load_yaml_docs(prov / "dashboards" / "ifa-rank.yaml")
    (provider,) = dash["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
        assert var["query"] == "prometheus"
        assert var["current"]["value"] == source["uid"]
