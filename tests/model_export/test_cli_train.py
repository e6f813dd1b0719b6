"""The training CLI end to end on the tiny preset: train, evaluate, compare, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ifa_rank.cli import main
from model_export.data.logs import SPLITS, load_log
from model_export.data.synthetic import generate, write_log
from model_export.metrics import auc


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
    assert metrics["test"]["sampled_rows"] > 0  # padded sets; counted apart from logged rows
    assert {"auc_no_history", "history_gain", "auc_vs_sampled"} <= metrics["test"].keys()

    # per-row predictions: every logged test row, in the input file's row order
    preds_path = tmp_path / "preds.csv"
    argv = ["evaluate", str(out / "checkpoint.pt"), "--data", str(log_file)]
    assert main([*argv, "--predictions", str(preds_path)]) == 0
    capsys.readouterr()
    preds = pd.read_csv(preds_path, dtype={"request_id": str})
    assert list(preds.columns) == ["request_id", "item_id", "label", "score"]
    log = load_log(log_file)
    test_req = np.flatnonzero(log.req_split == SPLITS.index("test"))
    test_rows = np.sort(
        np.concatenate(
            [log.cand_row[log.cand_offsets[r] : log.cand_offsets[r + 1]] for r in test_req]
        )
    )
    source = pd.read_csv(log_file, dtype={"request_id": str}).iloc[test_rows]
    assert len(preds) == len(source) == metrics["test"]["logged_rows"]
    assert (preds["request_id"].to_numpy() == source["request_id"].to_numpy()).all()
    assert (preds["item_id"].to_numpy() == source["item_id"].to_numpy()).all()
    assert (preds["label"].to_numpy() == source["label"].to_numpy()).all()
    assert ((preds["score"] > 0) & (preds["score"] < 1)).all()
    # anyone can recompute the headline metric from the file alone
    recomputed = auc(preds["label"].to_numpy(), preds["score"].to_numpy())
    assert recomputed == pytest.approx(metrics["test"]["auc"], abs=1e-6)

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
