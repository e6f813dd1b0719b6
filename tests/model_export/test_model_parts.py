"""The set layer respects padding; the set loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from factories import random_batch, tiny_config

from model_export.model import MODEL_TYPES, build_model, set_loss
from model_export.model.set_encoder import SetEncoder


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padding_candidates_do_not_change_real_logits(model_type: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(model=model_type, set_layer=True)
    model = build_model(cfg).eval()
    batch = random_batch(cfg, n_events=30, n_requests=4, n_cands=8, seed=1)
    batch.cand_mask[:, 5:] = False
    other = random_batch(cfg, n_events=30, n_requests=4, n_cands=8, seed=9)
    batch2 = random_batch(cfg, n_events=30, n_requests=4, n_cands=8, seed=1)
    batch2.cand_mask[:, 5:] = False
    batch2.cand_item[:, 5:] = other.cand_item[:, 5:]  # different padding content
    batch2.cand_cat[:, 5:] = other.cand_cat[:, 5:]
    with torch.no_grad():
        a, b = model(batch), model(batch2)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    real = torch.cat([a[:, :5], b[:, :5]])
    assert not torch.allclose(real, real[:, :1])  # the logits are not trivially constant


def test_set_layer_relates_candidates() -> None:
    torch.manual_seed(0)
    enc = SetEncoder(tiny_config(set_layer=True)).eval()
    x = torch.randn(1, 4, 16)
    mask = torch.ones(1, 4, dtype=torch.bool)
    y = enc(x, mask)
    x2 = x.clone()
    x2[0, 3] = torch.randn(16)  # (a constant shift would vanish in LayerNorm)
    y2 = enc(x2, mask)
    assert not torch.allclose(y[0, :3], y2[0, :3])  # a real neighbour changes the others
    mask[0, 3] = False
    assert torch.allclose(enc(x, mask)[0, :3], enc(x2, mask)[0, :3], atol=1e-6)
    assert torch.isfinite(enc(x, torch.zeros(1, 4, dtype=torch.bool))).all()  # all padding


def test_set_loss_matches_hand_computed_values() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), 5.0], [1.0, -1.0, 0.0]])
    label = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    sp = torch.nn.functional.softplus
    bce = (
        sp(-logits[0, 0])
        + sp(logits[0, 1])
        + sp(logits[1, 0])
        + sp(logits[1, 1])
        + sp(logits[1, 2])
    ) / 5
    assert torch.allclose(set_loss(logits, label, mask, 0.0), bce)
    # listwise: only set 0 has a positive; its softmax over the 2 valid items gives 1/4 to it
    want = bce + 0.5 * math.log(4.0)
    assert torch.allclose(set_loss(logits, label, mask, 0.5), want)


def test_set_loss_splits_target_over_positives_and_has_gradients() -> None:
    logits = torch.zeros(1, 4, requires_grad=True)
    label = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss = set_loss(logits, label, mask, 1.0)
    assert torch.allclose(loss, torch.tensor(math.log(2.0) + math.log(4.0)))
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
    assert logits.grad is not None and (logits.grad[0, :2] < 0).all()
