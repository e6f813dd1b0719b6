"""Metrics of a model on one split, per-row predictions, and `ifa-rank evaluate CHECKPOINT`.

Metrics are over the logged rows (model_export/metrics.py). Two diagnostics ride along,
so that a model which ignores the history is visible in every training log:

* `auc_no_history`: the same model and candidate sets with every request's history
  removed (an empty sequence);
* `history_gain` = auc - auc_no_history: what the sequence side adds. About zero means
  the model has not learned to use the history, whatever its AUC.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model_export.batch import UserBatch
from model_export.checkpoint import load_model
from model_export.metrics import MetricAccumulator
from model_export.model import RankModel
from model_export.presets import TrainConfig

PREDICTION_COLUMNS = ("request_id", "item_id", "label", "score")


def without_history(batch: UserBatch) -> UserBatch:
    """The same requests and candidates with an empty history."""
    empty = batch.ev_item[:0]
    return replace(
        batch,
        ev_item=empty,
        ev_cat=empty,
        ev_action=empty,
        ev_ts=empty,
        req_prefix=torch.zeros_like(batch.req_prefix),
    )


def _scored(
    model: RankModel, dataset: Any, split: str, progress: bool = False
) -> Iterator[tuple[int, UserBatch, np.ndarray]]:
    """(user index, batch, logits (R, M)) for every user with requests in `split`."""
    users = dataset.users(split)
    bar = tqdm(users, desc=f"score {split}", unit="user", disable=not progress, leave=False)
    for u in bar:
        batch = dataset.user_batch(int(u), split)
        yield int(u), batch, model(batch).numpy()


@torch.no_grad()
def evaluate_split(
    model: RankModel, dataset: Any, split: str, history_check: bool = True
) -> dict[str, float]:
    """Every request of `split`, scored as a whole (padded) candidate set; metrics over
    its logged rows, plus the no-history diagnostic (see the module docstring)."""
    model.eval()
    acc, blind = MetricAccumulator(), MetricAccumulator()
    for u, batch, logits in _scored(model, dataset, split):
        mask, exposed, label = batch.cand_mask.numpy(), batch.exposed.numpy(), batch.label.numpy()
        acc.add(u, logits, label, mask, exposed)
        if history_check:
            blind_logits = model(without_history(batch)).numpy()
            blind.add(u, blind_logits, label, mask, exposed)
    result = acc.compute()
    if history_check:
        result["auc_no_history"] = blind.compute()["auc"]
        result["history_gain"] = result["auc"] - result["auc_no_history"]
    return result


@torch.no_grad()
def write_predictions(
    model: RankModel, dataset: Any, split: str, path: Path, progress: bool = True
) -> int:
    """One CSV row per logged candidate row of `split`, in the input file's row order:
    request_id, item_id, label, score (the model's probability). Returns the row count."""
    model.eval()
    log = dataset.log
    cands: list[np.ndarray] = []  # indices into log.cand_*
    scores: list[np.ndarray] = []
    for u, _, logits in _scored(model, dataset, split, progress):
        for i, (c0, c1) in enumerate(dataset.logged_rows(u, split)):
            cands.append(np.arange(c0, c1))
            scores.append(1.0 / (1.0 + np.exp(-logits[i, : c1 - c0].astype(np.float64))))
    cand = np.concatenate(cands) if cands else np.zeros(0, np.int64)
    score = np.concatenate(scores) if scores else np.zeros(0)
    order = np.argsort(log.cand_row[cand], kind="stable")  # the input file's row order
    cand, score = cand[order], score[order]
    request = np.repeat(np.arange(log.num_requests), np.diff(log.cand_offsets))[cand]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PREDICTION_COLUMNS)
        for c, r, p in zip(cand.tolist(), request.tolist(), score.tolist(), strict=True):
            writer.writerow((log.req_id[r], int(log.cand_item[c]), int(log.cand_label[c]), repr(p)))
    return int(cand.size)


def main(args: argparse.Namespace) -> int:
    from model_export.data_source import load_dataset

    model, ckpt = load_model(args.checkpoint)
    tc = TrainConfig(**ckpt["train_config"])
    dataset = load_dataset(args.data, model.cfg, tc, preset=None)
    result = evaluate_split(model, dataset, args.split)
    print(
        json.dumps(
            {"model": ckpt["model"], "data": args.data, "split": args.split, args.split: result},
            indent=2,
        )
    )
    if args.predictions:
        n = write_predictions(model, dataset, args.split, Path(args.predictions))
        print(f"wrote {n:,} {args.split} rows to {args.predictions}")
    return 0
