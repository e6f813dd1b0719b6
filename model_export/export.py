"""Checkpoint -> servable artifact: `artifacts/<version>/{state,scorer}.onnx, items.npz,
manifest.json`, then `artifacts/latest`.

Two graphs because the user state is built once and folded incrementally; their files
and signatures are the contract in `ifa_common/graphs.py`. The parts: the graphs
(`onnx/graphs.py`, with the CPU layouts in `onnx/state_layout.py` and
`onnx/score_layout.py`), the manifest (`onnx/manifest.py`) and the parity check
(`onnx/verify.py`). The export is written into a hidden temporary directory, loaded back
through the serving runtime and compared with PyTorch; only an artifact that passes is
renamed into place and named by `latest`.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ifa_common.graphs import ITEMS_FILE
from ifa_common.items import save_items
from ifa_common.manifest import LATEST_NAME, MANIFEST_NAME, ArtifactError, check_version_name
from model_export.checkpoint import CheckpointError, model_from, read_checkpoint
from model_export.model.config import ModelConfig
from model_export.onnx.graphs import ExportError, export_graphs
from model_export.onnx.manifest import build_manifest
from model_export.onnx.verify import verify_export

log = logging.getLogger(__name__)


def export_checkpoint(
    checkpoint_path: str | Path, out_dir: str | Path, version: str | None = None
) -> Path:
    """Export an `ifa` checkpoint to `out_dir/<version>/`; returns that directory."""
    try:
        ckpt = read_checkpoint(checkpoint_path)
        model_type = str(ckpt.get("model", ckpt["config"].get("model")))
        if model_type != "ifa" or ckpt["config"].get("model", "ifa") != "ifa":
            raise ExportError(
                f"only 'ifa' models can be exported for serving; {checkpoint_path} holds a "
                f"{model_type!r} model (baselines are for offline comparison only)"
            )
        model = model_from(ckpt, checkpoint_path)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    cfg = model.cfg
    table = ckpt.get("item_table") or {}
    item_table = (
        _as_int64(table.get("item_id", np.zeros(0, np.int64))),
        _as_int64(table.get("category", np.zeros(0, np.int64))),
    )
    training = {"data_id": ckpt.get("data_id"), "metrics": ckpt.get("metrics") or {}}
    return export_model(model, cfg, out_dir, version, item_table, training)


def export_model(
    model: nn.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    version: str | None,
    item_table: tuple[np.ndarray, np.ndarray] | Mapping[str, Any] | None,
    training_info: Mapping[str, Any] | None,
) -> Path:
    """Export an in-memory IFA model; returns `out_dir/<version>/` (verified, `latest` updated)."""
    if cfg.model != "ifa" or not hasattr(model, "build_state") or not hasattr(model, "score"):
        raise ExportError(f"only 'ifa' models can be exported for serving, got {cfg.model!r}")
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    try:
        version = check_version_name(version or default_version(model))
    except ArtifactError as e:
        raise ExportError(str(e)) from e
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise ExportError(f"{final} already exists; choose another --version")
    item_ids, item_cats = _item_arrays(item_table)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the service may run as another user
    try:
        exporter = export_graphs(model, cfg, tmp)
        save_items(tmp / ITEMS_FILE, item_ids, item_cats)
        manifest = build_manifest(cfg, version, tmp, exporter, training_info or {})
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        max_err = verify_export(model, cfg, tmp)
        log.info("export %s verified: max |ort - torch| = %.2e", version, max_err)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_latest(root, version)
    return final


def default_version(model: nn.Module) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"ifa-{stamp}-{weights_hash(model)[:8]}"


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_latest(root: Path, version: str) -> None:
    """Point `latest` at `version` atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
        os.replace(tmp, root / LATEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_int64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64).reshape(-1)


def _item_arrays(
    table: tuple[np.ndarray, np.ndarray] | Mapping[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray]:
    if table is None:
        ids, cats = np.zeros(0, np.int64), np.zeros(0, np.int64)
    elif isinstance(table, Mapping):
        ids, cats = _as_int64(table["item_id"]), _as_int64(table["category"])
    else:
        ids, cats = _as_int64(table[0]), _as_int64(table[1])
    if ids.shape != cats.shape:
        raise ExportError(f"item table: {ids.size} item ids but {cats.size} categories")
    order = np.argsort(ids, kind="stable")
    ids, cats = ids[order], cats[order]
    if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
        raise ExportError("item table has duplicate item ids")
    return ids, cats
