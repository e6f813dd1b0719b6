"""Training loop: whole candidate sets per request, one user (all requests) per forward.

`ifa-rank train` writes DIR/checkpoint.pt (weights + configs + item table),
DIR/metrics.json and DIR/curves.png. Under torchrun or with `--ddp N` the same loop runs
data-parallel (model_export/distributed.py): each rank trains on its shard of the users,
rank 0 evaluates and writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model_export import distributed
from model_export.data_source import load_dataset, resolve_path
from model_export.distributed import RankInfo
from model_export.evaluate import evaluate_split
from model_export.model import IFAModel, build_model
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
    rank: RankInfo | None = None,
) -> dict[str, Any]:
    """Train, keep the best epoch by valid AUC, test it, write the three outputs.

    With a distributed `rank` (inside `distributed.process_group`), only rank 0
    evaluates, writes and returns the metrics; the other ranks return {}.
    """
    rank = rank or RankInfo()
    if rank.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    torch.set_num_threads(tc.threads)
    dataset = _load(data, cfg, tc, preset, rank)
    model = build_model(cfg)
    # `model` itself when not distributed; IFA uses every weight in every forward
    net = distributed.wrap(model, rank, find_unused=not isinstance(model, IFAModel))
    if rank.distributed:  # same initial weights above; a dropout stream of its own per rank
        torch.manual_seed(tc.seed + rank.rank)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    history: list[dict[str, float]] = []
    best_auc, best_epoch, best_state = -math.inf, -1, None
    started = time.perf_counter()
    for epoch in range(tc.epochs):
        train_loss = _train_epoch(net, opt, dataset, tc, epoch, rank, progress, cfg.model)
        stop = False
        if rank.is_main:
            valid = evaluate_split(model, dataset, "valid")
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    **{f"valid_{k}": float(v) for k, v in valid.items()},
                }
            )
            if progress:
                tqdm.write(
                    f"{cfg.model} epoch {epoch + 1}: loss {train_loss:.4f} "
                    f"valid auc {valid['auc']:.4f} gauc {valid['gauc']:.4f} "
                    f"history gain {valid['history_gain']:+.4f}"
                )
            score = valid["auc"] if not math.isnan(valid["auc"]) else -train_loss
            if score > best_auc:
                best_auc, best_epoch = score, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch + 1 - best_epoch >= tc.patience:
                stop = True
        if distributed.agree(stop, rank):  # rank 0 decides; every rank stops together
            break
    distributed.dump_state(model, rank)
    if not rank.is_main:
        return {}
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
        "world_size": rank.world_size,
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


def _load(data: str, cfg: ModelConfig, tc: TrainConfig, preset: str, rank: RankInfo) -> Any:
    """The dataset; when distributed, one rank per node prepares the files first."""
    if rank.distributed:
        if rank.local_rank == 0:
            resolve_path(data, preset)
        distributed.barrier(rank)
    return load_dataset(data, cfg, tc, preset)


def _train_epoch(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    dataset: Any,
    tc: TrainConfig,
    epoch: int,
    rank: RankInfo,
    progress: bool,
    name: str,
) -> float:
    """One pass over this rank's users (all of them when not distributed), one user per
    forward, an optimizer step every `users_per_step` users; the mean loss of all ranks."""
    net.train()
    users = distributed.shard(dataset.user_order("train", shuffle=True, epoch=epoch), rank)
    bar = tqdm(
        users,
        desc=f"{name} epoch {epoch + 1}/{tc.epochs}",
        unit="user",
        disable=not (progress and rank.is_main),
        leave=False,
    )
    losses: list[float] = []
    opt.zero_grad()
    pending = 0
    for i, u in enumerate(bar):
        batch = dataset.user_batch(int(u), "train", epoch=epoch)
        stepping = pending + 1 == tc.users_per_step or i == len(users) - 1
        with distributed.grad_sync(net, stepping):  # all-reduce only before a step
            logits = net(batch)  # (R, M)
            loss = set_loss(logits, batch.label, batch.cand_mask, tc.listwise_weight)
            (loss / tc.users_per_step).backward()
        pending += 1
        losses.append(float(loss.detach()))
        if stepping:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            opt.zero_grad()
            pending = 0
        if i % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return distributed.mean_over_ranks(losses, rank)


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
    if getattr(args, "ddp", None) is not None:
        return launch_ddp(args)
    cfg, tc = resolve(args.preset, args.model, args.overrides, args.epochs, args.seed)
    out = Path(args.out)
    rank = RankInfo.from_env()  # set by torchrun or launch_ddp; single-process otherwise
    with distributed.process_group(rank):
        metrics = train_model(args.data, cfg, tc, out, preset=args.preset, rank=rank)
    if not rank.is_main:
        return 0
    print(
        f"{cfg.model} on {args.data}: {metrics['params']:,} params, "
        f"{metrics['train_seconds']:.1f}s, best epoch {metrics['best_epoch']}"
        + (f", {rank.world_size} ranks" if rank.distributed else "")
    )
    print(format_metrics(metrics))
    print(f"wrote {out / 'checkpoint.pt'}, {out / 'metrics.json'}, {out / 'curves.png'}")
    return 0


def launch_ddp(args: argparse.Namespace) -> int:
    """`ifa-rank train --ddp N`: run `main` in N local ranks (what torchrun would do)."""
    if RankInfo.from_env().distributed:
        raise SystemExit("--ddp starts its own processes; leave it out under torchrun")
    if args.ddp < 1:
        raise SystemExit(f"--ddp expects N >= 1, got {args.ddp}")
    resolve(args.preset, args.model, args.overrides, args.epochs, args.seed)  # fail fast
    resolve_path(args.data, args.preset)  # prepare the data once, before the ranks read it
    fields = {k: v for k, v in vars(args).items() if k not in ("func", "ddp")}
    try:
        distributed.launch(args.ddp, main, argparse.Namespace(**fields, ddp=None))
    except distributed.LaunchError as e:
        print(f"error: distributed training failed: {e}", file=sys.stderr)
        return 1
    return 0
