"""The two ONNX graphs of an artifact, exported from an IFA model: the wrappers, example
inputs, dynamic axes, the dynamo exporter (with the legacy one as fallback) and the io
check against the contract in `ifa_common/graphs.py`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from ifa_common.graphs import (
    SCORER_FILE,
    SCORER_INPUTS,
    SCORER_OUTPUTS,
    STATE_FILE,
    STATE_INPUTS,
    STATE_OUTPUTS,
)
from model_export.model.config import ModelConfig
from model_export.model.ifa import IFAModel
from model_export.onnx.score_layout import serving_scorer_graph
from model_export.onnx.state_layout import serving_state_graph

log = logging.getLogger(__name__)

OPSET: Final = 20
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


def example_inputs(cfg: ModelConfig) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
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


def export_graphs(model: nn.Module, cfg: ModelConfig, out: Path) -> str:
    """Write state.onnx and scorer.onnx; returns the exporter used ("dynamo" or "legacy")."""
    state_args, scorer_args = example_inputs(cfg)
    # the CPU layout of build_state where there is one (same function, see onnx/state_layout.py)
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
    # (state_layout's slot map): it gets the plain build_state graph
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
