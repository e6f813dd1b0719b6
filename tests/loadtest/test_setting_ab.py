"""`python -m loadtest.setting_ab`: services that differ in one setting, measured in
turn against one seeded Redis (its timings are not judged here: a benchmark, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.bench_plan import BenchPlan
from loadtest.setting_ab import parse_setting, run_ab


def test_each_value_gets_its_service_and_its_runs(tiny_artifacts: Path) -> None:
    plan = BenchPlan(
        quick=True,
        repeats=2,
        duration_s=0.3,
        warmup_s=0.1,
        n_events=500,
        m=20,
        items=50,
        warm_users=2,
    )
    out = run_ab(
        "IFA_STARTS_PER_ITERATION",
        ["0", "1"],
        str(tiny_artifacts),
        connections=4,
        pairs=2,
        plan=plan,
        budget_ms=60_000,
        tool="pyclient",
    )
    assert out["setting"] == "IFA_STARTS_PER_ITERATION" and set(out["by_value"]) == {"0", "1"}
    for value, summary in out["by_value"].items():
        assert summary["repeats"] == 2 and summary["requests"] > 0, value
        assert summary["errors"] == 0, (value, summary)
        assert 0 < summary["p50_ms"] <= summary["p99_ms"], (value, summary)


@pytest.mark.parametrize("text", ["IFA_X=1", "X=1,2", "IFA_X", "IFA_X=", "=1,2"])
def test_a_setting_needs_a_name_and_two_values(text: str) -> None:
    with pytest.raises(ValueError, match="IFA_NAME=value,value"):
        parse_setting(text)


def test_a_setting_parses_into_its_values() -> None:
    assert parse_setting("IFA_WARM_CHECK=push,strict") == ("IFA_WARM_CHECK", ["push", "strict"])
