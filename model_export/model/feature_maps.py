"""Positive feature maps phi for linear attention, one small module per map.

Every map takes per-head projections x (..., H, d) and returns (..., H, F) with
F = ModelConfig.d_phi. `ExpMap` is the one map that works in the log domain: it
returns log phi (= x itself) and the caller moves its shift into the state's
log-scale m (keys) or subtracts a per-(token, head) max (queries), so exp() never
overflows however large the keys grow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class FeatureMap(nn.Module):
    log_domain: bool = False  # True: forward returns log phi, the caller exponentiates


class EluMap(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al., "Transformers are RNNs"); F = d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0


class ExpMap(FeatureMap):
    """Elementwise exp(x); forward gives log phi = x, shifted by the caller; F = d.

    With `cap`, log phi = cap * tanh(x / cap) (keys): the features of one head then span
    at most 2 * cap in log space, which a per-head log-scale m keeps representable in
    float32 (e^-2cap >> float32's smallest normal for cap = 30).
    """

    log_domain = True

    def __init__(self, cap: float | None = None) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cap is None:
            return x
        return self.cap * torch.tanh(x / self.cap)


class HedgehogMap(FeatureMap):
    """softmax([Wx, -Wx]) with a learnable per-head W (Zhang et al., Hedgehog); F = 2d."""

    def __init__(self, heads: int, d_head: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d_head).repeat(heads, 1, 1))  # (H, d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x.unsqueeze(-2), self.weight).squeeze(-2)  # (..., H, 1, d) -> (..., H, d)
        return torch.softmax(torch.cat([y, -y], dim=-1), dim=-1)  # (..., H, 2d)


class TaylorMap(FeatureMap):
    """Second-order Taylor expansion of exp(q.k / sqrt(d)) (Based); F = 1 + d + d^2.

    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d): always > 0.
    """

    def __init__(self, d_head: int) -> None:
        super().__init__()
        self.scale = d_head**-0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)  # (..., H, d*d)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)  # (..., H, 1+d+d*d)


def make_feature_map(cfg: ModelConfig, keys: bool) -> FeatureMap:
    """phi for the key side (keys=True) or the query side of cfg.feature_map."""
    if cfg.feature_map == "elu":
        return EluMap()
    if cfg.feature_map == "exp":
        return ExpMap(cfg.exp_key_cap if keys else None)
    if cfg.feature_map == "hedgehog":
        return HedgehogMap(cfg.heads, cfg.key_width)
    if cfg.feature_map == "taylor":
        return TaylorMap(cfg.key_width)
    raise ValueError(f"unknown feature map {cfg.feature_map!r}")
