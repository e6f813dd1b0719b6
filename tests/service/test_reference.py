"""The README's settings and metrics tables are the code's, not a hand-kept copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.metrics import CONTRACT_METRICS, Metrics
from service.reference import render
from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_tables_match_the_code() -> None:
    text = README.read_text()
    assert render(text) == text, "README drifted: run `python -m service.reference README.md`"


def test_every_setting_and_metric_has_a_row() -> None:
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"| `IFA_{name.upper()}` |" in text
    for family in Metrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        assert f"| `{family.name}{suffix}` |" in text
    for name in CONTRACT_METRICS:
        assert f"| `{name}` |" in text


def test_render_refuses_text_without_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        render("no tables here")
