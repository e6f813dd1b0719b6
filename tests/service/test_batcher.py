"""Cross-request batching: scores identical to one call per request, batches formed from
what queues behind a running one, the caps, a lone request scored at once, errors
handed to every request of a batch. The real exported scorer through ONNX Runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ifa_common.records import make_events
from ifa_common.state import UserState
from service.engine.batcher import ScoreBatcher
from service.engine.pool import InferencePool
from service.engine.runtime import ModelRuntime

T0 = 1_700_000_000


@pytest.fixture(scope="module")
def rt(tiny_artifacts: Path) -> ModelRuntime:
    return ModelRuntime.load(tiny_artifacts, "v1", prefer_cuda=False)


def requests(rt: ModelRuntime, n: int, seed: int) -> list[tuple[UserState, np.ndarray]]:
    """n users with histories of different lengths and candidate sets of different sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 300))
        events = make_events(rng.integers(0, 80, k), T0 + 60 * np.arange(k), rng.integers(0, 3, k))
        items = rng.integers(0, 100, int(rng.integers(1, 120))).astype(np.int64)
        out.append((rt.build_state(events) if i % 5 else rt.empty_state(), items))
    return out


def run_all(
    batcher: ScoreBatcher, rt: ModelRuntime, reqs: Sequence[tuple[UserState, np.ndarray]]
) -> list[np.ndarray]:
    """Every request at once; only the first is `alone` (as the first of a burst is)."""

    async def main() -> list[np.ndarray]:
        calls = (
            batcher.score(rt, s, x, cost_ms=1.0, alone=i == 0) for i, (s, x) in enumerate(reqs)
        )
        return list(await asyncio.gather(*calls))

    return asyncio.run(main())


def test_batched_scores_equal_one_call_per_request(rt: ModelRuntime) -> None:
    reqs = requests(rt, 9, seed=1)
    # the first call starts a batch in the pool at once; the other eight come while it
    # runs and queue behind it (a deterministic way to form batches)
    batcher = ScoreBatcher(InferencePool(2), max_delay_us=0, max_batch=4, inline_ms=0.0)
    got = run_all(batcher, rt, reqs)
    for (state, items), logits in zip(reqs, got, strict=True):
        assert logits.shape == items.shape
        np.testing.assert_allclose(logits, rt.score(state, items), rtol=0, atol=1e-6)
    assert batcher.stats.sizes == {1: 1, 4: 2}  # the lone first call, then full batches
    assert batcher.stats.requests == 9 and batcher.stats.inline == 0


def test_the_padded_cells_cap_splits_a_batch(rt: ModelRuntime) -> None:
    reqs = requests(rt, 7, seed=2)
    widths = [int(x.shape[0]) for _, x in reqs[1:]]
    batcher = ScoreBatcher(
        InferencePool(1), max_delay_us=0, max_batch=64, inline_ms=0.0, max_cells=2 * max(widths)
    )
    got = run_all(batcher, rt, reqs)
    for (state, items), logits in zip(reqs, got, strict=True):
        np.testing.assert_allclose(logits, rt.score(state, items), rtol=0, atol=1e-6)
    assert max(batcher.stats.sizes) <= 2 and batcher.stats.requests == 7


def test_a_request_alone_is_scored_at_once(rt: ModelRuntime) -> None:
    ((state, items),) = requests(rt, 1, seed=3)
    # a one-hour delay: were a lone request ever queued, this test would hang
    batcher = ScoreBatcher(InferencePool(1), max_delay_us=3.6e9, max_batch=8, inline_ms=5.0)
    (logits,) = run_all(batcher, rt, [(state, items)])
    np.testing.assert_array_equal(logits, rt.score(state, items))
    assert batcher.stats.inline == 1 and batcher.stats.batches == 0


def test_requests_queued_behind_a_batch_wait_for_it_not_for_the_delay(rt: ModelRuntime) -> None:
    reqs = requests(rt, 5, seed=4)
    batcher = ScoreBatcher(InferencePool(1), max_delay_us=3.6e9, max_batch=8, inline_ms=0.0)
    run_all(batcher, rt, reqs)  # would hang on the one-hour timer if they waited for it
    assert batcher.stats.sizes == {1: 1, 4: 1}


def test_under_concurrency_the_first_call_waits_the_delay_for_company(rt: ModelRuntime) -> None:
    reqs = requests(rt, 3, seed=6)
    batcher = ScoreBatcher(InferencePool(1), max_delay_us=1_000, max_batch=8, inline_ms=0.0)

    async def main() -> list[np.ndarray]:
        calls = (batcher.score(rt, s, x, cost_ms=1.0, alone=False) for s, x in reqs)
        return list(await asyncio.gather(*calls))

    got = asyncio.run(main())
    for (state, items), logits in zip(reqs, got, strict=True):
        np.testing.assert_allclose(logits, rt.score(state, items), rtol=0, atol=1e-6)
    assert batcher.stats.sizes == {3: 1}  # the timer's one batch holds all three


def test_cheap_calls_are_scored_inline_even_under_concurrency(rt: ModelRuntime) -> None:
    reqs = requests(rt, 6, seed=7)
    batcher = ScoreBatcher(InferencePool(1), max_delay_us=1_000, max_batch=8, inline_ms=5.0)
    got = run_all(batcher, rt, reqs)  # cost 1 ms < 5 ms: on the loop, no pool hop
    for (state, items), logits in zip(reqs, got, strict=True):
        np.testing.assert_array_equal(logits, rt.score(state, items))
    assert batcher.stats.inline == 6 and batcher.stats.batches == 0


class Failing:
    """A runtime whose scorer fails: every request of the batch must get the error."""

    def __init__(self, rt: ModelRuntime) -> None:
        self.rt = rt

    def score_batch(
        self, states: Sequence[UserState], items: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        raise RuntimeError("scorer failed")


def test_a_failed_batch_fails_each_of_its_requests(rt: ModelRuntime) -> None:
    reqs = requests(rt, 4, seed=5)
    batcher = ScoreBatcher(InferencePool(1), max_delay_us=0, max_batch=8, inline_ms=0.0)
    failing = Failing(rt)

    async def main() -> list[BaseException | np.ndarray]:
        calls = (
            batcher.score(failing, s, x, cost_ms=1.0, alone=i == 0)  # type: ignore[arg-type]
            for i, (s, x) in enumerate(reqs)
        )
        return list(await asyncio.gather(*calls, return_exceptions=True))

    outs = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "scorer failed" in str(o) for o in outs)
    assert batcher.stats.sizes == {1: 1, 3: 1}
