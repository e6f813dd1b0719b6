"""Softmax target attention (candidate queries over event keys), used by the baselines.

Two shapes of key set: `shared` (one key set per request, e.g. the last L events) and
`per_candidate` (each candidate has its own K keys, e.g. same-category events). Masked
keys get a finite -1e9 score, and a query whose keys are all masked reads zeros.

Both also return the log attention mass, logsumexp of the scores: softmax normalises the
readout to an average, which hides how *much* of the history matches a candidate (the
intensity the DIN paper keeps by not normalising). The head may take it as a feature,
exactly as IFA's `use_mass` feeds log(phi(q).z).
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
        # keys start as the queries' projection, so q.k starts as a positive semi-definite
        # form: an event of the candidate's own category (or item) scores high from the
        # first step instead of at random (separate random inits must first align)
        with torch.no_grad():
            self.k_proj.weight.copy_(self.q_proj.weight)
            self.k_proj.bias.copy_(self.q_proj.bias)
        # per-head log temperature: sharpness grows by Adam steps on one scalar per head,
        # not by the slow growth of every projection weight (softmax over thousands of
        # events needs score margins of ~log N to single out a few)
        self.log_temp = nn.Parameter(torch.full((cfg.heads,), math.log(cfg.attn_temp_init)))
        # IFA's exact-category kernel term (linear_attention.category_slots), unhashed:
        # q.k gains cat_strength_h when candidate and event share a known category. With
        # it, softmax over the same key features is IFA's fidelity reference.
        self.cat_strength = (
            nn.Parameter(torch.full((cfg.heads,), cfg.cat_slot_init)) if cfg.cat_slots else None
        )

    def category_bias(self, q_cat: torch.Tensor, k_cat: torch.Tensor) -> torch.Tensor | None:
        """Category buckets q_cat (..., 1) and k_cat (..., K) broadcast to (..., K)
        -> score bias (..., H, K) (0 or cat_strength_h), or None without the term."""
        if self.cat_strength is None:
            return None
        match = ((q_cat == k_cat) & (k_cat > 0)).unsqueeze(-2)  # (..., 1, K)
        strength = self.cat_strength.view(-1, 1)  # (H, 1)
        return match.to(strength.dtype) * strength  # (..., H, K)

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
        return q * (self.log_temp.exp().view(self.heads, 1) / math.sqrt(self.d_key))

    def shared(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B,M,H,d), keys k (B,L,H,d), v (B,L,H,D), mask (B,L), bias (B,M,H,L) or None
        -> readout (B,M,H,D), log mass (B,M,H)."""
        att = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))  # (B, H, M, L)
        if bias is not None:
            att = att + bias.transpose(1, 2)  # (B, H, M, L)
        o, lse = softmax_read(att, v.transpose(1, 2), mask[:, None, None, :])  # (B,H,M,D), (B,H,M)
        return o.transpose(1, 2), lse.transpose(1, 2)  # (B, M, H, D), (B, M, H)

    def per_candidate(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B,M,H,d), keys k (B,M,K,H,d), v (B,M,K,H,D), mask (B,M,K), bias (B,M,H,K)
        or None -> readout (B,M,H,D), log mass (B,M,H)."""
        att = torch.matmul(q.unsqueeze(-2), k.permute(0, 1, 3, 4, 2))  # (B, M, H, 1, K)
        if bias is not None:
            att = att + bias.unsqueeze(-2)  # (B, M, H, 1, K)
        keep = mask[:, :, None, None, :]  # (B, M, 1, 1, K)
        o, lse = softmax_read(att, v.transpose(2, 3), keep)  # (B, M, H, 1, D), (B, M, H, 1)
        return o.squeeze(-2), lse.squeeze(-1)  # (B, M, H, D), (B, M, H)


def softmax_read(
    att: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores att (..., Q, K), values v (..., K, D), keep (bool, broadcast to att) or None
    -> softmax readout (..., Q, D) and log mass logsumexp (..., Q). Masked keys get a
    finite MASKED_SCORE, and a query whose keys are all masked reads zeros."""
    if keep is not None:
        att = att.masked_fill(~keep, MASKED_SCORE)
    p = torch.softmax(att, dim=-1)
    if keep is not None:
        p = p * keep  # all-masked rows read 0
    return torch.matmul(p, v), torch.logsumexp(att, dim=-1)
