"""The IFA graphs export with torch.onnx (dynamo) and keep N, M and B dynamic in ONNX Runtime.

The real exporter lives in model_export/export.py; this proves the model code exports through
its graph wrappers with the contract's names (ifa_common/graphs.py) and stays dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from factories import random_events, tiny_config

from ifa_common.graphs import SCORER_INPUTS, SCORER_OUTPUTS, STATE_INPUTS, STATE_OUTPUTS
from model_export.model import IFAModel, build_model
from model_export.onnx.graphs import ScorerGraph, StateGraph

STATE_IN = list(STATE_INPUTS)
SCORE_IN = list(SCORER_INPUTS)


@pytest.mark.slow
def test_state_and_scorer_export_with_dynamic_axes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(feature_map="exp", decay_per_day=(0.0, 1.0), set_layer=True)
    model = build_model(cfg).eval()
    assert isinstance(model, IFAModel)
    n_dim = torch.export.Dim("N", min=0)
    b_dim, m_dim = torch.export.Dim("B", min=1), torch.export.Dim("M", min=1)

    state_path = tmp_path / "state.onnx"
    program = torch.onnx.export(
        StateGraph(model).eval(), random_events(9, cfg), dynamo=True,
        input_names=STATE_IN, output_names=list(STATE_OUTPUTS),
        dynamic_shapes=tuple({0: n_dim} for _ in STATE_IN),
    )  # fmt: skip
    assert program is not None
    program.save(str(state_path))
    state_sess = ort.InferenceSession(str(state_path), providers=["CPUExecutionProvider"])

    states = []
    for n in (0, 1, 700):  # none of them the export-time N
        ev = random_events(n, cfg, seed=n)
        got = state_sess.run(None, dict(zip(STATE_IN, (x.numpy() for x in ev), strict=True)))
        with torch.no_grad():
            want = model.build_state(*ev)
        for g, w in zip(got, want, strict=True):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5 * float(w.abs().max()))
        states.append((want, n))

    def score_args(b: int, m: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        pick = [states[i % len(states)] for i in range(b)]
        return (
            torch.stack([s[0][0] for s in pick]), torch.stack([s[0][1] for s in pick]),
            torch.stack([s[0][2] for s in pick]), torch.tensor([s[1] for s in pick]),
            torch.randint(0, cfg.item_buckets, (b, m), generator=g),
            torch.randint(0, cfg.category_buckets, (b, m), generator=g),
            torch.rand(b, m, generator=g) < 0.9,
        )  # fmt: skip

    scorer_path = tmp_path / "scorer.onnx"
    batch_axes = [{0: b_dim}] * 4 + [{0: b_dim, 1: m_dim}] * 3
    program = torch.onnx.export(
        ScorerGraph(model).eval(), score_args(2, 5, 0), dynamo=True,
        input_names=SCORE_IN, output_names=list(SCORER_OUTPUTS), dynamic_shapes=tuple(batch_axes),
    )  # fmt: skip
    assert program is not None
    program.save(str(scorer_path))
    sess = ort.InferenceSession(str(scorer_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == SCORE_IN
    for b, m in ((1, 1), (3, 37), (1, 1000)):
        args = score_args(b, m, b * m)
        got = sess.run(None, dict(zip(SCORE_IN, (a.numpy() for a in args), strict=True)))[0]
        with torch.no_grad():
            logits = model.score(*args).numpy()
        assert got.shape == (b, m) and np.isfinite(got).all()
        np.testing.assert_allclose(got, logits, rtol=0, atol=1e-4)
