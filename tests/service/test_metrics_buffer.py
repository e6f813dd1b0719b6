"""The warm path's buffered metrics (service/metrics_buffer.py): what a scrape shows is
what writing every value through gives, a flush racing the observations loses nothing,
and a read of the registry is exact without a flush of one's own."""

from __future__ import annotations

import json
import random
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loadtest import metrics_cost
from service.metrics import LATENCY_BUCKETS, Metrics
from service.metrics_buffer import BufferedCounter, BufferedGauge, BufferedHistogram


def record(version: str, score_ms: float, cache: str = "hit") -> SimpleNamespace:
    timings = SimpleNamespace(queue=0.02, redis=0.0, state=0.01, score=score_ms, serialize=0.1)
    return SimpleNamespace(
        version=version,
        candidates=500,
        timings=timings,
        degraded=None,
        sequence_length=1_200,
        cache_result=cache,
        state_source="local",
    )


def exposition(metrics: Metrics) -> list[str]:
    """The scrape, less the `_created` timestamps (when each series was made)."""
    text = metrics.render()[0].decode()
    return [ln for ln in text.splitlines() if "_created" not in ln]


def test_buffered_histogram_counts_and_sums_as_observing_each_value() -> None:
    registry = CollectorRegistry()
    direct = Histogram("direct", "d", buckets=LATENCY_BUCKETS, registry=registry)
    child = Histogram("buffered", "b", buckets=LATENCY_BUCKETS, registry=registry)
    buffered = BufferedHistogram(child)
    rng = random.Random(7)
    # every bound exactly (a value equal to a bound is in that bucket), values past the
    # last bound (+Inf), zero, and a spread between
    values = [*LATENCY_BUCKETS, 0.0, 2.0, 50.0] + [rng.uniform(0, 1.2) for _ in range(2_000)]
    for i, v in enumerate(values):
        direct.observe(v)
        buffered.observe(v)
        if i % 333 == 0:
            buffered.flush()
    buffered.flush()
    buffered.flush()  # nothing new: adds nothing

    def samples(name: str) -> dict[tuple[str, str], float]:
        return {
            (s.name.removeprefix(name), s.labels.get("le", "")): s.value
            for family in registry.collect()
            if family.name == name
            for s in family.samples
            if not s.name.endswith("_created")
        }

    want, got = samples("direct"), samples("buffered")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert want["_bucket", "+Inf"] == len(values)
    # cumulative: a value equal to a bound counts in that bound's bucket
    assert want["_bucket", "0.0005"] == sum(v <= 0.0005 for v in values) >= 2


def test_buffered_counter_and_gauge_write_their_values_on_flush() -> None:
    registry = CollectorRegistry()
    counter = BufferedCounter(Counter("c", "c", registry=registry))
    gauge = BufferedGauge(Gauge("g", "g", registry=registry))
    counter.inc()
    counter.inc(2.5)
    gauge.inc()
    gauge.inc()
    gauge.dec()
    assert registry.get_sample_value("c_total") == 0  # not written yet
    counter.flush()
    gauge.flush()
    assert registry.get_sample_value("c_total") == 3.5
    assert registry.get_sample_value("g") == 1
    gauge.dec()
    counter.inc()
    counter.flush()
    gauge.flush()
    assert registry.get_sample_value("c_total") == 4.5
    assert registry.get_sample_value("g") == 0


def test_a_scrape_of_buffered_metrics_equals_writing_through() -> None:
    buffered, direct = Metrics(buffered=True), Metrics(buffered=False)
    for m in (buffered, direct):
        m.set_model("v1", "cpu")
        for i in range(300):
            m.inflight_now.inc()
            m.observe_rank(record("v1", 0.3 + i / 100, cache=("hit", "refresh", "miss")[i % 3]))
            m.inflight_now.dec()
            m.count_response("/rank", 200 if i % 10 else 503)
            m.observe_request("ok" if i % 10 else "rejected", "v1", (i + 1) / 1e4)
        m.inflight_now.inc()  # one still in flight at the scrape
    got, want = exposition(buffered), exposition(direct)
    assert got == want
    assert 'ifa_http_responses_total{code="503",route="/rank"} 30.0' in got
    assert "ifa_inflight_requests 1.0" in got
    assert 'ifa_state_cache_total{result="refresh"} 100.0' in got


def test_a_registry_read_flushes_first() -> None:
    metrics = Metrics()  # buffered, as the service runs
    metrics.set_model("v1", "cpu")
    metrics.observe_rank(record("v1", 0.5))
    metrics.count_response("/rank", 200)
    # no flush of the test's own: collecting the registry writes the buffers first
    labels = {"stage": "score", "version": "v1"}
    assert metrics.registry.get_sample_value("ifa_rank_stage_duration_seconds_count", labels) == 1
    assert (
        metrics.registry.get_sample_value(
            "ifa_http_responses_total", {"route": "/rank", "code": "200"}
        )
        == 1
    )


def test_observations_during_flushes_from_another_thread_are_never_lost() -> None:
    metrics = Metrics()
    metrics.set_model("v1", "cpu")
    stop = threading.Event()
    flushes = 0

    def flush_all_the_time() -> None:
        nonlocal flushes
        while not stop.is_set():
            metrics.flush()
            flushes += 1

    flusher = threading.Thread(target=flush_all_the_time)
    flusher.start()
    n = 20_000
    try:
        for _ in range(n):
            metrics.observe_request("ok", "v1", 0.004)
            metrics.count_response("/rank", 200)
    finally:
        stop.set()
        flusher.join()
    assert flushes > 10  # the flushes did interleave with the observations
    labels = {"outcome": "ok", "version": "v1"}
    read = metrics.registry.get_sample_value
    assert read("ifa_rank_request_duration_seconds_count", labels) == n
    assert read("ifa_rank_request_duration_seconds_sum", labels) == pytest.approx(n * 0.004)
    assert read("ifa_http_responses_total", {"route": "/rank", "code": "200"}) == n


def test_a_retired_version_takes_its_buffers_with_it() -> None:
    metrics = Metrics()
    metrics.set_model("v1", "cpu")
    metrics.observe_rank(record("v1", 0.5))
    for v in ("v2", "v3", "v4"):  # v1 falls out of the versions kept
        metrics.set_model(v, "cpu")
    metrics.observe_rank(record("v4", 0.5))
    text = "\n".join(exposition(metrics))
    assert 'version="v1"' not in text
    assert 'ifa_rank_stage_duration_seconds_count{stage="score",version="v4"} 1.0' in text
    assert not any(key[-1] == "v1" for key in metrics._buffers)


def test_metrics_cost_reports_each_case(capsys: pytest.CaptureFixture[str]) -> None:
    metrics_cost.main(["--blocks", "2", "--calls", "50"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "one process, buffered",
        "one process, written through",
        "worker, buffered",
        "worker, written through",
    }
    for figures in report.values():
        assert 0 < figures["us_per_request_min"] <= figures["us_per_request_median"]
