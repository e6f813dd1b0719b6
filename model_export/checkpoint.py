"""The one way to read a training checkpoint: weights only (a checkpoint can never run
code), checked, and turned into the model it describes. `train.py` writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_export.model import RankModel, build_model
from model_export.model.config import ModelConfig


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint, or weights that do not fit its config."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (tensors, numbers, strings, lists and dicts only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle of arbitrary objects is refused by design
        raise CheckpointError(
            f"{path} is not a loadable checkpoint with weights_only=True ({e}); a checkpoint "
            "must hold only tensors, numbers, strings, lists and dicts"
        ) from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: expected a dict with 'config' and 'state_dict'")
    return ckpt


def load_model(path: str | Path) -> tuple[RankModel, dict[str, Any]]:
    """(the model in eval mode with the checkpoint's weights, the checkpoint dict)."""
    ckpt = read_checkpoint(path)
    return model_from(ckpt, path), ckpt


def model_from(ckpt: dict[str, Any], path: str | Path) -> RankModel:
    """The model a checkpoint dict (from `read_checkpoint(path)`) describes, in eval mode."""
    model = build_model(ModelConfig.from_dict(dict(ckpt["config"])))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored config: {e}") from e
    return model.eval()
