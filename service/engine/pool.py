"""The inference thread pool. ONNX Runtime releases the GIL, so `build_state` / `score`
run in a small pool (`IFA_INFER_WORKERS`) and the event loop keeps serving while they
compute. The pool tracks its backlog so the rank use case can refuse work it could not
start within the budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


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
