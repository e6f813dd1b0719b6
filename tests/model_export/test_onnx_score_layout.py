"""The exported scorer graph's layout (model_export/onnx/score_layout.py) is the model's score."""

from __future__ import annotations

import pytest
import torch
from factories import random_events, tiny_config

from model_export.model import IFAModel, build_model
from model_export.onnx.score_layout import ServingScorerGraph, serving_scorer_graph


def _model(**kw: object) -> IFAModel:
    torch.manual_seed(0)
    model = build_model(tiny_config(feature_map="exp", decay_per_day=(0.0, 2.0), **kw))
    assert isinstance(model, IFAModel)
    return model.eval()


@pytest.mark.parametrize("use_mass", [False, True])
@pytest.mark.parametrize("slots", [0, 5])
def test_serving_layout_equals_score(use_mass: bool, slots: int) -> None:
    model = _model(use_mass=use_mass, cat_slots=slots)
    graph = serving_scorer_graph(model)
    assert isinstance(graph, ServingScorerGraph)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        states = [model.build_state(*random_events(n, model.cfg, seed=n)) for n in (0, 7, 400)]
        S, z, m = (torch.stack([s[i] for s in states]) for i in range(3))
        n = torch.tensor([0, 7, 400])
        for mc in (1, 13):
            item = torch.randint(0, model.cfg.item_buckets, (3, mc), generator=g)
            cat = torch.randint(0, model.cfg.category_buckets, (3, mc), generator=g)
            cat[:, 0] = 0  # unknown category: no slot
            mask = torch.rand(3, mc, generator=g) < 0.8
            want = model.score(S, z, m, n, item, cat, mask)
            got = graph(S, z, m, n, item, cat, mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert bool(((got == -1.0e4) == ~mask).all())  # padding keeps its logit


@pytest.mark.parametrize("kw", [{"feature_map": "elu"}, {"set_layer": True}])
def test_other_models_keep_the_plain_graph(kw: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(**kw))
    assert isinstance(model, IFAModel)
    assert serving_scorer_graph(model) is None
