"""The training CLI end to end on the tiny preset: train, evaluate, compare, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ifa_common.cli import main
from model_export.data.synthetic import generate, write_log


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = generate(
        users=12, min_len=60, max_len=300, items=300, categories=12, requests_per_user=5, seed=3
    )
    return write_log(frame, tmp_path_factory.mktemp("data") / "log.csv")


def test_train_writes_checkpoint_metrics_and_curves(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(log_file),
                "--model",
                "ifa",
                "--preset",
                "tiny",
                "--out",
                str(out),
                "--seed",
                "1",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"model", "data", "params", "train_seconds", "valid", "test"} <= metrics.keys()
    assert metrics["model"] == "ifa" and metrics["params"] > 0
    for split in ("valid", "test"):
        assert {"auc", "gauc", "ndcg@10", "logloss"} <= metrics[split].keys()
        assert 0.0 <= metrics[split]["auc"] <= 1.0
    assert (out / "checkpoint.pt").stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| test |" in capsys.readouterr().out

    # evaluate reproduces the test metrics of the saved (best) weights
    assert main(["evaluate", str(out / "checkpoint.pt"), "--data", str(log_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)

    # and it exports to a servable artifact
    assert main(["export", str(out / "checkpoint.pt"), "--out", str(tmp_path / "art")]) == 0
    version = (tmp_path / "art" / "latest").read_text().strip()
    assert (tmp_path / "art" / version / "scorer.onnx").is_file()


def test_compare_writes_table_json_and_chart(log_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--data",
                str(log_file),
                "--models",
                "ifa,mean_pool",
                "--preset",
                "tiny",
                "--seeds",
                "0,1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["ifa", "mean_pool"]
    assert all(r["seeds"] == 2 and len(r["auc"]["runs"]) == 2 for r in result["rows"])
    table = (out / "compare.md").read_text()
    assert "| ifa |" in table and "| mean_pool |" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_export_refuses_a_baseline(log_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "din"
    assert (
        main(
            [
                "train",
                "--data",
                str(log_file),
                "--model",
                "din",
                "--preset",
                "tiny",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["export", str(out / "checkpoint.pt"), "--out", str(tmp_path / "art")]) != 0
    assert not (tmp_path / "art" / "latest").exists()
