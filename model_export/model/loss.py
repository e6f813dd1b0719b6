"""Training loss over whole candidate sets: pointwise BCE + listwise softmax CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def set_loss(
    logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, listwise_weight: float
) -> torch.Tensor:
    """logits, label (R, M) float, mask (R, M) bool -> scalar.

    BCE averaged over valid candidates, plus `listwise_weight` x the softmax cross
    entropy of each set against its labels normalised over the set (sets without a
    positive contribute nothing to that term).
    """
    label = label.to(logits.dtype)
    valid = mask.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")  # (R, M)
    loss = (bce * valid).sum() / valid.sum().clamp_min(1.0)
    if listwise_weight == 0.0:
        return loss
    pos = label * valid  # (R, M)
    n_pos = pos.sum(dim=1, keepdim=True)  # (R, 1)
    target = pos / n_pos.clamp_min(1.0)
    logp = torch.log_softmax(logits.masked_fill(~mask, -1.0e9), dim=1)  # (R, M)
    ce = -(target * logp.masked_fill(~mask, 0.0)).sum(dim=1)  # (R,)
    has_pos = (n_pos.squeeze(1) > 0).to(logits.dtype)
    listwise = (ce * has_pos).sum() / has_pos.sum().clamp_min(1.0)
    return loss + listwise_weight * listwise
