"""Prometheus metrics: one registry per app, names and labels per DESIGN section 7.

Every label value the dashboards use is created up front, so a fresh process already
exposes each series at 0 (alerts on `rate(...)` work from the first scrape).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from service.metrics_buffer import (
    Buffered,
    BufferedCounter,
    BufferedGauge,
    BufferedHistogram,
    Incrementer,
    Observer,
    UpDown,
)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
B = TypeVar("B", bound=Buffered)

# 0.5 ms .. 1 s
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
)  # fmt: skip
CANDIDATE_BUCKETS: Final = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)
BATCH_BUCKETS: Final = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SEQUENCE_BUCKETS: Final = (0, 10, 100, 1_000, 10_000, 50_000, 100_000, 500_000, 1_000_000)

OUTCOMES: Final = ("ok", "degraded", "rejected", "error")
STAGES: Final = ("queue", "redis", "state", "score", "serialize")
# counted by HTTP code (a path with a parameter under its template)
API_ROUTES: Final = (
    "/rank",
    "/events",
    "/v1/model",
    "/admin/reload",
    "/admin/rollout",
    "/admin/rollout/promote",
    "/admin/rollout/drop",
    "/users/{user_id}",
)
CACHE_RESULTS: Final = ("hit", "refresh", "miss")
DEGRADED_REASONS: Final = ("partial_state", "stale_state", "no_history", "overloaded")
STATE_SOURCES: Final = ("local", "redis", "build")
FORGET_SOURCES: Final = ("request", "broadcast")
IMPRESSION_DROPS: Final = ("queue_full", "redis", "forgotten", "shutdown")
ROLES: Final = ("stable", "candidate", "shadow")
SHADOW_RESULTS: Final = ("scored", "skipped", "failed")
# The `version` of a /rank that never reached a model (a 422, no model loaded).
NO_VERSION: Final = "none"
# Versions no longer served whose request series are kept (the dashboard compares them
# across a swap); older ones are removed, so the label sets stay bounded over reloads.
RETIRED_VERSIONS_KEPT: Final = 2

CONTRACT_METRICS: Final = (
    "ifa_rank_request_duration_seconds",
    "ifa_rank_stage_duration_seconds",
    "ifa_state_cache_total",
    "ifa_rank_degraded_total",
    "ifa_rank_candidates",
    "ifa_sequence_length",
    "ifa_inflight_requests",
    "ifa_events_appended_total",
    "ifa_model_info",
)


class StageTimes(Protocol):
    queue: float  # ms
    redis: float
    state: float
    score: float
    serialize: float


class ServedVersion(NamedTuple):
    version: str
    provider: str
    role: str  # stable, candidate, shadow


class RankRecord(Protocol):
    """What an answered /rank leaves to be recorded (the engine's RankContext)."""

    @property
    def version(self) -> str: ...
    @property
    def candidates(self) -> int: ...
    @property
    def timings(self) -> StageTimes: ...
    @property
    def degraded(self) -> str | None: ...
    @property
    def sequence_length(self) -> int | None: ...
    @property
    def cache_result(self) -> str | None: ...
    @property
    def state_source(self) -> str | None: ...


class _FlushFirst(Collector):
    """Registered first: a read of the registry writes the buffered values before the
    metrics are collected, so every read of one process is exact."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()


class Metrics:
    """All of the service's metrics, registered in `self.registry` (never the global one).

    `buffered`: the warm path's values (`observe_rank`, `observe_request`,
    `count_response`, `inflight_now`) are counted in Python and written to their
    prometheus_client metrics by `flush` (service/metrics_buffer.py), which every read of
    the registry, and `render` under several workers, call first. Under several workers
    each also flushes on a timer (`flush_every`): another worker's scrape sees its values
    that much late at most."""

    def __init__(self, registry: CollectorRegistry | None = None, buffered: bool = True) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.buffered = buffered
        # keyed by what they count (a version's are dropped with it); flushed under a lock
        # since a registry read can come from another thread
        self._buffers: dict[tuple[str, ...], Buffered] = {}
        self._flush_lock = threading.Lock()
        r.register(_FlushFirst(self.flush))
        # prometheus_client chose its value store when it was imported, from the same
        # variable; the parent of several workers sets it (service/commands.py)
        self.multiprocess = MULTIPROC_ENV in os.environ
        self.request_duration = Histogram(
            "ifa_rank_request_duration_seconds",
            "POST /rank wall time, measured in ASGI middleware from the first byte in to the last "
            "byte out; outcome rejected = 503, error = any other 4xx/5xx (499: the client went away); "
            "version: the model version that answered (none: no model reached)",
            ["outcome", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "ifa_rank_stage_duration_seconds",
            "Time of one stage of a /rank request, by the model version that answered",
            ["stage", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.state_cache = Counter(
            "ifa_state_cache_total",
            "User-state lookups: hit (current), refresh (folded new events), miss (built)",
            ["result"],
            registry=r,
        )
        self.degraded = Counter(
            "ifa_rank_degraded_total",
            "Degraded /rank answers (and overload rejections) by reason and model version",
            ["reason", "version"],
            registry=r,
        )
        self.candidates = Histogram(
            "ifa_rank_candidates",
            "Candidates per /rank request",
            buckets=CANDIDATE_BUCKETS,
            registry=r,
        )
        self.sequence_length = Histogram(
            "ifa_sequence_length",
            "Events in the user's sequence at /rank time",
            buckets=SEQUENCE_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "ifa_inflight_requests",
            "/rank requests being served now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.events_appended = Counter(
            "ifa_events_appended_total",
            "Events appended to user sequences (idempotent replays not counted)",
            registry=r,
        )
        self.model_info = Gauge(
            "ifa_model_info",
            "The model versions being served (=1), their execution provider and role (stable, "
            "candidate, shadow: docs/deploy.md); a version no longer served is removed",
            ["version", "provider", "role"],
            registry=r,
            multiprocess_mode="livemax",  # several workers: 1 while any serves the version
        )
        # Beyond the contract.
        self.state_source = Counter(
            "ifa_state_source_total",
            "Where the user state of a /rank answer came from",
            ["source"],
            registry=r,
        )
        self.http_responses = Counter(
            "ifa_http_responses_total",
            "Responses of the API routes (health and metrics not counted)",
            ["route", "code"],
            registry=r,
        )
        self.redis_errors = Counter(
            "ifa_redis_errors_total",
            "Redis calls that failed or timed out",
            ["op"],
            registry=r,
        )
        self.background_builds = Counter(
            "ifa_background_builds_total",
            "Background state builds (completing a partial answer) by result: ok, failed",
            ["result"],
            registry=r,
        )
        self.score_batch_size = Histogram(
            "ifa_score_batch_size",
            "Candidate sets per scorer call run in the inference pool (cross-request "
            "batching; calls scored inline on the event loop are not counted)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.connections_moved = Counter(
            "ifa_connections_moved_total",
            "Connections answered with `Connection: close` because their worker held more than "
            "its share of the open connections (`ifa-rank serve --workers N`, "
            "IFA_BALANCE_CONNECTIONS); each client reconnects, maybe to another worker",
            registry=r,
        )
        self.connections_handed_off = Counter(
            "ifa_connections_handed_off_total",
            "Connections accepted by a worker over its share and passed, before a byte was "
            "read, to the worker furthest under it (SCM_RIGHTS; the client sees nothing)",
            registry=r,
        )
        self.push_channel_up = Gauge(
            "ifa_push_channel_up",
            "1 while Redis pushes sequence invalidations to this replica (warm requests then "
            "skip the Redis round trip), 0 while every request asks Redis",
            registry=r,
            multiprocess_mode="livemin",  # several workers: 1 only while all are up
        )
        self.push_invalidations = Counter(
            "ifa_push_invalidations_total",
            "Sequence invalidations received by push (appends anywhere, deletes, expiries)",
            registry=r,
        )
        self.users_forgotten = Counter(
            "ifa_users_forgotten_total",
            "Users forgotten (DELETE /users/{id}) by source: request (through this replica, "
            "after their data was deleted), broadcast (announced by another replica)",
            ["source"],
            registry=r,
        )
        self.forgotten_states = Counter(
            "ifa_forgotten_cached_states_total",
            "In-process cached user states dropped because their user was forgotten, by source "
            "(as ifa_users_forgotten_total)",
            ["source"],
            registry=r,
        )
        self.impressions_logged = Counter(
            "ifa_impressions_logged_total",
            "Impression-log records (answered /rank, clicks naming a request_id) written to "
            "the Redis Streams",
            registry=r,
        )
        self.impressions_dropped = Counter(
            "ifa_impressions_dropped_total",
            "Impression-log records dropped, by reason: queue_full (the writer fell behind), "
            "redis (unreachable or slow), forgotten (the user was forgotten meanwhile), "
            "shutdown (still queued at the stop)",
            ["reason"],
            registry=r,
        )
        self.shadow = Counter(
            "ifa_shadow_requests_total",
            "Requests sampled for the shadow version: scored (logged), skipped (too many "
            "shadow scorings in flight already), failed",
            ["result"],
            registry=r,
        )
        for result in SHADOW_RESULTS:
            self.shadow.labels(result)
        for reason in IMPRESSION_DROPS:
            self.impressions_dropped.labels(reason)
        for src in FORGET_SOURCES:
            self.users_forgotten.labels(src)
            self.forgotten_states.labels(src)
        for route in API_ROUTES:
            # a first 500 must be an increase from 0, or increase()-based alerts miss it
            self.http_responses.labels(route, "500")
        self._model_labels: set[ServedVersion] = set()
        # The warm path's series, resolved once (labels() per observation would cost a
        # lookup under a lock each): version -> its stages in STAGES order, (outcome,
        # version) -> latency, (route, code) -> responses.
        self._stages: dict[str, tuple[Observer, ...]] = {}
        self._outcomes: dict[tuple[str, str], Observer] = {}
        self._responses: dict[tuple[str, int], Incrementer] = {}
        self._candidates = self._observer(("candidates",), self.candidates)
        self._sequence_length = self._observer(("sequence_length",), self.sequence_length)
        self._cache_results = {
            c: self._counter(("state_cache", c), self.state_cache.labels(c)) for c in CACHE_RESULTS
        }
        self._state_sources = {
            s: self._counter(("state_source", s), self.state_source.labels(s))
            for s in STATE_SOURCES
        }
        self.inflight_now: UpDown = (
            self._keep(("inflight",), BufferedGauge(self.inflight)) if buffered else self.inflight
        )
        self._order: dict[str, None] = {}  # versions served, in the order they last were
        self._versioned(NO_VERSION)

    def _versioned(self, version: str) -> tuple[Observer, ...]:
        """Create every series of `version` (at 0, for rate() from the first scrape). The
        label sets stay bounded: a process sees only the versions it is told to serve."""
        stages = self._stages.get(version)
        if stages is None:
            stages = self._stages[version] = tuple(
                self._observer(("stage", s, version), self.stage_duration.labels(s, version))
                for s in STAGES
            )
            for o in OUTCOMES:
                self._outcomes[o, version] = self._observer(
                    ("outcome", o, version), self.request_duration.labels(o, version)
                )
            for reason in DEGRADED_REASONS:
                self.degraded.labels(reason, version)
        return stages

    def _keep(self, key: tuple[str, ...], buffer: B) -> B:
        self._buffers[key] = buffer
        return buffer

    def _observer(self, key: tuple[str, ...], child: Histogram) -> Observer:
        return self._keep(key, BufferedHistogram(child)) if self.buffered else child

    def _counter(self, key: tuple[str, ...], child: Counter) -> Incrementer:
        return self._keep(key, BufferedCounter(child)) if self.buffered else child

    def flush(self) -> None:
        """Write the buffered values to their prometheus_client metrics."""
        if not self._buffers:
            return
        with self._flush_lock:
            for buffer in list(self._buffers.values()):
                buffer.flush()

    async def flush_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.flush()

    def count_response(self, route: str, code: int) -> None:
        """ifa_http_responses_total (the request middleware's)."""
        counter = self._responses.get((route, code))
        if counter is None:
            child = self.http_responses.labels(route, str(code))
            counter = self._responses[route, code] = self._counter(
                ("response", route, str(code)), child
            )
        counter.inc()

    def observe_request(self, outcome: str, version: str | None, seconds: float) -> None:
        """ifa_rank_request_duration_seconds (the request middleware's)."""
        child = self._outcomes.get((outcome, version or NO_VERSION))
        if child is None:
            self._versioned(version or NO_VERSION)
            child = self._outcomes[outcome, version or NO_VERSION]
        child.observe(seconds)

    def observe_rank(self, rec: RankRecord) -> None:
        """Everything an answered /rank records, in one call once it is serialised (its
        wall time and HTTP outcome are the request middleware's, which sees every route)."""
        tm = rec.timings
        version = rec.version
        queue, redis, state, score, serialize = self._stages.get(version) or self._versioned(
            version
        )
        self._candidates.observe(rec.candidates)
        queue.observe(tm.queue / 1e3)
        redis.observe(tm.redis / 1e3)
        state.observe(tm.state / 1e3)
        score.observe(tm.score / 1e3)
        serialize.observe(tm.serialize / 1e3)
        if rec.sequence_length is not None:
            self._sequence_length.observe(rec.sequence_length)
        if rec.cache_result is not None:
            self._cache_results[rec.cache_result].inc()
        if rec.state_source is not None:
            self._state_sources[rec.state_source].inc()
        if rec.degraded is not None:
            self.degraded.labels(rec.degraded, version).inc()

    def set_model(self, version: str, provider: str) -> None:
        """One version serves, as the stable one."""
        self.set_models([ServedVersion(version, provider, "stable")])

    def set_models(self, served: list[ServedVersion]) -> None:
        """ifa_model_info: exactly the versions served now, with their roles."""
        for v in served:
            self._versioned(v.version)
        for gone in self._model_labels - set(served):
            if self.multiprocess:  # a removed series would live on in this worker's file
                self.model_info.labels(*gone).set(0)
            else:
                self.model_info.remove(*gone)
        self._model_labels = set(served)
        for v in served:
            self.model_info.labels(*v).set(1)
        self._retire({v.version for v in served})

    def _retire(self, serving: set[str]) -> None:
        for v in serving:  # most recent last
            self._order.pop(v, None)
            self._order[v] = None
        retired = [v for v in self._order if v not in serving]
        for v in retired[: max(0, len(retired) - RETIRED_VERSIONS_KEPT)]:
            del self._order[v]
            self._stages.pop(v, None)
            for o in OUTCOMES:
                self._outcomes.pop((o, v), None)
                self._buffers.pop(("outcome", o, v), None)
                self._remove(self.request_duration, o, v)
            for s in STAGES:
                self._buffers.pop(("stage", s, v), None)
                self._remove(self.stage_duration, s, v)
            for reason in DEGRADED_REASONS:
                self._remove(self.degraded, reason, v)

    @staticmethod
    def _remove(metric: Histogram | Counter, *labels: str) -> None:
        with contextlib.suppress(KeyError):  # never created under these labels
            metric.remove(*labels)

    def render(self) -> tuple[bytes, str]:
        if not self.multiprocess:  # collecting the registry flushes first (_FlushFirst)
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.flush()  # the merged view reads this worker's file, not its registry
        # Several workers (`ifa-rank serve --workers N`): every worker's values, merged
        # from the files they write under PROMETHEUS_MULTIPROC_DIR.
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """This worker is going away: write what it counted, and drop its live gauges from
        the merged view."""
        self.flush()
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
