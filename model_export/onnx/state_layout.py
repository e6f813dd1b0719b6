"""The state graph as it is exported: `IFAModel.build_state`, laid out for a CPU.

Same function as the model's `build_state` (the parity tests hold it to 1e-5), with
the work per event cut to what a 100,000-event cold build cannot avoid:

* one Gather from the item table and one from a precomputed category x action table
  (the sum of the two small tables), instead of three Gathers and two Adds;
* K and V from one GEMM with the two projections stacked;
* the learned part of S and z from one GEMM over all heads, kwᵀ [v | 1], whose
  diagonal blocks are the per-head sums (the off-diagonal blocks are spare FLOPs that
  cost less than transposing (N, H, d) into per-head layout);
* the category slots summed per category bucket first (one ScatterND of N rows), then
  per slot through a constant index (category buckets x heads rows), instead of a
  ScatterND of N x H rows;
* no decay arithmetic when every head is lifelong (decay is part of the artifact).

Only log-domain feature maps (exp, the shipped map) have this layout; `serving_state_graph`
returns None for the others and the exporter uses the plain `build_state` graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ifa_common.state import EMPTY_LOG_SCALE
from model_export.model.ifa import IFAModel
from model_export.model.linear_attention import NO_SLOT

# Largest key cap with a constant log-scale: the weights then span e^-2cap..1, and
# e^-80 is still a normal float32 (the smallest is ~e^-87).
MAX_FIXED_SHIFT_CAP = 40.0


class ServingStateGraph(nn.Module):
    """(item, category, action, ts) bucket indices (N,) -> (S (H,F,D), z (H,F), m (H,), t_ref ())."""

    item_table: torch.Tensor
    cat_action_table: torch.Tensor
    w_k: torch.Tensor
    b_k: torch.Tensor
    w_vz: torch.Tensor
    b_vz: torch.Tensor
    decay: torch.Tensor
    head_eye: torch.Tensor
    slot_strength: torch.Tensor
    slot_of_cat: torch.Tensor
    head_of_cat: torch.Tensor
    m_fixed: torch.Tensor

    def __init__(self, model: IFAModel) -> None:
        super().__init__()
        cfg, attn, emb = model.cfg, model.attn, model.embed
        h, dv = cfg.heads, cfg.d_head
        self.heads, self.d_key, self.d_head = h, attn.d_key, dv
        self.actions, self.cat_buckets = cfg.action_buckets, cfg.category_buckets
        self.slots = cfg.cat_slots
        cap = getattr(attn.phi_k, "cap", None)
        self.cap = float(cap) if cap is not None else None
        self.decaying = bool((attn.decay != 0).any())
        self.fixed_shift = self.cap is not None and self.cap <= MAX_FIXED_SHIFT_CAP
        with torch.no_grad():
            cat_action = emb.category.weight[:, None, :] + emb.action.weight[None, :, :]
            self.register_buffer("item_table", emb.item.weight.detach().clone())
            self.register_buffer("cat_action_table", cat_action.reshape(-1, cfg.d_model).clone())
            # the cap's 1/cap is folded into the key projection: log phi = cap * tanh(k')
            scale = 1.0 / self.cap if self.cap is not None else 1.0
            self.register_buffer("w_k", (attn.k_proj.weight.t() * scale).contiguous())
            self.register_buffer("b_k", attn.k_proj.bias.detach() * scale)
            # V with a constant 1 after each head's D columns: [v_h | 1] for every head
            # straight out of the GEMM, so one sum gives a head's S rows and z together
            w_v = attn.v_proj.weight.t().reshape(cfg.d_model, h, dv)
            w_vz = torch.cat([w_v, torch.zeros(cfg.d_model, h, 1)], dim=2)
            b_vz = torch.cat([attn.v_proj.bias.detach().view(h, dv), torch.ones(h, 1)], dim=1)
            self.register_buffer("w_vz", w_vz.reshape(cfg.d_model, h * (dv + 1)).contiguous())
            self.register_buffer("b_vz", b_vz.reshape(-1).clone())
            self.register_buffer("decay", attn.decay.detach().clone())
            self.register_buffer("head_eye", torch.eye(h).view(h, 1, h, 1))
            if self.slots:
                self.register_buffer("slot_strength", attn.slot_strength.detach().clone())
                # category bucket c, head h -> (slot_h(c), h) of the (slots + 1, H) slot
                # sums; bucket 0 (unknown category) goes to the spare last slot, dropped
                slot = attn.slot_index(torch.arange(cfg.category_buckets))  # (cat_buckets, H)
                slot[0] = self.slots
                self.register_buffer("slot_of_cat", slot.clone())
                heads = torch.arange(h).view(1, h).expand(cfg.category_buckets, h)
                self.register_buffer("head_of_cat", heads.clone())
            if self.fixed_shift:
                bound = torch.full((h,), float(self.cap or 0.0))
                if self.slots:
                    bound = torch.maximum(bound, attn.slot_strength.detach())
                self.register_buffer("m_fixed", bound)

    def forward(
        self, item: torch.Tensor, category: torch.Tensor, action: torch.Tensor, ts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h, dk, dv, n = self.heads, self.d_key, self.d_head, item.shape[0]
        e = F.embedding(item, self.item_table) + F.embedding(
            category * self.actions + action, self.cat_action_table
        )  # (N, C)
        k = torch.addmm(self.b_k, e, self.w_k)  # (N, H*d)
        lw = self.cap * torch.tanh(k) if self.cap is not None else k  # log phi (exp map)
        vz = torch.addmm(self.b_vz, e, self.w_vz)  # (N, H*(D+1)): [v_h | 1] per head
        t_ref = torch.cat([ts, ts.new_zeros(1)]).amax(dim=0)  # () long; 0 when empty
        empty = torch.full((1, h), EMPTY_LOG_SCALE, dtype=lw.dtype)
        if self.decaying:
            logw = -(t_ref - ts).to(torch.float32).unsqueeze(1) * self.decay  # (N, H)
            lw = (lw.view(n, h, dk) + logw.unsqueeze(2)).reshape(n, h * dk)
            if self.slots:
                on = logw + self.slot_strength  # (N, H)
                known = (category > 0).unsqueeze(1)
                lws = torch.where(known, on, torch.full_like(on, NO_SLOT))
        if self.slots and not self.decaying:  # every occupied slot has weight strength_h
            any_known = torch.cat([category, category.new_zeros(1)]).amax(dim=0) > 0
        if self.fixed_shift:
            # m = the bound of every log weight (the cap, the slot strengths): no pass
            # over the events to find it; exp(lw) <= e^cap cannot overflow float32
            m = self.m_fixed
            kw = torch.exp(lw)  # (N, H*d), scaled by e^-m after the GEMM
        else:
            # m = the largest log weight of each head; the row of `empty` makes N = 0 defined
            m_rows = torch.cat([lw, empty.repeat_interleave(dk, dim=1)], dim=0).amax(dim=0)
            m = m_rows.view(h, dk).amax(dim=1)  # (H,)
            if self.slots and self.decaying:
                m = torch.maximum(m, torch.cat([lws, empty], dim=0).amax(dim=0))
            elif self.slots:
                m = torch.maximum(m, torch.where(any_known, self.slot_strength, empty[0]))
            kw = torch.exp(lw - m.view(h, 1).expand(h, dk).reshape(1, h * dk))  # <= 1
        full = torch.mm(kw.t(), vz)  # (H*d, H*(D+1)): every head against every head
        Sz = (full.reshape(h, dk, h, dv + 1) * self.head_eye).sum(dim=2)  # (H, d, D+1)
        if self.fixed_shift:
            Sz = Sz * torch.exp(-m).view(h, 1, 1)
        S, z = Sz[:, :, :dv], Sz[:, :, dv]
        if self.slots:
            if self.decaying:  # each event's own slot weight
                ws = torch.exp(lws - m.view(1, h))  # (N, H), 0 where no slot
                vz = (vz.view(n, h, dv + 1) * ws.unsqueeze(2)).reshape(n, h * (dv + 1))
            # per category bucket first (N rows), then per slot (cat_buckets x H rows)
            per_cat = torch.zeros(self.cat_buckets, h * (dv + 1), dtype=kw.dtype)
            per_cat = per_cat.index_add(0, category, vz).view(self.cat_buckets, h, dv + 1)
            slot_sums = torch.zeros(self.slots + 1, h, dv + 1, dtype=kw.dtype)
            slot_sums = slot_sums.index_put(
                (self.slot_of_cat, self.head_of_cat), per_cat, accumulate=True
            )[: self.slots].transpose(0, 1)  # (H, slots, D+1)
            if not self.decaying:  # the slot weight of every event: strength_h, scaled
                on = torch.exp(self.slot_strength - m)
                weight = torch.where(any_known, on, torch.zeros_like(m))
                slot_sums = slot_sums * weight.view(h, 1, 1)
            S = torch.cat([S, slot_sums[:, :, :dv]], dim=1)  # (H, F, D)
            z = torch.cat([z, slot_sums[:, :, dv]], dim=1)  # (H, F)
        if self.fixed_shift:  # the empty state keeps its own log-scale
            nonempty = torch.ones_like(ts).sum() > 0  # (not ts[:1]: exported as size 1)
            m = torch.where(nonempty, m, empty[0])
        return S, z, m, t_ref


def serving_state_graph(model: IFAModel) -> ServingStateGraph | None:
    """The CPU layout of `model.build_state`, or None where it does not apply."""
    if not model.attn.phi_k.log_domain:
        return None
    return ServingStateGraph(model).eval()
