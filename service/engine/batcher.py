"""Cross-request batching of scorer calls (what Triton's dynamic batcher does).

Concurrent requests whose states are ready queue their candidate sets here; one scorer
call over the padded batch (`score_batch`: the scorer graph's batch axis) answers them
all. A queue is flushed after `max_delay_us` from its first request, at once when it
holds `max_batch` sets or `max_cells` padded candidates, and at once when the batch
before it finishes (those requests have already waited a whole batch). One batch runs
at a time in the inference pool, off the event loop: the loop keeps parsing, reading
Redis and serialising on the other core while ONNX Runtime (which releases the GIL)
scores.

A call whose estimated cost is under `inline_ms` is scored at once, inline on the event
loop, batched or not: on a CPU, ONNX Runtime's cost per candidate set does not fall with
the batch at these sizes (`make bench`: `score_batch` against separate calls), while the
two GIL handoffs of a pool hop cost more than a sub-millisecond scorer call. Batching is
for the calls that go to the pool (long candidate lists, heavier models, a GPU, where a
batch is one kernel launch instead of many). Such a call that finds nothing running
starts a batch at once when it is `alone` (no other request in flight) or the delay is 0;
otherwise it waits at most `max_delay_us` for company. One that finds a batch running
waits for it, and joins the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ifa_common.state import UserState
from service.engine.pool import InferencePool
from service.engine.slot import Runtime

DEFAULT_MAX_CELLS: Final = 32_768  # padded candidates per batch: bounds padding waste


@dataclass(slots=True)
class _Job:
    state: UserState
    items: np.ndarray
    done: asyncio.Future[np.ndarray]


@dataclass
class _Queue:
    """The jobs of one runtime (model version) waiting for the next batch."""

    rt: Runtime
    jobs: list[_Job] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None

    def cells(self) -> int:
        return len(self.jobs) * max(int(j.items.shape[0]) for j in self.jobs)


@dataclass
class BatchStats:
    """Counts for the metrics and the bench: batches run and the requests they held."""

    batches: int = 0
    requests: int = 0
    inline: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> batches

    def add(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.sizes[size] = self.sizes.get(size, 0) + 1


class ScoreBatcher:
    def __init__(
        self,
        pool: InferencePool,
        max_delay_us: float,
        max_batch: int,
        inline_ms: float,
        max_cells: int = DEFAULT_MAX_CELLS,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.pool = pool
        self.max_delay_s = max(0.0, max_delay_us) / 1e6
        self.max_batch = max(1, max_batch)
        self.inline_ms = inline_ms
        self.max_cells = max(1, max_cells)
        self.stats = BatchStats()
        self._on_batch = on_batch
        self._queues: dict[int, _Queue] = {}
        self._running = False  # a batch is in the pool now

    async def score(
        self,
        rt: Runtime,
        state: UserState,
        items: np.ndarray,
        cost_ms: float,
        alone: bool = False,
    ) -> np.ndarray:
        """Logits (M,) of `items` for `state`, as `rt.score(state, items)` gives them.
        `alone`: no other request is in flight, so none can join a batch."""
        if cost_ms < self.inline_ms:
            self.stats.inline += 1
            return rt.score(state, items)
        key = id(rt)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(rt)
        done: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        queue.jobs.append(_Job(state, items, done))
        if self._running:
            pass  # the running batch's completion flushes this queue
        elif alone or self.max_delay_s == 0 or self._full(queue):
            self._flush(key)
        elif queue.timer is None:
            queue.timer = asyncio.get_running_loop().call_later(self.max_delay_s, self._flush, key)
        return await done

    def _full(self, queue: _Queue) -> bool:
        return len(queue.jobs) >= self.max_batch or queue.cells() >= self.max_cells

    def _take(self, queue: _Queue) -> list[_Job]:
        """The longest prefix of the queue within max_batch and max_cells (at least one)."""
        width = 0
        for count, job in enumerate(queue.jobs):
            width = max(width, int(job.items.shape[0]))
            if count == self.max_batch or (count and (count + 1) * width > self.max_cells):
                break
        else:
            count = len(queue.jobs)
        taken, queue.jobs = queue.jobs[:count], queue.jobs[count:]
        return taken

    def _flush(self, key: int) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        if self._running or not queue.jobs:
            return
        jobs = self._take(queue)
        if not queue.jobs:
            del self._queues[key]
        self._running = True
        asyncio.get_running_loop().create_task(self._run(queue.rt, jobs))

    async def _run(self, rt: Runtime, jobs: list[_Job]) -> None:
        try:
            outs = await self.pool.run(
                rt.score_batch, [j.state for j in jobs], [j.items for j in jobs]
            )
        except BaseException as e:
            for j in jobs:
                if not j.done.done():
                    j.done.set_exception(e)
            if not isinstance(e, Exception):
                raise
        else:
            for j, out in zip(jobs, outs, strict=True):
                if not j.done.done():  # its request may have been cancelled meanwhile
                    j.done.set_result(out)
        finally:
            self._running = False
            self._record(len(jobs))
            self._kick()

    def _record(self, size: int) -> None:
        self.stats.add(size)
        if self._on_batch is not None:
            self._on_batch(size)

    def _kick(self) -> None:
        """A batch finished: what queued behind it has waited long enough."""
        for key in list(self._queues):
            self._flush(key)
            if self._running:
                return
