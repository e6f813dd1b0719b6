"""Named training budgets. `tiny` is for tests, `small` for `make run` and the README
tables on a 2-core CPU, `full` for a real machine."""

from __future__ import annotations

import ast
from dataclasses import dataclass, fields, replace
from typing import Any

from model_export.model.config import ModelConfig


@dataclass
class TrainConfig:
    epochs: int = 6
    lr: float = 3e-3
    weight_decay: float = 1e-5
    users_per_step: int = 1  # users (each with all their requests) per optimizer step
    set_size: int = 50  # candidate set size requests are padded to (serving-like sets)
    listwise_weight: float = 0.5  # loss = BCE + listwise_weight * listwise softmax CE
    patience: int = 2  # epochs without valid AUC gain before stopping
    max_users: int = 0  # 0 = all; >0 keeps the first users (tests, smoke runs)
    threads: int = 1  # torch intra-op threads (small ops: one thread beats two on 2 cores)
    seed: int = 0


@dataclass(frozen=True)
class SyntheticSpec:
    users: int
    min_len: int
    max_len: int
    items: int
    categories: int
    requests_per_user: int


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": {
            "item_buckets": 4096,
            "category_buckets": 64,
            "d_model": 16,
            "heads": 2,
            "d_head": 4,
            "decay_per_day": (0.0, 0.0),
            "mlp_hidden": (16,),
        },
        "train": {"epochs": 1, "users_per_step": 4, "set_size": 20, "max_users": 24},
    },
    "small": {
        "model": {},
        "train": {"epochs": 5},
    },
    "full": {
        "model": {
            "item_buckets": 262_144,
            "d_model": 64,
            "heads": 4,
            "d_head": 16,
            "mlp_hidden": (128, 64),
        },
        "train": {"epochs": 15, "patience": 3},
    },
}

SYNTHETIC: dict[str, SyntheticSpec] = {
    "tiny": SyntheticSpec(
        users=24, min_len=200, max_len=2_000, items=2_000, categories=40, requests_per_user=6
    ),
    "small": SyntheticSpec(
        users=240, min_len=1_000, max_len=10_000, items=10_000, categories=100, requests_per_user=40
    ),
    "full": SyntheticSpec(
        users=2_000,
        min_len=1_000,
        max_len=100_000,
        items=50_000,
        categories=200,
        requests_per_user=10,
    ),
}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # plain strings: feature_map=elu


def resolve(
    preset: str, model: str, overrides: list[str], epochs: int | None, seed: int
) -> tuple[ModelConfig, TrainConfig]:
    """Preset + `--set key=value` overrides -> (ModelConfig, TrainConfig)."""
    spec = PRESETS[preset]
    model_kw: dict[str, Any] = {"model": model, **spec["model"]}
    train_kw: dict[str, Any] = {**spec["train"], "seed": seed}
    model_fields = {f.name for f in fields(ModelConfig)}
    train_fields = {f.name for f in fields(TrainConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        if key in model_fields:
            model_kw[key] = _parse_value(value)
        elif key in train_fields:
            train_kw[key] = _parse_value(value)
        else:
            raise SystemExit(f"--set: unknown field {key!r}")
    if "heads" in model_kw and "decay_per_day" not in model_kw:
        model_kw["decay_per_day"] = (0.0,) * int(model_kw["heads"])
    if epochs is not None:
        train_kw["epochs"] = epochs
    return ModelConfig(**model_kw), replace(TrainConfig(), **train_kw)
