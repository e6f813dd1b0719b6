"""Baselines with IFA's embeddings, head and set layer: only the sequence module differs.

| model          | each request's candidates attend over                         |
|----------------|---------------------------------------------------------------|
| `din`          | the last `cfg.last_n` events of the prefix (softmax)          |
| `sim_hard`     | per candidate, the `cfg.top_k` latest prefix events of its category |
| `twin`         | per candidate, the `cfg.top_k` prefix events with the highest  |
|                | attention score (same projections), softmax over those         |
| `softmax_full` | every prefix event (the fidelity reference)                   |
| `mean_pool`    | nothing: the mean prefix event vector                         |

They only implement `forward(batch)`. Work over all prefix events is done in chunks of
requests (and recomputed in backward) so that N = 100,000 histories fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model_export.batch import UserBatch

from .base import RankModel
from .config import ModelConfig
from .linear_attention import MASS_CLAMP
from .target_attention import TargetAttention, softmax_read

CHUNK_ELEMENTS = 1 << 22  # bound on the (requests x candidates x keys x heads) work per chunk


def _request_chunks(n_requests: int, per_request: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, per_request))
    return [(a, min(a + step, n_requests)) for a in range(0, n_requests, step)]


def _maybe_checkpoint(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        out = checkpoint(fn, *args, use_reentrant=False)
        assert isinstance(out, torch.Tensor)
        return out
    return fn(*args)


class AttentionBaseline(RankModel):
    """Softmax target attention over some key set of the prefix; subclasses pick the set."""

    def __init__(self, cfg: ModelConfig) -> None:
        # the same mass features as IFA's (ifa.py): log mass per head, then log1p(n)
        super().__init__(cfg, mass_dim=cfg.heads + 1 if cfg.use_mass else 0)
        self.attn = TargetAttention(cfg)
        self.readout = nn.Linear(cfg.heads * cfg.d_head, cfg.d_model)

    def forward(self, batch: UserBatch) -> torch.Tensor:
        c = self.embed.candidates(batch.cand_item, batch.cand_cat)  # (R, M, C)
        q = self.attn.queries(c)  # (R, M, H, d)
        if batch.num_events == 0:  # no history, nothing to read
            o = q.new_zeros(*q.shape[:3], self.cfg.d_head)  # (R, M, H, D)
            lse = q.new_full(q.shape[:3], -MASS_CLAMP)  # (R, M, H)
        else:
            e = self.embed.events(batch.ev_item, batch.ev_cat, batch.ev_action)  # (N, C)
            k, v = self.attn.keys_values(e)  # (N, H, d), (N, H, D)
            o, lse = self.attend(batch, q, k, v)
        r = self.readout(o.flatten(2))  # (R, M, H*D) -> (R, M, C)
        if not self.cfg.use_mass:
            return self.head(c, r, batch.cand_mask)
        log_n = torch.log1p(batch.req_prefix.to(lse.dtype)).view(-1, 1, 1)  # (R, 1, 1)
        mass = (lse - log_n).clamp(-MASS_CLAMP, MASS_CLAMP)  # (R, M, H), as IFA's read()
        parts = [mass, log_n.expand(-1, mass.shape[1], 1)]  # (R, M, H), (R, M, 1)
        return self.head(c, r, batch.cand_mask, torch.cat(parts, dim=-1))

    def attend(
        self, batch: UserBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (R,M,H,d), k (N,H,d), v (N,H,D) with N >= 1
        -> readout (R,M,H,D), log attention mass (R,M,H)."""
        raise NotImplementedError

    def _gathered(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        idx: torch.Tensor,
        valid: torch.Tensor,
        batch: UserBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-candidate key sets by event index idx (R,M,K), valid (R,M,K)
        -> readout (R,M,H,D), log mass (R,M,H)."""
        r, m, kk = idx.shape
        out, lse = [], []
        for a, b in _request_chunks(r, m * kk * k.shape[1] * k.shape[2]):
            flat = idx[a:b].reshape(-1)  # (Rc*M*K,)
            kc = k[flat].view(b - a, m, kk, k.shape[1], k.shape[2])  # (Rc, M, K, H, d)
            vc = v[flat].view(b - a, m, kk, v.shape[1], v.shape[2])  # (Rc, M, K, H, D)
            k_cat = batch.ev_cat[flat].view(b - a, m, kk)  # (Rc, M, K)
            bias = self.attn.category_bias(batch.cand_cat[a:b].unsqueeze(-1), k_cat)
            o, mass = self.attn.per_candidate(q[a:b], kc, vc, valid[a:b], bias)
            out.append(o)
            lse.append(mass)
        return torch.cat(out, dim=0), torch.cat(lse, dim=0)


class DIN(AttentionBaseline):
    def attend(
        self, batch: UserBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, window = k.shape[0], self.cfg.last_n
        idx = (
            batch.req_prefix.unsqueeze(1) - window + torch.arange(window, device=k.device)
        )  # (R, L)
        valid = idx >= 0
        idx = idx.clamp(0, n - 1)
        r = idx.shape[0]
        kw = k[idx.reshape(-1)].view(r, window, k.shape[1], k.shape[2])  # (R, L, H, d)
        vw = v[idx.reshape(-1)].view(r, window, v.shape[1], v.shape[2])  # (R, L, H, D)
        k_cat = batch.ev_cat[idx].unsqueeze(1)  # (R, 1, L)
        bias = self.attn.category_bias(batch.cand_cat.unsqueeze(-1), k_cat)  # (R, M, H, L)
        return self.attn.shared(q, kw, vw, valid, bias)


class SimHard(AttentionBaseline):
    def attend(
        self, batch: UserBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, top = k.shape[0], self.cfg.top_k
        pos_in_seq = torch.arange(n, device=k.device)
        key = batch.ev_cat * n + pos_in_seq  # (N,) sorts by (category, position)
        sorted_key, order = torch.sort(key)
        cand = batch.cand_cat * n  # (R, M)
        lo = torch.searchsorted(sorted_key, cand)  # first event of the category
        hi = torch.searchsorted(sorted_key, cand + batch.req_prefix.unsqueeze(1))  # end of prefix
        pos = hi.unsqueeze(-1) - top + torch.arange(top, device=k.device)  # (R, M, K) latest K
        valid = pos >= lo.unsqueeze(-1)
        idx = order[pos.clamp(0, n - 1)]  # (R, M, K) event index
        return self._gathered(q, k, v, idx, valid, batch)


class Twin(AttentionBaseline):
    def attend(
        self, batch: UserBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r, m, h = q.shape[0], q.shape[1], q.shape[2]
        top = self.cfg.top_k
        idx = torch.zeros(r, m, top, dtype=torch.long, device=k.device)
        valid = torch.zeros(r, m, top, dtype=torch.bool, device=k.device)
        with torch.no_grad():  # selection by the attention score itself (TWIN's consistent GSU)
            k_flat = k.flatten(1)  # (N, H*d)
            for i, p in enumerate(batch.req_prefix.tolist()):
                if p == 0:
                    continue
                # mean over heads of q_h.k_h = (q . k over all heads) / H
                att = torch.matmul(q[i].flatten(1), k_flat[:p].T) / h  # (M, H*d) @ (H*d, p)
                bias = self.attn.category_bias(batch.cand_cat[i].unsqueeze(-1), batch.ev_cat[:p])
                if bias is not None:
                    att = att + bias.mean(dim=-2)  # (M, H, p) -> (M, p), as the scores
                kk = min(top, p)
                idx[i, :, :kk] = torch.topk(att, kk, dim=-1).indices  # (M, kk)
                valid[i, :, :kk] = True
        return self._gathered(q, k, v, idx, valid, batch)


class SoftmaxFull(AttentionBaseline):
    """One request at a time over exactly its prefix (no mask), recomputed in backward."""

    def attend(
        self, batch: UserBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for i, p in enumerate(batch.req_prefix.tolist()):
            if p == 0:  # readout 0 (M, H, D), log mass at the clamp (M, H, 1)
                zeros = q.new_zeros(*q.shape[1:3], v.shape[-1])
                out.append(torch.cat([zeros, zeros[..., :1] - MASS_CLAMP], dim=-1))
            else:
                bias = self.attn.category_bias(batch.cand_cat[i].unsqueeze(-1), batch.ev_cat[:p])
                if bias is None:
                    bias = q.new_zeros(())  # broadcasts: no category term
                out.append(_maybe_checkpoint(self._attend_one, q[i], k[:p], v[:p], bias))
        both = torch.stack(out)  # (R, M, H, D + 1)
        return both[..., :-1], both[..., -1]  # (R, M, H, D), (R, M, H)

    @staticmethod
    def _attend_one(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """q (M, H, d), k (p, H, d), v (p, H, D), bias (M, H, p) or () -> readout and
        log mass (M, H, D + 1)."""
        att = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0))  # (H, M, d) @ (H, d, p)
        if bias.dim():
            att = att + bias.transpose(0, 1)  # (H, M, p)
        o, lse = softmax_read(att, v.transpose(0, 1))  # (H, M, D), (H, M)
        return torch.cat([o, lse.unsqueeze(-1)], dim=-1).transpose(0, 1)  # (M, H, D+1)


class MeanPool(RankModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.readout = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, batch: UserBatch) -> torch.Tensor:
        c = self.embed.candidates(batch.cand_item, batch.cand_cat)  # (R, M, C)
        e = self.embed.events(batch.ev_item, batch.ev_cat, batch.ev_action)  # (N, C)
        csum = torch.cat(
            [e.new_zeros(1, e.shape[1]).double(), e.double().cumsum(dim=0)]
        )  # (N+1, C)
        count = batch.req_prefix.clamp_min(1).unsqueeze(1).to(torch.float64)  # (R, 1)
        mean = (csum[batch.req_prefix] / count).to(e.dtype)  # (R, C); empty prefix -> 0
        r = self.readout(mean).unsqueeze(1).expand_as(c)  # (R, 1, C) -> (R, M, C)
        return self.head(c, r, batch.cand_mask)


BASELINES: dict[str, Callable[[ModelConfig], RankModel]] = {
    "din": DIN,
    "sim_hard": SimHard,
    "twin": Twin,
    "softmax_full": SoftmaxFull,
    "mean_pool": MeanPool,
}
