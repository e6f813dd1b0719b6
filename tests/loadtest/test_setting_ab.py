"""`python -m loadtest.setting_ab`: services that differ in one setting, or in the
checkout they import `service` from, measured in turn against one seeded Redis (their
timings are not judged here: a benchmark, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.bench_plan import BenchPlan
from loadtest.setting_ab import (
    THIS_CHECKOUT,
    Variant,
    code_variants,
    main,
    paired,
    parse_setting,
    run_ab,
    run_variants,
)


def _plan() -> BenchPlan:
    return BenchPlan(
        quick=True,
        repeats=2,
        duration_s=0.3,
        warmup_s=0.1,
        n_events=500,
        m=20,
        items=50,
        warm_users=2,
    )


def test_each_value_gets_its_service_and_its_runs(tiny_artifacts: Path) -> None:
    plan = _plan()
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


def test_two_checkouts_each_serve_with_healthz_and_paired_differences(
    tiny_artifacts: Path,
) -> None:
    # the same checkout under two labels: each its own service, and its code path taken
    variants = [Variant("base", code=THIS_CHECKOUT), Variant("this", code=THIS_CHECKOUT)]
    out = run_variants(
        variants,
        str(tiny_artifacts),
        connections=2,
        pairs=2,
        plan=_plan(),
        budget_ms=60_000,
        tool="pyclient",
        healthz=True,
    )
    assert out["code"] == {"base": str(THIS_CHECKOUT), "this": str(THIS_CHECKOUT)}
    for key in ("by_value", "healthz_by_value"):
        assert set(out[key]) == {"base", "this"}
        for label, summary in out[key].items():
            assert summary["repeats"] == 2 and summary["errors"] == 0, (key, label, summary)
            assert summary["requests"] > 0, (key, label)
    assert out["healthz_by_value"]["this"]["concurrency"] == 1
    # paired: this - base, pair by pair, the median of the two pairs
    runs = {k: v["runs"] for k, v in out["by_value"].items()}
    want = (
        sum(b["p50_ms"] - a["p50_ms"] for a, b in zip(runs["base"], runs["this"], strict=True)) / 2
    )
    assert out["paired"]["this"]["p50_ms"] == pytest.approx(want)
    assert set(out["healthz_paired"]) == {"this"}


def test_a_checkout_is_what_its_service_imports(tiny_artifacts: Path, tmp_path: Path) -> None:
    # a tree whose service cannot be imported: its service must fail to start, which it
    # would not if `service` came from this checkout (the installed one) instead
    broken = tmp_path / "broken"
    (broken / "service").mkdir(parents=True)
    (broken / "service" / "__init__.py").write_text("")
    (broken / "service" / "app.py").write_text("raise ImportError('the broken checkout')\n")
    with pytest.raises(RuntimeError, match="before it was ready"):
        run_variants(
            [Variant("broken", code=broken)],
            str(tiny_artifacts),
            connections=1,
            pairs=1,
            plan=_plan(),
            tool="pyclient",
        )


def test_code_variants_are_the_base_then_this_checkout(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text("")
    base, this = code_variants(tmp_path)
    assert (base.label, base.code, base.env) == ("base", tmp_path.resolve(), {})
    assert (this.label, this.code) == ("this", THIS_CHECKOUT)
    assert (THIS_CHECKOUT / "loadtest" / "setting_ab.py").is_file()
    with pytest.raises(ValueError, match="not a checkout of this project"):
        code_variants(tmp_path / "service")


def test_paired_differences_are_medians_over_pairs_against_the_first() -> None:
    series = {
        "a": [{"p50_ms": 1.0, "rps": 100.0}, {"p50_ms": 2.0, "rps": 90.0}, {"p50_ms": 1.0}],
        "b": [{"p50_ms": 1.5, "rps": 110.0}, {"p50_ms": 1.0, "rps": 80.0}, {"p50_ms": 2.0}],
    }
    assert paired(series) == {"b": {"p50_ms": 0.5, "rps": 0.0}}
    assert paired({"a": series["a"]}) == {} and paired({}) == {}


@pytest.mark.parametrize("argv", [[], ["IFA_X=1,2", "--code", "."]], ids=["neither", "both"])
def test_the_command_takes_a_setting_or_a_checkout(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "either a setting (IFA_NAME=a,b) or --code BASE_DIR" in capsys.readouterr().err
