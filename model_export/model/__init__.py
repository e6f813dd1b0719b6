"""The IFA model, its baselines and the shared parts.

`build_model(cfg)` returns a `RankModel` for any `cfg.model` in MODEL_TYPES; every model
maps a `UserBatch` to logits (R, M). `IFAModel` also exposes `build_state` / `score`,
the two graphs that are exported for serving.
"""

from __future__ import annotations

from .base import RankModel
from .config import FEATURE_MAPS, MODEL_TYPES, ModelConfig, default_config
from .ifa import IFAModel
from .loss import set_loss


def build_model(cfg: ModelConfig) -> RankModel:
    if cfg.model == "ifa":
        return IFAModel(cfg)
    from .baselines import BASELINES

    return BASELINES[cfg.model](cfg)


__all__ = [
    "FEATURE_MAPS",
    "MODEL_TYPES",
    "IFAModel",
    "ModelConfig",
    "RankModel",
    "build_model",
    "default_config",
    "set_loss",
]
