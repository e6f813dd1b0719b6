"""In-process model costs: the serving runtime (ONNX Runtime) against torch `softmax_full`.

    python -m loadtest.microbench [--quick] [--artifacts DIR]

`run_microbench(quick)` returns a dict (every figure in ms, median of repeats after a
warm-up): build_state at N = 1k/10k/100k, score at M = 1/100/500/1000 (at M = 1 and 500
also on a cold core: every cache emptied before each call), the refresh of a
cached state with 100 new events (build + fold), the state's size, and the PyTorch
`softmax_full` forward at the same N with M = 500 and the same dims, plus the ratios
softmax_full / ifa warm (score only) and / ifa cold (build_state(100k) + score).

The runtime part needs only onnxruntime; it loads `<artifacts>/latest` when that has the
default dims, else it exports an untrained default-config model to a temporary directory
(cost does not depend on the weights). torch is imported only for that export and for
the softmax_full reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np

from ifa_common.records import make_events
from service.engine.runtime import ModelRuntime

BUILD_SIZES = (1_000, 10_000, 100_000)
SCORE_SIZES = (1, 100, 500, 1_000)
EVICTED_SIZES = (1, 500)
# Written before each call of `_evicted_ms`: twice the reference box's L3 (32 MiB), so
# that the call finds none of its code or data in any cache: the bound of what a server's
# other work, and other tenants on shared caches, can evict between two of its calls
# (docs/performance.md, "a cold core").
EVICT_BYTES: Final = 64 << 20
REF_N, REF_M = 100_000, 500
T0 = 1_700_000_000


def _measure(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    before: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """(wall ms, process CPU ms), medians. CPU time is the figure to trust on a shared
    box: other processes stretch wall time but not the CPU this work needs. `before`
    runs ahead of each timed call, outside its time."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return float(np.median(wall)), float(np.median(cpu))


def _median_ms(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    before: Callable[[], Any] | None = None,
) -> float:
    return _measure(fn, repeats, warmup, before)[0]


def _evicted_ms(fn: Callable[[], Any], repeats: int) -> float:
    """fn's median ms when every cache level was emptied before each call."""
    buf = np.zeros(EVICT_BYTES // 8)

    def evict() -> None:
        buf[::8] += 1.0  # one write per 64-byte line evicts it from every level

    return _median_ms(fn, repeats, before=evict)


def _events(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return make_events(
        rng.integers(0, 20_000, n),
        T0 + np.sort(rng.integers(0, 3 * 365 * 86_400, n)),
        action=rng.integers(0, 4, n),
    )


# ModelConfig's defaults (model_export/model/config.py), spelled out so that the runtime
# part runs before anything imports torch.
DEFAULT_DIMS = {"heads": 4, "d_phi": 136, "d_head": 8, "d_model": 32, "item_buckets": 65_536}


def _runtime(artifacts: Path | None, tmp: Path) -> tuple[ModelRuntime, str]:
    """The artifact to time: `artifacts/latest` when it has the default dims, else a fresh
    export of an untrained default-config model."""
    want = DEFAULT_DIMS
    if artifacts is not None:
        try:
            rt = ModelRuntime.load(artifacts, None, intra_op_threads=1, prefer_cuda=False)
        except Exception:  # no artifact yet: fall through to a fresh export
            rt = None
        if rt is not None and all(rt.manifest["dims"].get(k) == v for k, v in want.items()):
            return rt, f"{artifacts}/{rt.version}"
    import torch

    from model_export.export import export_model
    from model_export.model import build_model, default_config

    cfg = default_config()
    torch.manual_seed(0)
    path = export_model(build_model(cfg).eval(), cfg, tmp, "bench", None, {"data_id": "untrained"})
    return ModelRuntime.load(tmp, path.name, intra_op_threads=1, prefer_cuda=False), "fresh export"


def _softmax_full_ms(n: int, m: int, repeats: int) -> tuple[float, float, int]:
    """PyTorch softmax_full forward (one request, N events, M candidates), default dims."""
    import torch

    from model_export.batch import UserBatch
    from model_export.model import build_model, default_config

    cfg = default_config(model="softmax_full")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batch = UserBatch(
        ev_item=torch.randint(0, cfg.item_buckets, (n,), generator=g),
        ev_cat=torch.randint(0, cfg.category_buckets, (n,), generator=g),
        ev_action=torch.randint(0, cfg.action_buckets, (n,), generator=g),
        ev_ts=torch.arange(n, dtype=torch.long) * 60 + T0,
        req_prefix=torch.tensor([n]),
        cand_item=torch.randint(0, cfg.item_buckets, (1, m), generator=g),
        cand_cat=torch.randint(0, cfg.category_buckets, (1, m), generator=g),
        cand_mask=torch.ones(1, m, dtype=torch.bool),
        label=torch.zeros(1, m),
        exposed=torch.ones(1, m, dtype=torch.bool),
    )
    # One thread, like the ORT sessions (IFA_INFER_THREADS=1): a like-for-like ratio, and
    # torch's OpenMP pool degrades badly when the box is oversubscribed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            wall, cpu = _measure(lambda: model(batch), repeats)
    finally:
        torch.set_num_threads(threads)
    return wall, cpu, 1


BATCH_SIZES: Final = (1, 4, 8, 16)
BATCH_M: Final = (500, 2000)


def _each(rt: ModelRuntime, state: Any, sets: list[np.ndarray]) -> None:
    for x in sets:
        rt.score(state, x)


def _batch_vs_separate(
    rt: ModelRuntime, state: Any, rng: np.random.Generator, repeats: int
) -> dict[str, dict[str, float]]:
    """Scorer ms per candidate set: B sets in one `score_batch` call against B separate
    `score` calls (what cross-request batching saves, or costs, on this machine)."""
    out: dict[str, dict[str, float]] = {}
    for m in BATCH_M:
        sets = [rng.integers(0, 20_000, m) for _ in range(max(BATCH_SIZES))]
        for b in BATCH_SIZES:
            states = [state] * b
            chosen = sets[:b]
            batched = _median_ms(partial(rt.score_batch, states, chosen), repeats * 3) / b
            separate = _median_ms(partial(_each, rt, state, chosen), repeats * 3) / b
            out[f"M={m} B={b}"] = {
                "batched_ms_per_set": batched,
                "separate_ms_per_set": separate,
                "speedup": separate / batched,
            }
    return out


def run_microbench(quick: bool, artifacts_dir: str | Path | None = "artifacts") -> dict[str, Any]:
    repeats = 3 if quick else 9
    rng = np.random.default_rng(1)
    load_start = list(os.getloadavg())
    out: dict[str, Any] = {"quick": quick, "repeats": repeats, "unit": "ms, median after warm-up"}
    with tempfile.TemporaryDirectory(prefix="ifa-microbench-") as tmp:
        rt, source = _runtime(Path(artifacts_dir) if artifacts_dir else None, Path(tmp))
        rt.warmup()
        out["artifact"] = source
        out["version"] = rt.version
        out["provider"] = rt.provider
        out["ort_intra_op_threads"] = 1
        out["dims"] = {k: rt.manifest["dims"][k] for k in ("heads", "d_phi", "d_head", "d_model")}

        histories = {n: _events(n, seed=n) for n in BUILD_SIZES}
        build: dict[str, float] = {}
        build_cpu: dict[str, float] = {}
        for n, ev in histories.items():
            reps = repeats if n < 100_000 else max(3, repeats // 2)
            build[str(n)], build_cpu[str(n)] = _measure(partial(rt.build_state, ev), reps)
        out["build_state_ms"], out["build_state_cpu_ms"] = build, build_cpu
        state = rt.build_state(histories[REF_N])
        cands = {m: rng.integers(0, 20_000, m) for m in SCORE_SIZES}
        score: dict[str, float] = {}
        score_cpu: dict[str, float] = {}
        for m, c in cands.items():
            score[str(m)], score_cpu[str(m)] = _measure(partial(rt.score, state, c), repeats * 5)
        out["score_ms"], out["score_cpu_ms"] = score, score_cpu
        out["score_evicted_ms"] = {
            str(m): _evicted_ms(partial(rt.score, state, cands[m]), repeats * 5)
            for m in EVICTED_SIZES
        }
        out["score_batch"] = _batch_vs_separate(rt, state, rng, repeats)
        new = _events(100, seed=7)
        new["ts"] += 3 * 365 * 86_400  # the new tail comes after the cached history
        out["fold_100_ms"], out["fold_100_cpu_ms"] = _measure(
            lambda: rt.fold(state, rt.build_state(new)), repeats * 5
        )
        tail = rt.build_state(new)
        out["fold_only_ms"] = _median_ms(partial(rt.fold, state, tail), repeats * 5)
        out["state_bytes"] = len(rt.serialize_state(state))

    soft_ms: dict[str, float] = {}
    soft_cpu: dict[str, float] = {}
    threads = 0
    for n in BUILD_SIZES:  # M = REF_M candidates at every N
        reps = (3 if quick else 5) if n >= REF_N else repeats
        soft_ms[str(n)], soft_cpu[str(n)], threads = _softmax_full_ms(n, REF_M, reps)
    out["softmax_full_ms"], out["softmax_full_cpu_ms"] = soft_ms, soft_cpu
    soft = out["softmax_full_ms_100k_500"] = soft_ms[str(REF_N)]
    out["torch_threads"] = threads
    warm = out["score_ms"][str(REF_M)]
    cold = out["build_state_ms"][str(REF_N)] + warm
    out["ifa_warm_ms"], out["ifa_cold_ms"] = warm, cold
    out["ratio_warm"], out["ratio_cold"] = soft / warm, soft / cold
    out["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_at_start": load_start,
        "load_avg_at_end": list(os.getloadavg()),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--artifacts", default="artifacts")
    args = p.parse_args(argv)
    print(json.dumps(run_microbench(args.quick, args.artifacts), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
