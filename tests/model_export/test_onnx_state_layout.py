"""The exported state graph's layout (model_export/onnx/state_layout.py) is the model's build_state."""

from __future__ import annotations

import pytest
import torch
from factories import random_events, tiny_config

from ifa_common.state import EMPTY_LOG_SCALE
from model_export.model import IFAModel, build_model
from model_export.onnx.state_layout import ServingStateGraph, serving_state_graph

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _model(**kw: object) -> IFAModel:
    torch.manual_seed(0)
    model = build_model(tiny_config(feature_map="exp", **kw))
    assert isinstance(model, IFAModel)
    if model.cfg.cat_slots:
        with torch.no_grad():  # trained-looking strengths: different per head
            model.attn.slot_strength.copy_(torch.tensor([3.0, 9.5]))
    return model.eval()


def _true(state: State) -> tuple[torch.Tensor, torch.Tensor]:
    """S, z at log-scale 0 (float64): two states that differ only in m compare equal."""
    S, z, m, _ = state
    scale = torch.exp(m.double())
    return S.double() * scale[:, None, None], z.double() * scale[:, None]


@pytest.mark.parametrize("cap", [30.0, 80.0], ids=["fixed-shift", "max-shift"])
@pytest.mark.parametrize("slots", [0, 5])
@pytest.mark.parametrize("decay", [(0.0, 0.0), (0.0, 2.0)], ids=["lifelong", "decay"])
def test_serving_layout_equals_build_state(
    cap: float, slots: int, decay: tuple[float, float]
) -> None:
    model = _model(exp_key_cap=cap, cat_slots=slots, decay_per_day=decay)
    graph = serving_state_graph(model)
    assert isinstance(graph, ServingStateGraph)
    assert graph.fixed_shift == (cap <= 40.0)
    for n in (0, 1, 333):
        item, cat, action, ts = random_events(n, model.cfg, seed=n)
        cat[: n // 3] = 0  # unknown categories: no slot
        with torch.no_grad():
            want = model.build_state(item, cat, action, ts)
            got = graph(item, cat, action, ts)
        assert [tuple(x.shape) for x in got] == [tuple(x.shape) for x in want]
        assert int(got[3]) == int(want[3])
        if n == 0:
            assert torch.all(got[2] == EMPTY_LOG_SCALE)
            assert not got[0].any() and not got[1].any()
            continue
        for g, w in zip(_true(got), _true(want), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()


def test_fixed_shift_state_is_finite_at_the_cap() -> None:
    # keys pinned at +cap for 100k events: exp(cap) * N must stay far from float32 overflow
    model = _model(exp_key_cap=40.0, cat_slots=5)
    with torch.no_grad():
        model.attn.k_proj.weight.zero_()
        model.attn.k_proj.bias.fill_(1e4)
    graph = serving_state_graph(model)
    assert graph is not None and graph.fixed_shift
    ev = random_events(100_000, model.cfg, seed=3)
    with torch.no_grad():
        S, z, _m, _ = graph(*ev)
    assert torch.isfinite(S).all() and torch.isfinite(z).all()
    learned = z[:, : model.attn.d_key]  # every key at the cap: z = N (float32 summation error)
    torch.testing.assert_close(learned, torch.full_like(learned, 1e5), rtol=1e-3, atol=0)


def test_other_feature_maps_keep_the_plain_graph() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(feature_map="elu"))
    assert isinstance(model, IFAModel)
    assert serving_state_graph(model) is None
