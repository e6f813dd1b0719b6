"""The metric names deploy/ uses, checked against a live service's /metrics.

A real app (`create_app`, lifespan run by TestClient) with a real Redis and the tiny
exported model gets events and /rank traffic (ok and degraded answers), then its
/metrics exposition must hold:

* every metric name the Grafana dashboard and the alert rules use
  (`collect_metric_names()`; histograms as `_bucket`/`_sum`/`_count`);
* every docs/design.md §7 metric with its type, its labels and the contract's label
  values (`outcome`, `stage`, `result`, and the documented degraded `reason`s);
* every label value the rules and dashboard select on (`reason=~"stale_state|..."`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from svc_helpers import seed_sequence

from service.app import create_app
from service.settings import Settings

from .test_metric_names import (
    CONTRACT,
    CONTRACT_LABELS,
    HISTOGRAM_SUFFIXES,
    LABEL_VALUES,
    _all_exprs,
    collect_metric_names,
)

T0 = 1_700_000_000
CANDS = [1, 5, 9, 13, 60, 61]
# docs/service.md: `degraded` values, plus `overloaded` (503 rejections count there too).
DEGRADED_REASONS = {"partial_state", "stale_state", "no_history", "overloaded"}
# Label values every Prometheus adds, or Grafana template variables: not the service's.
NOT_EXPORTED_LABELS = {"job", "instance"}


def events(n: int, seed: int) -> list[dict[str, int]]:
    rng = np.random.default_rng(seed)
    return [
        {"item_id": int(rng.integers(0, 80)), "ts": T0 + 60 * i, "action": int(rng.integers(0, 3))}
        for i in range(n)
    ]


def parse_exposition(text: str) -> tuple[dict[str, str], dict[str, list[Sample]]]:
    """(family name -> type, sample name -> samples) of a Prometheus text exposition."""
    types: dict[str, str] = {}
    samples: dict[str, list[Sample]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[s.name].append(s)
    return types, samples


def exposed_names(name: str, kind: str | None) -> list[str]:
    """The sample names a metric of this (contract) type must show."""
    if kind == "histogram":
        return [name + suffix for suffix in HISTOGRAM_SUFFIXES]
    return [name]


def test_live_metrics_cover_dashboard_rules_and_contract(
    redis_url: str, tiny_artifacts: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        artifacts_dir=tiny_artifacts,
        model_version="v1",
        warmup_candidates=(1, 16),
        infer_workers=2,
        default_budget_ms=10_000,  # behaviour, not speed: the box is loaded
        redis_timeout_ms=1_000,
        redis_cooldown_ms=100,
    )
    seed_sequence(redis_url, "live-cold", 5_000, seed=3)
    with TestClient(create_app(settings)) as client:
        for u in range(3):
            r = client.post("/events", json={"user_id": f"live-{u}", "events": events(20, u)})
            assert r.status_code == 200, r.text
        answers = []
        for _ in range(2):
            for u in range(3):
                r = client.post("/rank", json={"user_id": f"live-{u}", "candidates": CANDS})
                assert r.status_code == 200, r.text
                answers.append(r.json()["degraded"])
        assert answers == [None] * 6
        # A cold user with a history and a budget nothing fits in: the recent tail only.
        r = client.post(
            "/rank", json={"user_id": "live-cold", "candidates": CANDS, "budget_ms": 0.001}
        )
        assert r.status_code == 200 and r.json()["degraded"] == "partial_state", r.text
        r = client.post(  # shares the background build: warm again
            "/rank", json={"user_id": "live-cold", "candidates": CANDS, "budget_ms": 60_000}
        )
        assert r.status_code == 200 and r.json()["degraded"] is None, r.text
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    types, samples = parse_exposition(response.text)

    def value(name: str, **labels: str) -> float:
        matching = [
            s.value
            for s in samples.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert matching, f"no sample {name}{labels}"
        return float(sum(matching))

    # 1. Every name the dashboard and the rules use is exported.
    used = collect_metric_names()
    assert used, "no metric names found in deploy/"
    missing = [
        f"{name} (as {', '.join(exposed_names(name, CONTRACT.get(name)))})"
        for name in sorted(used)
        if not all(n in samples for n in exposed_names(name, CONTRACT.get(name)))
    ]
    assert not missing, f"used by deploy/ but not in the live /metrics: {missing}"

    # 2. The docs/design.md §7 contract: names, types, labels, label values.
    for name, kind in CONTRACT.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert types.get(family) == kind, f"{name}: type {types.get(family)!r}, want {kind}"
        for sample_name in exposed_names(name, kind):
            assert samples.get(sample_name), f"{sample_name} not exported"
            want = CONTRACT_LABELS.get(name, set())
            if not sample_name.endswith("_bucket"):
                want = want - {"le"}
            for s in samples[sample_name]:
                assert set(s.labels) == want, f"{sample_name}: labels {sorted(s.labels)}"
    for label, values in LABEL_VALUES.items():
        (metric,) = [m for m, labels in CONTRACT_LABELS.items() if label in labels]
        seen = {s.labels[label] for s in samples[exposed_names(metric, CONTRACT[metric])[-1]]}
        assert seen == values, f"{metric}: {label} values {sorted(seen)}, want {sorted(values)}"
    reasons = {s.labels["reason"] for s in samples["ifa_rank_degraded_total"]}
    assert reasons >= DEGRADED_REASONS, f"degraded reasons {sorted(reasons)}"
    les = {
        float(s.labels["le"])
        for s in samples["ifa_rank_request_duration_seconds_bucket"]
        if s.labels["outcome"] == "ok"
    }
    finite = sorted(le for le in les if math.isfinite(le))
    assert finite[0] == 0.0005 and finite[-1] == 1.0 and math.inf in les, finite  # 0.5 ms..1 s
    assert 0.04 in les, "the 40 ms budget the p99 alert compares with is not a bucket bound"
    (info,) = samples["ifa_model_info"]
    assert info.value == 1 and info.labels["version"] == "v1" and info.labels["provider"]

    # 3. The traffic shows up where the dashboard and the alerts look for it.
    assert value("ifa_rank_request_duration_seconds_count", outcome="ok") == 7
    assert value("ifa_rank_request_duration_seconds_count", outcome="degraded") == 1
    assert value("ifa_rank_degraded_total", reason="partial_state") == 1
    assert value("ifa_events_appended_total") == 60
    assert value("ifa_rank_candidates_count") == 8
    assert value("ifa_sequence_length_count") == 8
    assert value("ifa_state_cache_total", result="hit") >= 3
    assert value("ifa_state_cache_total", result="miss") >= 1
    for stage in LABEL_VALUES["stage"]:
        assert value("ifa_rank_stage_duration_seconds_count", stage=stage) >= 1, stage
    assert value("ifa_inflight_requests") == 0

    # 4. Every label value a rule or a panel selects on exists as a live series.
    selector = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
    matcher = re.compile(r'(\w+)\s*(=~|=)\s*"([^"]*)"')
    exprs, _ = _all_exprs()
    for expr in exprs:
        for name, body in selector.findall(expr):
            if name not in samples:
                continue  # recording-rule outputs and Prometheus' own series
            for label, op, wanted in matcher.findall(body):
                if label in NOT_EXPORTED_LABELS or "$" in wanted or ".*" in wanted:
                    continue
                have = {s.labels.get(label) or "" for s in samples[name]}
                for v in wanted.split("|"):
                    found = any(re.fullmatch(v, h) for h in have) if op == "=~" else v in have
                    assert found, f"{expr!r}: no live series {name}{{{label}{op}{v!r}}}"
