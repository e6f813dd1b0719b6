"""IFA: the state is exact (additive, order free, stable) and forward == score(build_state)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from factories import T0, random_batch, random_events, tiny_config

from ifa_common.state import EMPTY_LOG_SCALE, fold_arrays
from model_export.model import FEATURE_MAPS, IFAModel, build_model
from model_export.model.config import ModelConfig
from model_export.model.linear_attention import LinearCrossAttention

DECAYS = {"lifelong": (0.0, 0.0), "decay": (0.0, 0.5)}
State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _model(fm: str, decay: tuple[float, ...], **kw: object) -> IFAModel:
    torch.manual_seed(0)
    model = build_model(tiny_config(feature_map=fm, decay_per_day=decay, **kw))
    assert isinstance(model, IFAModel)
    return model.eval()


def _true_scale(state: State, m_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S, z rescaled (float64) to the log-scale m_ref, so two states can be compared."""
    S, z, m, _ = state
    c = torch.exp(m.double() - m_ref.double())  # (H,)
    return S.double() * c[:, None, None], z.double() * c[:, None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_same_state(got: State, want: State, tol: float = 1e-5) -> None:
    assert int(got[3]) == int(want[3])
    S_g, z_g = _true_scale(got, want[2])
    S_w, z_w = _true_scale(want, want[2])
    assert _rel(S_g, S_w) < tol
    assert _rel(z_g, z_w) < tol


@pytest.mark.parametrize("decay", DECAYS.values(), ids=DECAYS.keys())
@pytest.mark.parametrize("fm", FEATURE_MAPS)
def test_state_is_additive_over_chunks(fm: str, decay: tuple[float, ...]) -> None:
    model = _model(fm, decay)
    ev = random_events(200, model.cfg, seed=1)
    lam = model.decay.double()
    with torch.no_grad():
        full = model.build_state(*ev)
        for cut in (0, 1, 97, 199, 200):
            a = model.build_state(*(x[:cut] for x in ev))
            b = model.build_state(*(x[cut:] for x in ev))
            folded = fold_arrays(*a, *b, lam)
            _assert_same_state(folded, full)
            swapped = fold_arrays(*b, *a, lam)  # fold is symmetric
            _assert_same_state(swapped, full)


@pytest.mark.parametrize("fm", FEATURE_MAPS)
def test_state_ignores_event_order_without_decay(fm: str) -> None:
    model = _model(fm, DECAYS["lifelong"])
    ev = random_events(300, model.cfg, seed=2)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_same_state(model.build_state(*(x[perm] for x in ev)), model.build_state(*ev))


def test_empty_chunk_gives_the_empty_state() -> None:
    model = _model("exp", DECAYS["decay"])
    with torch.no_grad():
        S, z, m, t = model.build_state(*random_events(0, model.cfg))
    cfg = model.cfg
    assert S.shape == (cfg.heads, cfg.d_phi, cfg.d_head) and z.shape == (cfg.heads, cfg.d_phi)
    assert not S.any() and not z.any()
    assert torch.equal(m, torch.full((cfg.heads,), EMPTY_LOG_SCALE))
    assert t.dtype == torch.long and int(t) == 0


@pytest.mark.parametrize(("set_layer", "use_mass"), [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("decay", DECAYS.values(), ids=DECAYS.keys())
@pytest.mark.parametrize("fm", FEATURE_MAPS)
def test_forward_equals_score_of_built_prefix_state(
    fm: str, decay: tuple[float, ...], set_layer: bool, use_mass: bool
) -> None:
    model = _model(fm, decay, set_layer=set_layer, use_mass=use_mass)
    batch = random_batch(model.cfg, n_events=80, n_requests=6, n_cands=9, seed=4)
    with torch.no_grad():
        logits = model(batch)
        for r, p in enumerate(batch.req_prefix.tolist()):
            S, z, m, _ = model.build_state(
                batch.ev_item[:p], batch.ev_cat[:p], batch.ev_action[:p], batch.ev_ts[:p]
            )
            one = model.score(
                S[None], z[None], m[None], torch.tensor([p]),
                batch.cand_item[r : r + 1], batch.cand_cat[r : r + 1], batch.cand_mask[r : r + 1],
            )  # fmt: skip
            assert torch.allclose(one[0], logits[r], rtol=0, atol=1e-5)


def test_prefix_states_are_folds_of_chunks() -> None:
    model = _model("exp", DECAYS["decay"])
    batch = random_batch(model.cfg, n_events=50, n_requests=4, seed=5)
    with torch.no_grad():
        S, z, m, t = model.prefix_states(batch)
        for r, p in enumerate(batch.req_prefix.tolist()):
            want = model.build_state(
                batch.ev_item[:p], batch.ev_cat[:p], batch.ev_action[:p], batch.ev_ts[:p]
            )
            _assert_same_state((S[r], z[r], m[r], t[r]), want)


@pytest.mark.parametrize("fm", FEATURE_MAPS)
def test_empty_history_scores_are_finite(fm: str) -> None:
    model = _model(fm, DECAYS["decay"], set_layer=True)
    batch = random_batch(model.cfg, n_events=0, n_requests=3, n_cands=5)
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()


def _exp_readout_reference(
    model: IFAModel, ev: tuple[torch.Tensor, ...], c: torch.Tensor
) -> torch.Tensor:
    """Brute-force float64 readout of the exp map: o = sum_if e^(q_f+k_if) v_i / sum_if e^(q_f+k_if)."""
    attn = model.attn.double()
    with torch.no_grad():
        e = model.embed.events(*ev[:3]).double()  # (N, C)
        h, d = attn.heads, attn.d_head
        k = attn.phi_k(attn.k_proj(e).view(-1, h, d))  # (N, H, d) capped log-features
        v = attn.v_proj(e).view(-1, h, d)  # (N, H, D)
        q = attn.q_proj(c.double()).view(-1, h, d)  # (M, H, d)
        logits = q[:, None, :, :] + k[None]  # (M, N, H, d)
        w = torch.softmax(logits.permute(0, 2, 1, 3).flatten(2), dim=-1)  # (M, H, N*d)
        w = w.view(q.shape[0], h, -1, d).sum(-1)  # (M, H, N)
        out = torch.einsum("mhn,nhd->mhd", w, v)  # (M, H, D)
    model.attn.float()
    return out


@pytest.mark.parametrize("cap", [30.0, 80.0])
def test_exp_state_over_100k_events_with_large_keys_is_finite_and_exact(cap: float) -> None:
    # cap 80: e^80 * 100k overflows float32, so only the log-scale m keeps the state finite
    model = _model("exp", (0.0, 2.0), exp_key_cap=cap, cat_slots=0)  # reference: learned map only
    with torch.no_grad():
        model.attn.k_proj.weight.mul_(3000.0)  # keys of several hundred: e^k overflows float32
        model.attn.q_proj.weight.mul_(3000.0)
    n = 100_000
    ev = random_events(n, model.cfg, seed=6, t0=T0, span_s=3 * 365 * 86_400)
    with torch.no_grad():
        S, z, m, t = model.build_state(*ev)
        assert torch.isfinite(S).all() and torch.isfinite(z).all() and torch.isfinite(m).all()
        assert int(t) == int(ev[3].max()) and float(m.max()) > cap - 1  # the shift is in m
        c = model.embed.candidates(torch.arange(6)[None], torch.arange(6)[None])  # (1, 6, C)
        cats = torch.arange(6)[None]  # (1, 6)
        o, mass = model.attn.read(S[None], z[None], m[None], torch.tensor([n]), c, cats)
    assert torch.isfinite(o).all() and torch.isfinite(mass).all()
    # the lifelong head (0) against a float64 brute force over all 100k events
    want = _exp_readout_reference(model, ev, c[0])[:, 0]  # (M, D)
    assert torch.allclose(o[0, :, 0].double(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("fm", ["elu", "hedgehog", "taylor"])
def test_state_over_100k_events_with_decay_is_finite(fm: str) -> None:
    model = _model(fm, (0.0, 30.0))
    ev = random_events(100_000, model.cfg, seed=7, span_s=5 * 365 * 86_400)
    with torch.no_grad():
        S, z, m, _ = model.build_state(*ev)
        batch_logits = model.score(
            S[None], z[None], m[None], torch.tensor([100_000]),
            torch.arange(5)[None], torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool),
        )  # fmt: skip
    assert (
        torch.isfinite(S).all() and torch.isfinite(z).all() and torch.isfinite(batch_logits).all()
    )


def test_feature_maps_are_positive_kernels_with_declared_width() -> None:
    x = torch.randn(5, 2, 4) * 3
    y = torch.randn(5, 2, 4) * 3
    for fm in FEATURE_MAPS:
        cfg = tiny_config(feature_map=fm)
        phi = _model(fm, DECAYS["lifelong"]).attn.phi_k
        px, py = phi(x), phi(y)
        assert px.shape == (5, 2, cfg.d_phi - cfg.cat_slots)  # + category slots, below
        if phi.log_domain:
            px, py = px.exp(), py.exp()
        assert ((px * py).sum(-1) > 0).all()
    taylor = _model("taylor", DECAYS["lifelong"]).attn.phi_k
    s = (x * y).sum(-1) / math.sqrt(4)
    assert torch.allclose((taylor(x) * taylor(y)).sum(-1), 1 + s + s * s / 2, atol=1e-4)


@pytest.mark.parametrize("fm", ["exp", "elu"])
def test_category_slots_add_an_exact_match_kernel(fm: str) -> None:
    model = _model(fm, DECAYS["lifelong"], cat_slots=11)
    attn = model.attn
    with torch.no_grad():
        attn.slot_strength.copy_(torch.tensor([0.5, 2.0]))
        cats = torch.tensor([3, 3, 4, 0])  # same, same, other, unknown
        k = attn.category_slots(cats, keys=True)  # (4, H, 11)
        q = attn.category_slots(torch.tensor([3]), keys=False)  # (1, H, 11)
        if attn.phi_k.log_domain:
            k, q = k.exp(), q.exp()
        kernel = (q * k).sum(-1)  # (4, H): the slot part of phi(q).phi(k)
    strength = attn.slot_strength.exp() if fm == "exp" else F.softplus(attn.slot_strength)
    assert torch.allclose(kernel[0], strength) and torch.allclose(kernel[1], strength)
    assert kernel[2].abs().max() < 1e-6  # 3 and 4 fall in different slots for both strides
    assert kernel[3].abs().max() < 1e-6  # unknown categories never match
    assert int((k[0] > 1e-6).sum()) == 2  # one slot per head


def _dense_read(
    attn: LinearCrossAttention,
    S: torch.Tensor,
    z: torch.Tensor,
    c: torch.Tensor,
    cats: torch.Tensor,
) -> torch.Tensor:
    """The readout by definition: every slot of phi(q) materialised, phi(q).S in full."""
    b, mc = c.shape[:2]
    q = attn.phi_q(attn.q_proj(c).view(b, mc, attn.heads, attn.d_key))
    qf = torch.cat([q, attn.category_slots(cats, keys=False)], dim=-1)  # (B, M, H, F)
    if attn.phi_q.log_domain:
        qf = torch.exp(qf - (qf + torch.log(z.clamp_min(1e-30)).unsqueeze(1)).amax(-1, True))
    qf = qf.transpose(1, 2)  # (B, H, M, F)
    num, den = qf @ S, qf @ z.unsqueeze(-1)
    return (num / (den + attn.eps)).transpose(1, 2)  # (B, M, H, D)


@pytest.mark.parametrize("fm", FEATURE_MAPS)
def test_gathered_slot_read_equals_the_dense_one_hot_read(fm: str) -> None:
    model = _model(fm, DECAYS["decay"], cat_slots=5)
    ev = random_events(300, model.cfg, seed=9)
    cats = torch.tensor([[0, 1, 3, 3, 4, 6, 10, 2]])  # unknown, a repeat, slot collisions
    with torch.no_grad():
        S, z, m, _ = model.build_state(*ev)
        c = model.embed.candidates(torch.arange(cats.shape[1])[None], cats)
        got, _ = model.attn.read(S[None], z[None], m[None], torch.tensor([300]), c, cats)
        want = _dense_read(model.attn, S[None], z[None], c, cats)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decay_buffer_follows_config() -> None:
    cfg = ModelConfig(heads=2, decay_per_day=(0.0, 86_400.0))
    model = build_model(cfg)
    assert isinstance(model, IFAModel)
    assert model.decay.dtype == torch.float32
    assert torch.allclose(model.decay, torch.tensor([0.0, 1.0]))
    assert "attn.decay" in model.state_dict()
