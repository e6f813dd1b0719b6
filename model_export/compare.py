"""`ifa-rank compare`: every model, same data, seeds and budget; a table and a chart."""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model_export.plots import plot_compare
from model_export.presets import resolve
from model_export.train import train_model

METRICS = ("auc", "gauc", "ndcg@10", "logloss", "history_gain")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": runs[0]["model"],
        "seeds": len(runs),
        "params": runs[0]["params"],
        "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
    }
    for key in METRICS:
        values = [r["test"].get(key, float("nan")) for r in runs]
        row[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}
    return row


def to_markdown(rows: list[dict[str, Any]], data: str, command: str) -> str:
    lines = [
        f"Data: `{data}`. Command: `{command}`. Test split, logged rows only, "
        "mean ± std over seeds; history gain = AUC minus the same model's AUC with the "
        "history removed; train s = mean wall time of one training run.",
        "",
        "| model | AUC | GAUC | NDCG@10 | logloss | history gain | params | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS]
        lines.append(
            f"| {r['model']} | "
            + " | ".join(cells)
            + f" | {r['params']:,} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _train_one(job: tuple[str, str, list[str], int | None, int, str, str]) -> dict[str, Any]:
    name, preset, overrides, epochs, seed, data, out = job
    cfg, tc = resolve(preset, name, overrides, epochs, seed)
    return train_model(data, cfg, tc, Path(out) / f"{name}-s{seed}", preset, progress=False)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    jobs = [
        (n, args.preset, list(args.overrides), args.epochs, s, args.data, str(out))
        for n in names
        for s in seeds
    ]
    workers = max(1, int(getattr(args, "jobs", 1) or 1))
    if workers == 1:
        results = []
        for name, preset, overrides, epochs, seed, data, _ in jobs:
            cfg, tc = resolve(preset, name, overrides, epochs, seed)
            results.append(train_model(data, cfg, tc, out / f"{name}-s{seed}", preset))
    else:
        # one single-threaded training per core; data is prepared once before forking work
        from model_export.data_source import resolve_path

        resolve_path(args.data, args.preset)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(
                tqdm(pool.map(_train_one, jobs), total=len(jobs), desc="compare", unit="run")
            )
    rows = []
    for name in names:
        row = summarise([r for r in results if r["model"] == name])
        rows.append(row)
        print(f"{name}: test auc {row['auc']['mean']:.4f} ± {row['auc']['std']:.4f}", flush=True)
    command = (
        f"ifa-rank compare --data {args.data} --models {args.models} --preset "
        f"{args.preset} --seeds {args.seeds} --out {args.out}"
        + "".join(f" --set {o}" for o in args.overrides)
    )
    (out / "compare.json").write_text(
        json.dumps(
            {"data": args.data, "preset": args.preset, "seeds": seeds, "rows": rows}, indent=2
        )
    )
    table = to_markdown(rows, args.data, command)
    (out / "compare.md").write_text(table)
    plot_compare(rows, out / "compare.png", title=f"test metrics on {args.data}")
    print(table)
    return 0
