"""The scorer graph as it is exported: `IFAModel.score`, laid out for ONNX Runtime.

Same function as the model's `score` (the parity tests hold it to 1e-5), written so
that ORT runs few, large kernels on a request of B users x M candidates:

* candidates flattened to (B*M, .) wherever the op is per candidate, so every Linear
  is one Gemm (a 3-D MatMul + Add is two kernels, and Gemm fuses the bias);
* the learned part of all heads read with one batched MatMul against the
  block-diagonal arrangement of each user's state, (M, H*d) @ (H*d, H*D), instead of
  H small per-head products and the transposes into per-head layout;
* per-head scalars broadcast over a head's features by a MatMul with a constant 0/1
  expansion matrix: ORT's kernels for a broadcast along the innermost axis are ~8x
  slower than a same-shape op, and these tensors are tiny;
* a candidate's category slot read as one Gather of its state row, the row's offset
  within a user's state and the mask of unknown categories looked up per category in
  two small constant tables (category_buckets x H) instead of computed per candidate
  (a multiply, a modulo, a compare and a Where over (B, M, H): 8-10 % of the call).

Only the exp feature map (the shipped one) without the set layer has this layout;
`serving_scorer_graph` returns None otherwise and the exporter uses `model.score`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_export.model.head import PADDING_LOGIT
from model_export.model.ifa import IFAModel
from model_export.model.linear_attention import MASS_CLAMP, TINY


class ServingScorerGraph(nn.Module):
    """S (B,H,F,D), z (B,H,F), m (B,H), n (B,), item, category, mask (B,M) -> logits (B,M)."""

    item_table: torch.Tensor
    cat_table: torch.Tensor
    w_q: torch.Tensor
    b_q: torch.Tensor
    w_r: torch.Tensor
    b_r: torch.Tensor
    head_eye: torch.Tensor
    expand_key: torch.Tensor
    expand_value: torch.Tensor
    head_slot: torch.Tensor
    miss: torch.Tensor

    def __init__(self, model: IFAModel) -> None:
        super().__init__()
        cfg, attn, emb = model.cfg, model.attn, model.embed
        self.heads, self.d_key, self.d_head = cfg.heads, attn.d_key, cfg.d_head
        self.slots, self.eps, self.use_mass = cfg.cat_slots, float(cfg.eps), cfg.use_mass
        h = cfg.heads
        with torch.no_grad():
            self.register_buffer("item_table", emb.item.weight.detach().clone())
            self.register_buffer("cat_table", emb.category.weight.detach().clone())
            self.register_buffer("w_q", attn.q_proj.weight.detach().t().contiguous())
            self.register_buffer("b_q", attn.q_proj.bias.detach().clone())
            self.register_buffer("w_r", model.readout.weight.detach().t().contiguous())
            self.register_buffer("b_r", model.readout.bias.detach().clone())
            self.register_buffer("head_eye", torch.eye(h).view(1, h, 1, h, 1))
            # row h of expand_x is 1 on head h's features: (., H) @ expand_x = (., H*x)
            eye = torch.eye(h)
            self.register_buffer("expand_key", eye.repeat_interleave(self.d_key, dim=1))
            self.register_buffer("expand_value", eye.repeat_interleave(self.d_head, dim=1))
            if self.slots:
                stride: torch.Tensor = attn.slot_stride  # type: ignore[assignment]  # buffer
                cats = torch.arange(cfg.category_buckets).view(-1, 1)
                # row of category c's slot for head h within one user's (H*slots) rows:
                # attn.slot_index, tabulated
                self.register_buffer(
                    "head_slot",
                    torch.arange(h).view(1, h) * self.slots + (cats * stride) % self.slots,
                )
                # 0 for a known category, -inf for unknown (bucket 0): added to a log
                # weight it removes the slot from the shift and exp() gives it weight 0
                unknown = torch.where(cats > 0, 0.0, float("-inf"))
                self.register_buffer("miss", unknown.expand(-1, h).contiguous())
        self.token = model.head.token  # Linear + LayerNorm on (B*M, 3C [+ mass])
        self.mlp = model.head.mlp

    def forward(
        self,
        S: torch.Tensor,
        z: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        item: torch.Tensor,
        category: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        h, dk, dv = self.heads, self.d_key, self.d_head
        b, mc = item.shape[0], item.shape[1]
        c = F.embedding(item.reshape(-1), self.item_table) + F.embedding(
            category.reshape(-1), self.cat_table
        )  # (T, C), T = B*M
        q = torch.addmm(self.b_q, c, self.w_q).view(b, mc, h * dk)  # log phi(q), exp map
        S_l, z_l = S[:, :, :dk], z[:, :, :dk]  # (B, H, d, D), (B, H, d)
        log_z = torch.log(z_l.clamp_min(TINY)).reshape(b, 1, h * dk)
        # shift = the largest term of phi(q).z (see LinearCrossAttention.read)
        shift = (q + log_z).view(b, mc, h, dk).amax(dim=3)  # (B, M, H)
        if self.slots:
            user = (torch.arange(b) * (h * self.slots)).view(b, 1, 1)
            row = F.embedding(category, self.head_slot) + user  # (B, M, H) row of (B*H*slots)
            hit_S = F.embedding(row, S[:, :, dk:].reshape(-1, dv))  # (B, M, H, D)
            hit_z = F.embedding(row, z[:, :, dk:].reshape(-1, 1)).squeeze(3)  # (B, M, H)
            miss = F.embedding(category, self.miss)  # (B, M, H): 0 or -inf
            shift = torch.maximum(shift, torch.log(hit_z.clamp_min(TINY)) + miss)
            w_hit = torch.exp(miss - shift)  # (B, M, H), 0 for an unknown category
        qe = torch.exp(q - torch.matmul(shift, self.expand_key))  # (B, M, H*d)
        block_S = (S_l.unsqueeze(3) * self.head_eye).reshape(b, h * dk, h * dv)
        block_z = (z_l.unsqueeze(3) * self.head_eye.squeeze(4)).reshape(b, h * dk, h)
        num = torch.matmul(qe, block_S)  # (B, M, H*D)
        den = torch.matmul(qe, block_z)  # (B, M, H)
        if self.slots:
            num = num + torch.matmul(w_hit, self.expand_value) * hit_S.reshape(b, mc, h * dv)
            den = den + w_hit * hit_z
        o = num * torch.matmul(1.0 / (den + self.eps), self.expand_value)  # (B, M, H*D)
        r = torch.addmm(self.b_r, o.reshape(b * mc, h * dv), self.w_r)  # (T, C)
        parts = [c, r, c * r]
        if self.use_mass:
            log_n = torch.log1p(n.to(S.dtype)).view(b, 1, 1)
            mass = torch.log(den.clamp_min(TINY)) + shift + m.unsqueeze(1) - log_n  # (B, M, H)
            parts += [
                mass.clamp(-MASS_CLAMP, MASS_CLAMP).reshape(b * mc, h),
                log_n.expand(b, mc, 1).reshape(b * mc, 1),
            ]
        logits = self.mlp(self.token(torch.cat(parts, dim=1))).view(b, mc)
        return torch.where(mask, logits, PADDING_LOGIT)


def serving_scorer_graph(model: IFAModel) -> ServingScorerGraph | None:
    """The ORT layout of `model.score`, or None where it does not apply."""
    if model.cfg.feature_map != "exp" or model.cfg.set_layer:
        return None
    return ServingScorerGraph(model).eval()
