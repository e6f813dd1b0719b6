"""IFA: set-aware scoring of all candidates against the whole history via linear attention.

The sequence side collapses into a per-user state (S, z, m, t_ref) that does not depend
on the candidates: `build_state` on a chunk of events, `ifa_common.state.fold_arrays`
to merge chunks, `score` to read it out for a batch of candidate sets. `forward` on a
UserBatch computes exactly that composition for every request prefix: one state per
segment between consecutive prefixes, folded cumulatively with the same fold that
serving uses.
"""

from __future__ import annotations

import torch
from torch import nn

from ifa_common.state import fold_arrays
from model_export.batch import UserBatch

from .base import RankModel
from .config import ModelConfig
from .linear_attention import LinearCrossAttention


class IFAModel(RankModel):
    def __init__(self, cfg: ModelConfig) -> None:
        # mass features: the log attention mass of every head, plus log1p(n) so the head
        # can turn shares into counts (a lifelong count is an intensity, not a share)
        super().__init__(cfg, mass_dim=cfg.heads + 1 if cfg.use_mass else 0)
        self.attn = LinearCrossAttention(cfg)
        self.readout = nn.Linear(cfg.heads * cfg.d_head, cfg.d_model)

    @property
    def decay(self) -> torch.Tensor:
        """(H,) float32 decay rate per second of each head."""
        return self.attn.decay

    def build_state(
        self, item: torch.Tensor, cat: torch.Tensor, action: torch.Tensor, ts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk of events, (N,) long each, N >= 0 -> (S (H,F,D), z (H,F), m (H,), t_ref ())."""
        return self.attn.build_state(self.embed.events(item, cat, action), cat, ts)

    def score(
        self,
        S: torch.Tensor,
        z: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        cand_item: torch.Tensor,
        cand_cat: torch.Tensor,
        cand_mask: torch.Tensor,
    ) -> torch.Tensor:
        """States S (B,H,F,D), z (B,H,F), m (B,H), n (B,) and candidates (B, M) -> logits (B, M)."""
        c = self.embed.candidates(cand_item, cand_cat)  # (B, M, C)
        o, mass = self.attn.read(S, z, m, n, c, cand_cat)  # (B, M, H, D), (B, M, H)
        r = self.readout(o.flatten(2))  # (B, M, H*D) -> (B, M, C)
        if not self.cfg.use_mass:
            return self.head(c, r, cand_mask, None)
        log_n = torch.log1p(n.to(mass.dtype)).view(-1, 1, 1).expand(-1, mass.shape[1], 1)
        return self.head(c, r, cand_mask, torch.cat([mass, log_n], dim=-1))  # (B, M, H+1)

    def prefix_states(
        self, batch: UserBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The state of every request's history prefix: S (R,H,F,D), z (R,H,F), m (R,H), t (R,)."""
        e = self.embed.events(batch.ev_item, batch.ev_cat, batch.ev_action)  # (N, C)
        kf, v = self.attn.keys_values(e)  # (N, H, d), (N, H, D)
        ts = batch.ev_ts
        decay = self.attn.decay.double()  # folds in float64, like serving
        empty = self.attn.state_from(kf[:0], v[:0], ts[:0], batch.ev_cat[:0])
        S, z, m, t = empty
        states = []
        start = 0
        for end in batch.req_prefix.tolist():
            if end > start:  # segment [start, end): its own state, then the exact fold
                seg = self.attn.state_from(
                    kf[start:end], v[start:end], ts[start:end], batch.ev_cat[start:end]
                )
                S, z, m, t = fold_arrays(S, z, m, t, *seg, decay)
                S, z = S.float(), z.float()
                start = end
            states.append((S, z, m, t))
        if not states:
            return (
                empty[0][None][:0],
                empty[1][None][:0],
                empty[2][None][:0],
                empty[3][None][:0],
            )
        return (
            torch.stack([s[0] for s in states]),
            torch.stack([s[1] for s in states]),
            torch.stack([s[2] for s in states]),
            torch.stack([s[3] for s in states]),
        )

    def forward(self, batch: UserBatch) -> torch.Tensor:
        S, z, m, _ = self.prefix_states(batch)
        return self.score(
            S, z, m, batch.req_prefix, batch.cand_item, batch.cand_cat, batch.cand_mask
        )
