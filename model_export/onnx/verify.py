"""An export is published only if ONNX Runtime, through the serving runtime itself, gives
the PyTorch model's logits within PARITY_ATOL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from ifa_common import hashing
from ifa_common.records import make_events
from model_export.model.config import ModelConfig
from model_export.onnx.graphs import ExportError

PARITY_ATOL: Final = 1e-4


def verify_export(model: nn.Module, cfg: ModelConfig, version_dir: Path, seed: int = 0) -> float:
    """Load the export through the serving runtime and compare with PyTorch on random
    histories and candidate sets (sizes not used at export time, N = 0 included).
    Raises ExportError above PARITY_ATOL; returns the max absolute logit difference."""
    from service.engine.runtime import ModelRuntime

    rt = ModelRuntime.load_dir(version_dir, prefer_cuda=False)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n, mc in ((0, 1), (13, 37), (700, 129)):
        events = make_events(
            rng.integers(0, 1 << 40, n),
            1_700_000_000 + np.sort(rng.integers(0, 90 * 86_400, n)),
            action=rng.integers(0, 5, n),
        )
        items = rng.integers(0, 1 << 40, mc)
        got = rt.score(rt.build_state(events), items)
        want = torch_logits(model, cfg, events, items, rt.lookup_categories)
        if not np.all(np.isfinite(got)):
            raise ExportError(f"exported scorer gave non-finite logits at N={n}, M={mc}")
        worst = max(worst, float(np.max(np.abs(got - want))))
    if worst > PARITY_ATOL:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {worst:.2e} > {PARITY_ATOL}")
    return worst


@torch.no_grad()
def torch_logits(
    model: nn.Module, cfg: ModelConfig, events: np.ndarray, items: np.ndarray, lookup: Any
) -> np.ndarray:
    """Reference logits: the PyTorch model on raw events and candidates, bucketed like serving."""
    cats = np.where(events["category"] < 0, lookup(events["item_id"]), events["category"])
    S, z, m, _t_ref = model.build_state(  # type: ignore[operator]
        torch.from_numpy(hashing.item_bucket(events["item_id"], cfg.item_buckets)),
        torch.from_numpy(hashing.category_bucket(cats, cfg.category_buckets)),
        torch.from_numpy(hashing.action_bucket(events["action"], cfg.action_buckets)),
        torch.from_numpy(np.ascontiguousarray(events["ts"], dtype=np.int64)),
    )
    cand = torch.from_numpy(hashing.item_bucket(items, cfg.item_buckets))[None]
    cand_cat = torch.from_numpy(hashing.category_bucket(lookup(items), cfg.category_buckets))[None]
    logits = model.score(  # type: ignore[operator]
        S[None],
        z[None],
        m[None],
        torch.tensor([len(events)]),
        cand,
        cand_cat,
        torch.ones_like(cand, dtype=torch.bool),
    )
    return np.asarray(logits[0].numpy(), dtype=np.float32)
