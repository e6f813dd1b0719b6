"""The engine's one cost model: fitted on warm-up timings, refined by observed reads."""

from __future__ import annotations

import pytest

from service.engine.cost import READ_MS_PER_RECORD, CostModel, Warmup


def test_fits_score_and_build_lines_through_the_warmup_timings() -> None:
    warm = Warmup(
        build_ms={0: 0.05, 256: 1.0 + 256 * 0.01, 4096: 1.0 + 4096 * 0.01},
        score_ms={1: 0.2 + 0.001, 500: 0.2 + 0.5, 1000: 0.2 + 1.0},
        chunk_events=1000,
    )
    cost = CostModel.from_warmup(warm)
    assert cost.score_ms(250) == pytest.approx(0.2 + 0.25)
    assert cost.build_fixed_ms == pytest.approx(1.0) and cost.build_per_event_ms == pytest.approx(
        0.01
    )
    # a build is one state-graph call per chunk: 2,500 events = 3 calls
    assert cost.build_ms(2500) == pytest.approx(3 * 1.0 + 2500 * 0.01)
    assert cost.build_ms(0) == 0.0


def test_too_few_points_keep_the_defaults_and_slopes_stay_positive() -> None:
    default = CostModel()
    one = CostModel.from_warmup(Warmup(score_ms={100: 0.7}))
    assert (
        one.score_fixed_ms == 0.7 and one.score_per_candidate_ms == default.score_per_candidate_ms
    )
    flat = CostModel.from_warmup(Warmup(score_ms={1: 0.5, 1000: 0.4}))  # noise, not a speedup
    assert flat.score_per_candidate_ms > 0


def test_reads_refine_the_per_record_estimate_and_short_reads_are_ignored() -> None:
    cost = CostModel()
    assert cost.read_ms(10_000) == pytest.approx(10_000 * READ_MS_PER_RECORD)
    cost.observe_read(10, 50.0)  # a short read is mostly the round trip
    assert cost.read_ms_per_record == READ_MS_PER_RECORD
    for _ in range(50):
        cost.observe_read(100_000, 4.0)  # 4e-5 ms a record
    assert cost.read_ms_per_record == pytest.approx(4e-5, rel=1e-3)


def test_what_an_answer_still_costs_is_the_scorer_now_and_the_work_around_it() -> None:
    cost = CostModel(score_fixed_ms=0.5, score_per_candidate_ms=0.001)
    assert cost.rest_ms_now(500) == pytest.approx(1.0)  # nothing observed yet: the fit
    for _ in range(200):
        cost.observe_score(500, 2.0)  # the scorer runs twice as slow under load
        cost.observe_around(0.6)  # ordering, serialisation, the envelope
    assert cost.score_ms_now(500) == pytest.approx(2.0, rel=1e-3)
    assert cost.rest_ms_now(500) == pytest.approx(2.6, rel=1e-3)
    cost.observe_around(-1.0)  # a clock read out of order counts as nothing, not less
    assert cost.around.mean >= 0
    noisy = CostModel(score_fixed_ms=0.5, score_per_candidate_ms=0.001)
    for i in range(400):  # the same mean, half the calls far slower: plan above the mean
        noisy.observe_score(500, 1.0 if i % 2 else 3.0)
        noisy.observe_around(0.2 if i % 2 else 1.0)
    assert noisy.score_load.mean == pytest.approx(2.0, rel=0.05)
    assert noisy.score_ms_now(500) > 1.5 * cost.score_ms_now(500)
    assert noisy.rest_ms_now(500) > noisy.score_ms_now(500) + 0.6 + 0.5
