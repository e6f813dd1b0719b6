"""Helpers for the service tests (imported as `svc_helpers`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ifa_common.records import make_events, pack
from service.app import create_app
from service.settings import Settings
from service.store.redis_store import seq_key

T0 = 1_700_000_000


class ClusterUrl(str):
    """The URL of a Redis Cluster node (the `redis_any` fixture's cluster case): the
    helpers below give it to redis-py's cluster client and set IFA_REDIS_CLUSTER."""


def sync_redis(url: str) -> Any:
    """A sync client for the test's own reads and writes: one Redis or the cluster."""
    if isinstance(url, ClusterUrl):
        return redis.RedisCluster.from_url(url)
    return redis.Redis.from_url(url)


def make_settings(redis_url: str | None, artifacts: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_cluster": isinstance(redis_url, ClusterUrl),
        "artifacts_dir": artifacts,
        "model_version": "v1",
        "warmup_candidates": (1, 16),
        "infer_workers": 2,
        "default_budget_ms": 10_000,  # tests assert behaviour, not speed
        "redis_timeout_ms": 1_000,
        "redis_cooldown_ms": 100,
    }
    values.update(overrides)
    return Settings(**values)


def user(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def random_events(n: int, seed: int = 0, t0: int = T0) -> list[dict[str, int]]:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 80, n)  # some with a known category (< 50), some without
    cats = rng.integers(0, 9, n)
    acts = rng.integers(0, 3, n)
    out = []
    for i in range(n):
        ev = {"item_id": int(items[i]), "ts": t0 + 3600 * i, "action": int(acts[i])}
        if i % 3:
            ev["category"] = int(cats[i])
        out.append(ev)
    return out


def seed_sequence(url: str, user_id: str, n: int, seed: int = 0) -> None:
    """Write n records straight into Redis (long histories without n/1000 HTTP calls)."""
    rng = np.random.default_rng(seed)
    events = make_events(
        rng.integers(0, 80, n),
        T0 + np.arange(n, dtype=np.int64) * 60,
        rng.integers(0, 9, n),
        rng.integers(0, 3, n),
    )
    with sync_redis(url) as client:
        client.append(seq_key(user_id), pack(events))


def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
    *,
    what: str = "condition",
    tolerate: tuple[type[BaseException], ...] = (),
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll until predicate() is truthy and return its value: the one wait helper of the
    tests. The limit bounds a hang, it is not a speed check. Exceptions in `tolerate` count
    as "not yet"; on timeout the last value (or exception) and `detail()` are reported."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = predicate()
        except tolerate as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"{what}: not reached in {timeout_s:g} s (last: {last!r}){extra}")
        time.sleep(interval_s)


def metric_value(client: TestClient, name: str, **labels: str) -> float:
    """The sum of the samples of the app's /metrics that carry `labels` (0 when none):
    the value of one sample when `labels` name it whole, else the sum over the labels left
    out (e.g. `version`)."""
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


def registry_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """As `metric_value`, from a registry."""
    return sum(
        float(s.value)
        for family in registry.collect()
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@contextmanager
def push_and_strict(
    url: str, artifacts: Path, **push_overrides: Any
) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps (replicas) on one Redis: the default push warm check (with the given
    settings) and a strict one, whose answers are the reference. Their impression logs
    are off: the log's writes are script calls too, and these tests count the ranker's."""
    quiet = {"impression_log": False}
    with ExitStack() as stack:
        push = stack.enter_context(
            TestClient(create_app(make_settings(url, artifacts, **quiet, **push_overrides)))
        )
        strict = stack.enter_context(
            TestClient(create_app(make_settings(url, artifacts, **quiet, warm_check="strict")))
        )
        yield push, strict
