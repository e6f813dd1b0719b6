"""Multi-head linear cross attention between a candidate set and a user's events.

    K_i = phi(W_k e_i),  V_i = W_v e_i,  Q_j = phi(W_q c_j)
    S_h = sum_i w_ih K_ih V_ihᵀ,  z_h = sum_i w_ih K_ih,  o_jh = Q_jhᵀ S_h / (Q_jhᵀ z_h + eps)

with w_ih = exp(-lambda_h (t_ref - t_i)). The state is kept relative to a per-head
log-scale m_h (true sums = exp(m_h) * S_h; see ifa_common/state.py), which absorbs the
decay of the newest event and, for the exp map, the largest log-feature, so every
stored weight is <= 1 and the state stays finite in float32 for any history length and
time gap. Written with matmul / reshape / amax only, so ONNX export keeps N, M, B dynamic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ifa_common.state import EMPTY_LOG_SCALE

from .config import ModelConfig
from .feature_maps import make_feature_map

NO_SLOT = -1.0e4  # log phi of the category slots an event does not occupy (exp() = 0)
SLOT_STRIDES = (1, 7, 13, 31, 37, 61, 73, 97)  # per-head category hashes (count-min style)
MASS_CLAMP = 20.0  # |log attention mass| fed to the head is clamped to this
TINY = 1.0e-30  # floor of z in the exp map's query shift (keeps exp(q - shift) < e^70)


class LinearCrossAttention(nn.Module):
    decay: torch.Tensor  # (H,) float32 buffer, decay rate per second of each head

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.d_head, self.eps = cfg.heads, cfg.d_head, cfg.eps
        self.d_key = cfg.key_width
        self.k_proj = nn.Linear(cfg.d_model, cfg.heads * self.d_key)
        self.v_proj = nn.Linear(cfg.d_model, cfg.heads * cfg.d_head)
        self.q_proj = nn.Linear(cfg.d_model, cfg.heads * self.d_key)
        self.phi_k = make_feature_map(cfg, keys=True)  # keys and queries: own (hedgehog) maps
        self.phi_q = make_feature_map(cfg, keys=False)
        decay = torch.as_tensor(cfg.decay_per_second, dtype=torch.float32)
        self.register_buffer("decay", decay)  # (H,) per second
        self.cat_slots = cfg.cat_slots
        if cfg.cat_slots:
            strides = [SLOT_STRIDES[h % len(SLOT_STRIDES)] for h in range(cfg.heads)]
            self.register_buffer("slot_stride", torch.tensor(strides, dtype=torch.long))
            self.register_buffer("slot_ids", torch.arange(cfg.cat_slots, dtype=torch.long))
            # log weight of a category match; starts far above the learned map's ~d_key so
            # a category's events dominate its readout from the first step (at 0 the match
            # drowns in the learned part, and Adam moves it by only ~lr per step)
            self.slot_strength = nn.Parameter(torch.full((cfg.heads,), cfg.cat_slot_init))  # (H,)

    def category_slots(self, cat: torch.Tensor, keys: bool) -> torch.Tensor:
        """Category buckets (..., ) -> slot features (..., H, cat_slots).

        An exact-match kernel on the category side feature, hashed per head into
        `cat_slots` slots (different strides per head, so collisions differ between
        heads, as in a count-min sketch): phi(q).phi(k) gains slot_strength_h when the
        candidate's and the event's categories share the head's slot. Sharp where a
        smooth learned map over d_key dims cannot be (what lifts linear attention to
        per-category counts); still one feature vector per event, so the state stays
        additive. Unknown categories (bucket 0) occupy no slot.

        This dense form is the kernel's definition, which the tests hold the model to:
        `state_from` sums the keys' slots sparsely and `read` gathers the one occupied
        slot of each candidate, neither ever builds these (..., H, cat_slots) tensors.
        """
        slot = self.slot_index(cat)  # (..., H)
        hit = (slot.unsqueeze(-1) == self.slot_ids) & (cat > 0)[..., None, None]  # (..., H, B)
        strength = self.slot_strength.view(-1, 1)  # (H, 1)
        if self.phi_k.log_domain:  # log phi of an occupied slot: the strength on keys, 0 on queries
            on = strength if keys else torch.zeros_like(strength)
            return torch.where(hit, on, torch.full_like(on, NO_SLOT))
        on = F.softplus(strength) if keys else torch.ones_like(strength)
        return hit.to(on.dtype) * on  # (..., H, B)

    def slot_index(self, cat: torch.Tensor) -> torch.Tensor:
        """Category buckets (...,) -> each head's slot (..., H) in [0, cat_slots)."""
        stride: torch.Tensor = self.slot_stride  # type: ignore[assignment]  # buffer
        return (cat.unsqueeze(-1) * stride) % self.cat_slots  # (..., H)

    def keys_values(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Events (N, C) -> learned key features (N, H, d) (log phi for the exp map) and
        values (N, H, D). The category slots are added by `state_from` (sparse)."""
        n = e.shape[0]
        k = self.k_proj(e).view(n, self.heads, self.d_key)  # (N, H, d)
        v = self.v_proj(e).view(n, self.heads, self.d_head)  # (N, H, D)
        return self.phi_k(k), v

    def state_from(
        self, kf: torch.Tensor, v: torch.Tensor, ts: torch.Tensor, cat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Learned key features (N, H, d), values (N, H, D), ts (N,) long, category
        buckets (N,) -> (S (H,F,D), z (H,F), m (H,), t_ref ()).

        F = d learned features, then `cat_slots` slot features. The slots are the one-hot
        features of `category_slots(cat, keys=True)`, summed sparsely: one weight per
        (event, head) scattered into its slot (index_add), never an (N, H, cat_slots)
        tensor, so a state costs O(N·H·(d+1)·D) whatever the number of slots.
        N = 0 gives S = z = 0, m = EMPTY_LOG_SCALE, t_ref = 0 without any branch.
        """
        h, b, n = self.heads, self.cat_slots, kf.shape[0]
        t_ref = torch.cat([ts, ts.new_zeros(1)]).amax(dim=0)  # () long; 0 when empty
        gap = (t_ref - ts).to(torch.float32)  # (N,) int64 difference first, then float
        logw = -gap.unsqueeze(1) * self.decay  # (N, H)
        empty = torch.full((h, 1), EMPTY_LOG_SCALE, dtype=logw.dtype, device=logw.device)
        known = (cat > 0).unsqueeze(1)  # (N, 1): unknown categories occupy no slot
        ws = logw  # (N, H) slot weight of each event; replaced below when there are slots
        if self.phi_k.log_domain:
            lw = logw.unsqueeze(2) + kf  # (N, H, d) log weight of each learned feature
            parts = [lw.transpose(0, 1).flatten(1)]  # (H, N*d)
            if b:
                strength = self.slot_strength.view(1, h)  # (1, H) log phi of an occupied slot
                lws = torch.where(known, logw + strength, torch.full_like(logw, NO_SLOT))
                parts.append(lws.transpose(0, 1))  # (H, N)
            m = torch.cat([*parts, empty.to(lw.dtype)], dim=1).detach().amax(dim=1)  # (H,)
            kw = torch.exp(lw - m.view(1, h, 1))  # (N, H, d), every entry <= 1
            if b:
                ws = torch.exp(lws - m.view(1, h))  # (N, H), 0 where no slot
        else:
            m = torch.cat([logw.transpose(0, 1).detach(), empty], dim=1).amax(dim=1)  # (H,)
            base = torch.exp(logw - m.view(1, h))  # (N, H)
            kw = kf * base.unsqueeze(2)  # (N, H, d)
            if b:
                on = F.softplus(self.slot_strength).view(1, h)  # (1, H)
                ws = torch.where(known, on * base, torch.zeros_like(base))  # (N, H)
        S = torch.matmul(
            kw.permute(1, 2, 0), v.transpose(0, 1)
        )  # (H, d, N) @ (H, N, D) -> (H, d, D)
        z = kw.sum(dim=0)  # (H, d)
        if b:
            heads = torch.arange(h, device=cat.device).view(1, h)  # (1, H)
            flat = (heads * b + self.slot_index(cat)).reshape(n * h)  # (N*H,) row of (H*B)
            vals = (ws.unsqueeze(2) * v).reshape(n * h, self.d_head)  # (N*H, D)
            S_s = torch.zeros(h * b, self.d_head, dtype=v.dtype, device=v.device)
            S_s = S_s.index_add(0, flat, vals).view(h, b, self.d_head)  # (H, B, D)
            z_s = torch.zeros(h * b, dtype=ws.dtype, device=ws.device)
            z_s = z_s.index_add(0, flat, ws.reshape(n * h)).view(h, b)  # (H, B)
            S = torch.cat([S, S_s], dim=1)  # (H, F, D)
            z = torch.cat([z, z_s], dim=1)  # (H, F)
        return S, z, m, t_ref

    def build_state(
        self, e: torch.Tensor, cat: torch.Tensor, ts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Event vectors (N, C), category buckets (N,), ts (N,) long
        -> (S (H,F,D), z (H,F), m (H,), t_ref () long)."""
        kf, v = self.keys_values(e)
        return self.state_from(kf, v, ts, cat)

    def read(
        self,
        S: torch.Tensor,
        z: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        c: torch.Tensor,
        cand_cat: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States S (B,H,F,D), z (B,H,F), m (B,H), n (B,) and candidate tokens c (B,M,C)
        -> readout o (B,M,H,D) and log attention mass (B,M,H).

        The mass is log(true phi(q).z) - log1p(n): how much of the history the candidate
        matches, which the ratio o alone cannot show.
        """
        b, mc = c.shape[0], c.shape[1]
        q = self.q_proj(c).view(b, mc, self.heads, self.d_key)  # (B, M, H, d)
        qf = self.phi_q(q).transpose(1, 2)  # (B, H, M, F_l) learned features
        f_l = qf.shape[-1]
        S_l, z_l = S[:, :, :f_l], z[:, :, :f_l]  # (B, H, F_l, D), (B, H, F_l)
        if self.cat_slots:
            # A candidate's slot features are one-hot (its category's slot per head), so
            # its slot term is one row of the state: gathered, never an (M, H, slots) read.
            slot = self.slot_index(cand_cat).transpose(1, 2)  # (B, H, M)
            S_hit = torch.gather(
                S[:, :, f_l:], 2, slot.unsqueeze(-1).expand(-1, -1, -1, S.shape[-1])
            )  # (B, H, M, D)
            z_hit = torch.gather(z[:, :, f_l:], 2, slot)  # (B, H, M)
            known = (cand_cat > 0).unsqueeze(1)  # (B, 1, M): unknown categories match nothing
        if self.phi_q.log_domain:
            # shift by the largest term of phi(q).z itself, so the dominant term is exactly 1
            # however far apart q and the state's scale are; it cancels in the ratio.
            log_z = torch.log(z_l.clamp_min(TINY)).unsqueeze(2)  # (B, H, 1, F_l)
            shift = (qf + log_z).amax(dim=-1).detach()  # (B, H, M)
            if self.cat_slots:  # log phi_q of the occupied slot is 0: its term is log z
                log_hit = torch.log(z_hit.clamp_min(TINY))
                shift = torch.maximum(shift, torch.where(known, log_hit, shift).detach())
                w_hit = torch.where(known, torch.exp(-shift), torch.zeros_like(shift))
            qf = torch.exp(qf - shift.unsqueeze(-1))
        else:
            shift = torch.zeros_like(qf[..., 0])  # (B, H, M)
            if self.cat_slots:
                w_hit = known.to(qf.dtype).expand_as(shift)  # phi_q of the occupied slot is 1
        num = torch.matmul(qf, S_l)  # (B, H, M, D)
        den = torch.matmul(qf, z_l.unsqueeze(-1)).squeeze(-1)  # (B, H, M)
        if self.cat_slots:
            num = num + w_hit.unsqueeze(-1) * S_hit
            den = den + w_hit * z_hit
        o = (num / (den.unsqueeze(-1) + self.eps)).transpose(1, 2)  # (B, M, H, D)
        log_den = torch.log(den.clamp_min(TINY)).transpose(1, 2)  # (B, M, H)
        log_n = torch.log1p(n.to(S.dtype)).view(b, 1, 1)  # (B, 1, 1)
        mass = log_den + shift.transpose(1, 2) + m.unsqueeze(1) - log_n  # (B, M, H)
        return o, mass.clamp(-MASS_CLAMP, MASS_CLAMP)
