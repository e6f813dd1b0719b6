"""Softmax target attention (candidate queries over event keys), used by the baselines.

Two shapes of key set: `shared` (one key set per request, e.g. the last L events) and
`per_candidate` (each candidate has its own K keys, e.g. same-category events). Masked
keys get a finite -1e9 score, and a query whose keys are all masked reads zeros.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig

MASKED_SCORE = -1.0e9


class TargetAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.d_head, self.d_key = cfg.heads, cfg.d_head, cfg.key_width
        self.q_proj = nn.Linear(cfg.d_model, cfg.heads * self.d_key)
        self.k_proj = nn.Linear(cfg.d_model, cfg.heads * self.d_key)
        self.v_proj = nn.Linear(cfg.d_model, cfg.heads * cfg.d_head)

    def keys_values(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Events (N, C) -> keys (N, H, d), values (N, H, D)."""
        n = e.shape[0]
        k = self.k_proj(e).view(n, self.heads, self.d_key)  # (N, H, d)
        v = self.v_proj(e).view(n, self.heads, self.d_head)  # (N, H, D)
        return k, v

    def queries(self, c: torch.Tensor) -> torch.Tensor:
        """Candidates (B, M, C) -> queries (B, M, H, d), pre-scaled by 1/sqrt(d)."""
        b, m = c.shape[0], c.shape[1]
        q = self.q_proj(c).view(b, m, self.heads, self.d_key)  # (B, M, H, d)
        return q / math.sqrt(self.d_key)

    def shared(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q (B,M,H,d), keys k (B,L,H,d), v (B,L,H,D), mask (B,L) -> (B,M,H,D)."""
        att = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))  # (B, H, M, L)
        att = att.masked_fill(~mask[:, None, None, :], MASKED_SCORE)
        p = torch.softmax(att, dim=-1) * mask[:, None, None, :]  # all-masked rows read 0
        return torch.matmul(p, v.transpose(1, 2)).transpose(1, 2)  # (B, H, M, D) -> (B, M, H, D)

    def per_candidate(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q (B,M,H,d), keys k (B,M,K,H,d), v (B,M,K,H,D), mask (B,M,K) -> (B,M,H,D)."""
        att = torch.matmul(q.unsqueeze(-2), k.permute(0, 1, 3, 4, 2))  # (B, M, H, 1, K)
        keep = mask[:, :, None, None, :]  # (B, M, 1, 1, K)
        att = att.masked_fill(~keep, MASKED_SCORE)
        p = torch.softmax(att, dim=-1) * keep
        return torch.matmul(p, v.transpose(2, 3)).squeeze(-2)  # (B,M,H,1,D) -> (B,M,H,D)
