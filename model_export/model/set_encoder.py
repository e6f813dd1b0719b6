"""One pre-LN transformer block over the M candidate tokens of a set (set-aware scoring).

Plain matmul/softmax with a key padding mask, so padding candidates never change the
real ones and ONNX export keeps B and M dynamic.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig

MASKED_SCORE = -1.0e9  # finite: a fully padded row stays NaN-free


class SetSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.set_heads:
            raise ValueError("d_model must be divisible by set_heads")
        self.heads, self.d = cfg.set_heads, cfg.d_model // cfg.set_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, M, C), mask (B, M) bool (True = real candidate) -> (B, M, C)."""
        b, m, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # 3 x (B, M, C)
        q = q.view(b, m, self.heads, self.d).transpose(1, 2)  # (B, h, M, d)
        k = k.view(b, m, self.heads, self.d).transpose(1, 2)  # (B, h, M, d)
        v = v.view(b, m, self.heads, self.d).transpose(1, 2)  # (B, h, M, d)
        att = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d)  # (B, h, M, M)
        att = att.masked_fill(~mask.view(b, 1, 1, m), MASKED_SCORE)
        att = self.drop(torch.softmax(att, dim=-1))
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, m, c)  # (B, M, h, d) -> (B, M, C)
        return self.drop(self.proj(y))


class SetEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SetSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 2 * cfg.d_model),
            nn.GELU(),
            nn.Linear(2 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, M, C), mask (B, M) -> (B, M, C)."""
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))
