"""Every model: shapes, empty histories, a falling loss; baselines attend over the right events."""

from __future__ import annotations

import pytest
import torch
from factories import random_batch, tiny_config

from model_export.batch import UserBatch
from model_export.model import MODEL_TYPES, build_model, set_loss
from model_export.model.baselines import AttentionBaseline, MeanPool


@pytest.mark.parametrize("set_layer", [False, True])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_shapes_and_empty_history(model_type: str, set_layer: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(model=model_type, set_layer=set_layer)
    model = build_model(cfg).eval()
    batch = random_batch(cfg, n_events=40, n_requests=5, n_cands=6, seed=1)
    with torch.no_grad():
        logits = model(batch)
        empty = model(random_batch(cfg, n_events=0, n_requests=2, n_cands=3))
    assert logits.shape == (5, 6) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert empty.shape == (2, 3) and torch.isfinite(empty).all()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loss_falls_on_a_tiny_fixed_batch(model_type: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(model=model_type, set_layer=True)
    model = build_model(cfg).train()
    batch = random_batch(cfg, n_events=50, n_requests=4, n_cands=8, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = set_loss(model(batch), batch.label, batch.cand_mask, listwise_weight=0.5)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def _selected_events(model_type: str, model: AttentionBaseline, batch: UserBatch, r: int, j: int,
                     q: torch.Tensor, k: torch.Tensor) -> list[int]:  # fmt: skip
    """The event indices a baseline should attend over for request r, candidate j (by loops)."""
    cfg = model.cfg
    p = int(batch.req_prefix[r])
    if model_type == "din":
        return list(range(max(0, p - cfg.last_n), p))
    if model_type == "softmax_full":
        return list(range(p))
    if model_type == "sim_hard":
        same = [i for i in range(p) if int(batch.ev_cat[i]) == int(batch.cand_cat[r, j])]
        return same[-cfg.top_k :]
    scores = (q[r, j].unsqueeze(0) * k[:p]).sum(-1).mean(-1)  # (p,) twin: mean over heads
    scores = scores + _category_term(model, batch, r, j, list(range(p))).mean(-1)
    return torch.topk(scores, min(cfg.top_k, p)).indices.tolist()


@pytest.mark.parametrize("model_type", ["din", "sim_hard", "twin", "softmax_full"])
def test_baseline_attends_over_the_specified_events(model_type: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(model=model_type, category_buckets=4, last_n=6, top_k=4)
    model = build_model(cfg).eval()
    assert isinstance(model, AttentionBaseline)
    batch = random_batch(cfg, n_events=30, n_requests=5, n_cands=5, seed=3)
    with torch.no_grad():
        c = model.embed.candidates(batch.cand_item, batch.cand_cat)
        q = model.attn.queries(c)  # (R, M, H, d)
        e = model.embed.events(batch.ev_item, batch.ev_cat, batch.ev_action)
        k, v = model.attn.keys_values(e)
        got, mass = model.attend(batch, q, k, v)  # (R, M, H, D), (R, M, H)
        for r in range(batch.num_requests):
            for j in range(batch.cand_item.shape[1]):
                idx = _selected_events(model_type, model, batch, r, j, q, k)
                if not idx:
                    assert not got[r, j].any()
                    continue
                score = (q[r, j].unsqueeze(0) * k[idx]).sum(-1) + _category_term(
                    model, batch, r, j, idx
                )  # (K, H)
                w = torch.softmax(score, dim=0)
                want = (w.unsqueeze(-1) * v[idx]).sum(0)  # (H, D)
                assert torch.allclose(got[r, j], want, atol=1e-5), (r, j, idx)
                assert torch.allclose(mass[r, j], torch.logsumexp(score, dim=0), atol=1e-4)


def _category_term(
    model: AttentionBaseline, batch: UserBatch, r: int, j: int, idx: list[int]
) -> torch.Tensor:
    """(K, H): cat_strength_h where event and candidate share a known category, else 0."""
    strength = model.attn.cat_strength
    assert strength is not None
    cand = int(batch.cand_cat[r, j])
    same = torch.tensor([float(int(batch.ev_cat[i]) == cand and cand > 0) for i in idx])
    return same.unsqueeze(1) * strength.unsqueeze(0)


def test_mean_pool_reads_the_prefix_mean() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(model="mean_pool")
    model = build_model(cfg).eval()
    assert isinstance(model, MeanPool)
    batch = random_batch(cfg, n_events=20, n_requests=3, seed=4)
    captured: list[torch.Tensor] = []
    handle = model.readout.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    with torch.no_grad():
        model(batch)
    handle.remove()
    e = model.embed.events(batch.ev_item, batch.ev_cat, batch.ev_action).detach()
    for r, p in enumerate(batch.req_prefix.tolist()):
        want = e[:p].mean(0) if p else torch.zeros(cfg.d_model)
        assert torch.allclose(captured[0][r], want, atol=1e-6)


def test_softmax_full_chunks_long_histories() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(model="softmax_full")
    model = build_model(cfg)
    batch = random_batch(cfg, n_events=20_000, n_requests=8, n_cands=40, seed=5, min_prefix=15_000)
    logits = model(batch)  # 8 x 40 x 20k x 2 > one chunk: several chunks, checkpointed
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert model.embed.item.weight.grad is not None
