"""PNG plots for training curves and model comparisons (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    ax[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss", title="training loss")
    for key in ("valid_auc", "valid_gauc", "valid_auc_no_history"):
        ax[1].plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax[1].set(xlabel="epoch", ylabel="metric", title="validation")
    ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    names = [r["model"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    xs = range(len(names))
    for offset, key in ((-width / 2, "auc"), (width / 2, "gauc")):
        means = [r[key]["mean"] for r in rows]
        errs = [r[key]["std"] for r in rows]
        ax.bar([x + offset for x in xs], means, width, yerr=errs, label=f"test {key}", capsize=3)
    lo = min(min(r["auc"]["mean"], r["gauc"]["mean"]) for r in rows)
    hi = max(max(r["auc"]["mean"], r["gauc"]["mean"]) for r in rows)
    ax.set_ylim(max(0.0, lo - 0.03), min(1.0, hi + 0.02))
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="test metric", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
