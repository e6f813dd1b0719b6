"""Metrics of a model on one split, and `ifa-rank evaluate CHECKPOINT`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from model_export.metrics import MetricAccumulator
from model_export.model import RankModel, build_model
from model_export.model.config import ModelConfig
from model_export.presets import TrainConfig


@torch.no_grad()
def evaluate_split(model: RankModel, dataset: Any, split: str) -> dict[str, float]:
    """Every request of `split`, scored as a whole (padded) candidate set."""
    model.eval()
    acc = MetricAccumulator()
    for user, batch in enumerate(dataset.batches(split, shuffle=False, epoch=0)):
        logits = model(batch)  # (R, M)
        acc.add(user, logits.numpy(), batch.label.numpy(), batch.cand_mask.numpy())
    return acc.compute()


def load_checkpoint(path: Path) -> tuple[RankModel, dict[str, Any]]:
    """Weights-only load: a checkpoint can never run code."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def main(args: argparse.Namespace) -> int:
    from model_export.data_source import load_dataset

    model, ckpt = load_checkpoint(Path(args.checkpoint))
    tc = TrainConfig(**ckpt["train_config"])
    dataset = load_dataset(args.data, model.cfg, tc, preset=None)
    result = evaluate_split(model, dataset, args.split)
    print(
        json.dumps(
            {"model": ckpt["model"], "data": args.data, "split": args.split, args.split: result},
            indent=2,
        )
    )
    return 0
