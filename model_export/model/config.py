"""Model configuration, stored with the weights (checkpoint) and in the ONNX manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

MODEL_TYPES = ("ifa", "din", "sim_hard", "twin", "softmax_full", "mean_pool")
FEATURE_MAPS = ("elu", "exp", "hedgehog", "taylor")
SECONDS_PER_DAY = 86_400.0


@dataclass
class ModelConfig:
    model: str = "ifa"  # one of MODEL_TYPES
    item_buckets: int = 65_536  # item id -> row: id % item_buckets
    category_buckets: int = 1_024  # row 0 = unknown category
    action_buckets: int = 16  # row 0 = unknown action
    d_model: int = 32  # embedding / token width
    embed_std: float = 1.0  # init std of the item/category/action tables (see embeddings.py)
    heads: int = 4  # attention heads H
    d_head: int = 8  # value width per head D
    d_key: int = 0  # query/key width per head d before phi (0 = d_head)
    feature_map: str = "exp"  # ifa's positive map phi: elu | exp | hedgehog | taylor
    decay_per_day: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # ifa: lambda_h per head, 0 = lifelong
    use_mass: bool = False  # log attention mass to the head (ifa and the attention baselines)
    attn_temp_init: float = 1.0  # baselines: initial factor on q.k/sqrt(d), learned per head
    set_layer: bool = False  # self-attention over the candidate set
    set_heads: int = 2
    mlp_hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    last_n: int = 100  # din: events attended
    top_k: int = 100  # sim_hard / twin: events kept per candidate
    eps: float = 1e-6  # linear-attention denominator guard
    cat_slots: int = 128  # ifa: exact-category slots per head (0 = off); see linear_attention
    cat_slot_init: float = 8.0  # ifa: initial log weight of a category match
    exp_key_cap: float = 30.0  # ifa exp map: key log-features soft-capped to +-cap (float32 range)

    def __post_init__(self) -> None:
        if self.model not in MODEL_TYPES:
            raise ValueError(f"model must be one of {MODEL_TYPES}, got {self.model!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        self.decay_per_day = tuple(float(x) for x in self.decay_per_day)
        self.mlp_hidden = tuple(int(x) for x in self.mlp_hidden)
        if len(self.decay_per_day) != self.heads:
            raise ValueError(f"decay_per_day needs {self.heads} values (one per head)")
        if any(x < 0 for x in self.decay_per_day):
            raise ValueError("decay rates must be >= 0")

    @property
    def key_width(self) -> int:
        """Query/key width per head before the feature map."""
        return self.d_key or self.d_head

    @property
    def d_phi(self) -> int:
        """Feature-map output size F per head."""
        d = self.key_width
        learned = {
            "elu": d,
            "exp": d,
            "hedgehog": 2 * d,
            "taylor": 1 + d + d * d,
        }[self.feature_map]
        return learned + self.cat_slots

    @property
    def decay_per_second(self) -> np.ndarray:
        return np.asarray(self.decay_per_day, dtype=np.float64) / SECONDS_PER_DAY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_config(**overrides: Any) -> ModelConfig:
    """A config with overrides; heads and decay are kept consistent."""
    cfg = dict(field_defaults())
    cfg.update(overrides)
    if "heads" in overrides and "decay_per_day" not in overrides:
        cfg["decay_per_day"] = (0.0,) * int(overrides["heads"])
    return ModelConfig(**cfg)


def field_defaults() -> dict[str, Any]:
    return {f.name: getattr(ModelConfig(), f.name) for f in fields(ModelConfig)}


__all__ = ["FEATURE_MAPS", "MODEL_TYPES", "ModelConfig", "default_config"]
