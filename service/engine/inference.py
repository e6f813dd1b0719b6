"""The inference side of a request: the runtime seam, the executor, the loaded model slot.

ONNX Runtime releases the GIL, so `build_state` / `score` run in a small thread pool
(`IFA_INFER_WORKERS`) and the event loop keeps serving while they compute. The pool
tracks its backlog so the ranker can refuse work it could not start within the budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from ifa_common.state import UserState
from service.engine.state_cache import StateCache

T = TypeVar("T")


class Runtime(Protocol):
    """What the service uses of `service.runtime.ModelRuntime` (see docs/CONTRACTS.md)."""

    version: str
    provider: str
    providers: list[str]
    manifest: dict[str, Any]
    dims: tuple[int, int, int]

    def empty_state(self) -> UserState: ...
    def build_state(self, events: np.ndarray) -> UserState: ...
    def fold(self, state: UserState, partial: UserState) -> UserState: ...
    def score(self, state: UserState, items: np.ndarray) -> np.ndarray: ...
    def serialize_state(self, state: UserState) -> bytes: ...
    def deserialize_state(self, buf: bytes) -> UserState: ...
    def estimate_build_ms(self, n_events: int) -> float: ...


@dataclass
class ModelSlot:
    """One loaded model version with its own state cache and cost model.

    A request takes the slot once at its start and uses it to the end, so a reload
    (which swaps `Ranker.slot`) never mixes versions inside one request.
    """

    runtime: Runtime
    cache: StateCache
    warmup_ms: dict[str, float] = field(default_factory=dict)
    score_fixed_ms: float = 0.2
    score_per_candidate_ms: float = 0.001
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.runtime.version

    def calibrate(self, counts: Sequence[int]) -> None:
        """Fit score time = a + b * M on the warm-up timings (score_<M> entries)."""
        pts = [(m, self.warmup_ms[f"score_{m}"]) for m in counts if f"score_{m}" in self.warmup_ms]
        if len(pts) >= 2:
            ms = np.array([p[0] for p in pts], float)
            ts = np.array([p[1] for p in pts], float)
            b, a = np.polyfit(ms, ts, 1)
            self.score_per_candidate_ms = max(float(b), 1e-6)
            self.score_fixed_ms = max(float(a), 0.0)
        elif pts:
            self.score_fixed_ms = pts[0][1]

    def estimate_score_ms(self, m: int) -> float:
        return self.score_fixed_ms + self.score_per_candidate_ms * m


class InferencePool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ifa-infer")
        self.pending = 0  # jobs submitted and not finished (queued + running)
        self._job_ms = 1.0  # EWMA of a job's run time (not counting its queue wait)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        def job() -> tuple[T, float]:
            t0 = time.perf_counter()
            out = fn(*args)
            return out, (time.perf_counter() - t0) * 1e3

        loop = asyncio.get_running_loop()
        self.pending += 1
        try:
            out, ms = await loop.run_in_executor(self._executor, job)
        finally:
            self.pending -= 1
        self._job_ms += 0.1 * (ms - self._job_ms)
        return out

    def expected_wait_ms(self) -> float:
        """How long a job submitted now would wait before a worker picks it up."""
        queued = self.pending - self.workers + 1
        return 0.0 if queued <= 0 else queued * self._job_ms / self.workers

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
