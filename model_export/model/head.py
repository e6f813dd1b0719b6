"""Candidate tokens and the scoring head shared by IFA and every baseline.

token_j = Linear([c_j, r_j, c_j * r_j, (mass_j)]) with c the candidate embedding and r
the sequence module's readout for it; an optional set layer relates the tokens; an MLP
gives one logit per candidate.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .set_encoder import SetEncoder

PADDING_LOGIT = -1.0e4  # logit reported for padding candidates (mask False)


class ScoreHead(nn.Module):
    def __init__(self, cfg: ModelConfig, mass_dim: int = 0) -> None:
        super().__init__()
        c = cfg.d_model
        self.mass_dim = mass_dim
        self.token = nn.Sequential(nn.Linear(3 * c + mass_dim, c), nn.LayerNorm(c))
        self.set_encoder = SetEncoder(cfg) if cfg.set_layer else None
        layers: list[nn.Module] = []
        width = c
        for hidden in cfg.mlp_hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self,
        c: torch.Tensor,
        r: torch.Tensor,
        mask: torch.Tensor,
        mass: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """c, r (B, M, C), mask (B, M) bool, mass (B, M, H) or None -> logits (B, M)."""
        parts = [c, r, c * r]
        if self.mass_dim:
            if mass is None:
                raise ValueError("this head was built with a mass feature")
            parts.append(mass)
        x = self.token(torch.cat(parts, dim=-1))  # (B, M, C)
        if self.set_encoder is not None:
            x = self.set_encoder(x, mask)
        logits = self.mlp(x).squeeze(-1)  # (B, M)
        return torch.where(mask, logits, torch.full_like(logits, PADDING_LOGIT))
