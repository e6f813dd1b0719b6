"""The artifact's manifest.json: version, config, dims, graph signatures, sha256 of every
file, training data id and metrics (checked by `ifa_common.manifest` at load)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ifa_common.graphs import ITEMS_FILE, SCORER_FILE, STATE_FILE
from ifa_common.manifest import MANIFEST_FORMAT, sha256_file
from model_export.model.config import ModelConfig
from model_export.onnx.graphs import OPSET, graph_signature


def build_manifest(
    cfg: ModelConfig, version: str, out: Path, exporter: str, training: Mapping[str, Any]
) -> dict[str, Any]:
    files = {name: sha256_file(out / name) for name in (STATE_FILE, SCORER_FILE, ITEMS_FILE)}
    return {
        "format": MANIFEST_FORMAT,
        "version": version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model_type": cfg.model,
        "config": _jsonable(cfg.to_dict()),
        "dims": {
            "heads": cfg.heads,
            "d_phi": cfg.d_phi,
            "d_head": cfg.d_head,
            "d_model": cfg.d_model,
            "item_buckets": cfg.item_buckets,
            "category_buckets": cfg.category_buckets,
            "action_buckets": cfg.action_buckets,
            "decay_per_second": [float(x) for x in cfg.decay_per_second],
        },
        "opset": OPSET,
        "exporter": exporter,
        "torch_version": torch.__version__,
        "graphs": {
            "state": {"file": STATE_FILE, **graph_signature(out / STATE_FILE)},
            "scorer": {"file": SCORER_FILE, **graph_signature(out / SCORER_FILE)},
        },
        "files": files,
        "training": {
            "data_id": training.get("data_id"),
            "metrics": _jsonable(dict(training.get("metrics") or {})),
        },
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic | np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
