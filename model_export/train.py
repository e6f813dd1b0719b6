"""Training loop: whole candidate sets per request, one user (all requests) per forward.

`ifa-rank train` writes DIR/checkpoint.pt (weights + configs + item table),
DIR/metrics.json and DIR/curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model_export.data_source import load_dataset
from model_export.evaluate import evaluate_split
from model_export.model import build_model
from model_export.model.config import ModelConfig
from model_export.model.loss import set_loss
from model_export.plots import plot_curves
from model_export.presets import TrainConfig, resolve


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_model(
    data: str,
    cfg: ModelConfig,
    tc: TrainConfig,
    out: Path,
    preset: str = "small",
    progress: bool = True,
) -> dict[str, Any]:
    """Train, keep the best epoch by valid AUC, test it, write the three outputs."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    torch.set_num_threads(tc.threads)
    dataset = load_dataset(data, cfg, tc, preset)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    history: list[dict[str, float]] = []
    best_auc, best_epoch, best_state = -math.inf, -1, None
    started = time.perf_counter()
    for epoch in range(tc.epochs):
        model.train()
        losses: list[float] = []
        batches = list(dataset.batches("train", shuffle=True, epoch=epoch))
        bar = tqdm(
            batches,
            desc=f"{cfg.model} epoch {epoch + 1}/{tc.epochs}",
            unit="user",
            disable=not progress,
            leave=False,
        )
        opt.zero_grad()
        pending = 0
        for i, batch in enumerate(bar):
            logits = model(batch)  # (R, M)
            loss = set_loss(logits, batch.label, batch.cand_mask, tc.listwise_weight)
            (loss / tc.users_per_step).backward()
            pending += 1
            losses.append(float(loss.detach()))
            if pending == tc.users_per_step or i == len(batches) - 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                opt.zero_grad()
                pending = 0
            if i % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        valid = evaluate_split(model, dataset, "valid")
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                **{f"valid_{k}": float(v) for k, v in valid.items()},
            }
        )
        if progress:
            tqdm.write(
                f"{cfg.model} epoch {epoch + 1}: loss {np.mean(losses):.4f} "
                f"valid auc {valid['auc']:.4f} gauc {valid['gauc']:.4f} "
                f"history gain {valid['history_gain']:+.4f}"
            )
        score = valid["auc"] if not math.isnan(valid["auc"]) else -float(np.mean(losses))
        if score > best_auc:
            best_auc, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch + 1 - best_epoch >= tc.patience:
            break
    train_seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    valid = evaluate_split(model, dataset, "valid")
    test = evaluate_split(model, dataset, "test")
    item_ids, item_cats = dataset.item_table()
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "data": data,
        "data_id": dataset.data_id,
        "params": count_params(model),
        "train_seconds": round(train_seconds, 2),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "valid": valid,
        "test": test,
        "history": history,
        "config": cfg.to_dict(),
        "train_config": asdict(tc),
    }
    torch.save(
        {
            "format": 1,
            "model": cfg.model,
            "config": cfg.to_dict(),
            "train_config": asdict(tc),
            "state_dict": model.state_dict(),
            "data": data,
            "data_id": dataset.data_id,
            "metrics": {"valid": valid, "test": test},
            "item_table": {
                "item_id": torch.from_numpy(np.ascontiguousarray(item_ids, dtype=np.int64)),
                "category": torch.from_numpy(np.ascontiguousarray(item_cats, dtype=np.int64)),
            },
        },
        out / "checkpoint.pt",
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    plot_curves(history, out / "curves.png", title=f"{cfg.model} on {data}")
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    rows = [
        "| split (logged rows) | auc | gauc | ndcg@10 | logloss | history gain |",
        "|---|---|---|---|---|---|",
    ]
    for split in ("valid", "test"):
        m = metrics[split]
        rows.append(
            f"| {split} | {m['auc']:.4f} | {m['gauc']:.4f} | {m['ndcg@10']:.4f} "
            f"| {m['logloss']:.4f} | {m['history_gain']:+.4f} |"
        )
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    cfg, tc = resolve(args.preset, args.model, args.overrides, args.epochs, args.seed)
    out = Path(args.out)
    metrics = train_model(args.data, cfg, tc, out, preset=args.preset)
    print(
        f"{cfg.model} on {args.data}: {metrics['params']:,} params, "
        f"{metrics['train_seconds']:.1f}s, best epoch {metrics['best_epoch']}"
    )
    print(format_metrics(metrics))
    print(f"wrote {out / 'checkpoint.pt'}, {out / 'metrics.json'}, {out / 'curves.png'}")
    return 0
