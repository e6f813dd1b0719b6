"""Checkpoint -> servable artifact: `artifacts/<version>/{state,scorer}.onnx, items.npz,
manifest.json`, then `artifacts/latest`.

Two graphs because the user state is built once and folded incrementally; their files
and signatures are the contract in `ifa_common/graphs.py`. Graphs take bucket indices (ifa_common.hashing runs outside them). The export is
written into a hidden temporary directory, loaded back through the serving runtime and
compared with PyTorch; only an artifact that passes is renamed into place and named
by `latest`.
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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from ifa_common import hashing
from ifa_common.graphs import (
    ITEMS_FILE,
    SCORER_FILE,
    SCORER_INPUTS,
    SCORER_OUTPUTS,
    STATE_FILE,
    STATE_INPUTS,
    STATE_OUTPUTS,
)
from ifa_common.manifest import (
    LATEST_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    ArtifactError,
    check_version_name,
    sha256_file,
)
from ifa_common.records import make_events

from .checkpoint import CheckpointError, model_from, read_checkpoint
from .model.config import ModelConfig
from .model.ifa import IFAModel
from .serving_score import serving_scorer_graph
from .serving_state import serving_state_graph

log = logging.getLogger(__name__)

OPSET: Final = 20
PARITY_ATOL: Final = 1e-4
STATE_IO: Final = (STATE_INPUTS, STATE_OUTPUTS)
SCORER_IO: Final = (SCORER_INPUTS, SCORER_OUTPUTS)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported, or an export that failed its checks."""


class StateGraph(nn.Module):
    """One chunk of events (N,) -> partial state; wraps IFAModel.build_state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, item: torch.Tensor, category: torch.Tensor, action: torch.Tensor, ts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        S, z, m, t_ref = self.model.build_state(item, category, action, ts)  # type: ignore[operator]
        return S, z, m, t_ref


class ScorerGraph(nn.Module):
    """States (B, ...) and candidates (B, M) -> logits (B, M); wraps IFAModel.score."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        S: torch.Tensor,
        z: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        item: torch.Tensor,
        category: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        logits: torch.Tensor = self.model.score(S, z, m, n, item, category, mask)  # type: ignore[operator]
        return logits


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
        exporter = _export_graphs(model, cfg, tmp)
        np.savez(tmp / ITEMS_FILE, item_id=item_ids, category=item_cats)
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


# ---------------------------------------------------------------------- graphs
def _example_inputs(cfg: ModelConfig) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    # Sizes 5 / 3 / 2 (not 0 or 1) so that no axis is specialised to a constant.
    g = torch.Generator().manual_seed(0)
    n, b, mc = 5, 2, 3
    h, f, d = cfg.heads, cfg.d_phi, cfg.d_head
    state_args = (
        torch.randint(0, cfg.item_buckets, (n,), generator=g),
        torch.randint(0, cfg.category_buckets, (n,), generator=g),
        torch.randint(0, cfg.action_buckets, (n,), generator=g),
        torch.arange(n, dtype=torch.long) * 60 + 1_700_000_000,
    )
    scorer_args = (
        torch.rand(b, h, f, d, generator=g),
        torch.rand(b, h, f, generator=g) + 0.1,
        torch.zeros(b, h),
        torch.tensor([n, n + 1], dtype=torch.long),
        torch.randint(0, cfg.item_buckets, (b, mc), generator=g),
        torch.randint(0, cfg.category_buckets, (b, mc), generator=g),
        torch.tensor([[True, True, True], [True, True, False]]),
    )
    return state_args, scorer_args


def _export_graphs(model: nn.Module, cfg: ModelConfig, out: Path) -> str:
    """Write state.onnx and scorer.onnx; returns the exporter used ("dynamo" or "legacy")."""
    state_args, scorer_args = _example_inputs(cfg)
    # the CPU layout of build_state where there is one (same function, see serving_state)
    fast = serving_state_graph(model) if isinstance(model, IFAModel) else None
    state_mod = fast if fast is not None else StateGraph(model).eval()
    fast_scorer = serving_scorer_graph(model) if isinstance(model, IFAModel) else None
    scorer_mod = fast_scorer if fast_scorer is not None else ScorerGraph(model).eval()
    try:
        _export_dynamo(state_mod, state_args, out / STATE_FILE, STATE_IO, "state")
        _export_dynamo(scorer_mod, scorer_args, out / SCORER_FILE, SCORER_IO, "scorer")
        return "dynamo"
    except Exception as e:  # the exporter is the one thing allowed to fall back
        log.warning(
            "dynamo ONNX export failed (%s: %s); using the legacy exporter", type(e).__name__, e
        )
    # the legacy exporter refuses index_add over a constant index with repeats
    # (serving_state's slot map): it gets the plain build_state graph
    _export_legacy(StateGraph(model).eval(), state_args, out / STATE_FILE, STATE_IO, "state")
    _export_legacy(ScorerGraph(model).eval(), scorer_args, out / SCORER_FILE, SCORER_IO, "scorer")
    return "legacy"


def _dynamic_shapes(kind: str) -> dict[str, dict[int, Any]]:
    Dim = torch.export.Dim
    if kind == "state":
        n = Dim("N", min=0)
        return {k: {0: n} for k in STATE_IO[0]}
    b, mc = Dim("B", min=1), Dim("M", min=1)
    return {
        "S": {0: b},
        "z": {0: b},
        "m": {0: b},
        "n": {0: b},
        "item": {0: b, 1: mc},
        "category": {0: b, 1: mc},
        "mask": {0: b, 1: mc},
    }


def _dynamic_axes(kind: str) -> dict[str, dict[int, str]]:
    if kind == "state":
        return {k: {0: "N"} for k in STATE_IO[0]}
    axes: dict[str, dict[int, str]] = {k: {0: "B"} for k in ("S", "z", "m", "n")}
    axes.update({k: {0: "B", 1: "M"} for k in ("item", "category", "mask", "logits")})
    return axes


def _amax_translation() -> dict[Any, Any]:
    """torch_lib's aten_amax requires `dim`; `x.amax()` (all dims, used for t_ref) lacks it.

    This replaces it with a plain ReduceMax that handles both forms.
    """
    from onnxscript import opset18 as op

    def amax(self: Any, dim: Sequence[int] = (), keepdim: bool = False) -> Any:
        if dim:
            axes = op.Constant(value_ints=list(dim))
            return op.ReduceMax(self, axes, keepdims=int(keepdim))  # type: ignore[arg-type]
        return op.ReduceMax(self, keepdims=int(keepdim))

    return {torch.ops.aten.amax.default: amax}


def _export_dynamo(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    io: tuple[tuple[str, ...], tuple[str, ...]],
    kind: str,
) -> None:
    # The exporter logs a warning per missing torchvision op and warns about its own
    # internals; neither is actionable here.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(io[0]),
                output_names=list(io[1]),
                dynamic_shapes=_dynamic_shapes(kind),
                custom_translation_table=_amax_translation(),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
                external_data=False,
            )
    finally:
        registry_log.setLevel(level)
    if program is None:
        raise ExportError("dynamo exporter returned no program")
    program.save(str(path), external_data=False)
    _check_graph(path, io)


def _export_legacy(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    io: tuple[tuple[str, ...], tuple[str, ...]],
    kind: str,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=list(io[0]),
            output_names=list(io[1]),
            dynamic_axes=_dynamic_axes(kind),
            opset_version=OPSET,
        )
    _check_graph(path, io)


def _check_graph(path: Path, io: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    import onnx

    graph = onnx.load(str(path)).graph
    inputs = tuple(i.name for i in graph.input)
    outputs = tuple(o.name for o in graph.output)
    if inputs != io[0] or outputs != io[1]:
        raise ExportError(f"{path.name}: exported io {inputs} -> {outputs}, expected {io}")


def graph_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (ints, or axis names for dynamic axes) of a graph's io."""
    import onnx

    graph = onnx.load(str(path)).graph

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append({"name": v.name, "dtype": dtype, "shape": shape})
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


# ---------------------------------------------------------------------- manifest
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


# ---------------------------------------------------------------------- verification
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
