"""ONNX Runtime sessions as the service opens them: explicit threading, a CPU fallback
when the CUDA provider cannot initialise, and the graph signature checked against the
export contract (`ifa_common.graphs`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import onnxruntime as ort

from ifa_common.manifest import ArtifactError

log = logging.getLogger(__name__)

CUDA: Final = "CUDAExecutionProvider"
CPU: Final = "CPUExecutionProvider"


def providers(prefer_cuda: bool) -> list[str]:
    """CUDA first when asked for and present in this onnxruntime build, else CPU only."""
    return [CUDA, CPU] if prefer_cuda and CUDA in ort.get_available_providers() else [CPU]


def session_options(intra_op_threads: int, allow_spinning: bool = False) -> ort.SessionOptions:
    """Explicit threading for a service that runs several sessions side by side."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(intra_op_threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning: after each op, ORT's pool threads busy-wait for more work instead of
    # sleeping. That saves microseconds for one process that owns the machine, but here
    # several executor workers (each with its own pool) share a few cores with the event
    # loop and Redis client, and spinning threads steal those cores and raise tail
    # latency under load. Off by default; a setting for a dedicated box.
    flag = "1" if allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", flag)
    opts.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return opts


def open_session(
    path: Path, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # a CUDA provider that fails to initialise: retry on CPU
        if providers == [CPU]:
            raise ArtifactError(f"{path.name}: ONNX Runtime cannot load it: {e}") from e
        log.warning("CUDA session for %s failed (%s); falling back to CPU", path.name, e)
        return open_session(path, options, [CPU])


Runner = Callable[[Sequence[str], Mapping[str, Any]], list[Any]]


def runner(sess: ort.InferenceSession) -> Runner:
    """`sess.run` for a session whose inputs `check_io` has held to the contract.

    `InferenceSession.run` checks each call's feed in Python before ONNX Runtime's C++
    checks it again (names, types and shapes): a graph-capture check, a pass over the
    graph's inputs reading two attributes of each, and one over the fed values. For the
    scorer's seven inputs that is 4-5 µs a call with warm caches and about 15 µs when the
    caches were emptied before the call, as a server's other work and other tenants
    partly empty them between its calls (docs/performance.md, "a cold core"). A CPU
    session is run through the compiled method directly; a CUDA session keeps the
    wrapper, which holds ORT's fallback to CPU when the provider fails mid-run. So does a
    build of ORT without the compiled session where this expects it."""
    compiled = getattr(sess, "_sess", None)
    direct = getattr(compiled, "run", None)
    if direct is None or CUDA in sess.get_providers():
        public: Runner = sess.run
        return public

    def run(output_names: Sequence[str], feeds: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = direct(output_names, feeds, None)
        return out

    return run


def check_io(
    sess: ort.InferenceSession, inputs: Sequence[str], outputs: Sequence[str], name: str
) -> None:
    got_in = tuple(i.name for i in sess.get_inputs())
    got_out = tuple(o.name for o in sess.get_outputs())
    if set(got_in) != set(inputs) or set(got_out) != set(outputs):
        raise ArtifactError(
            f"{name}: graph inputs {got_in} / outputs {got_out} do not match the contract "
            f"{tuple(inputs)} / {tuple(outputs)}"
        )
