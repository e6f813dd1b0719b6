"""Helpers for the service tests (imported as `svc_helpers`)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ifa_common.records import make_events, pack
from service.settings import Settings
from service.store import seq_key

T0 = 1_700_000_000


def make_settings(redis_url: str | None, artifacts: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
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
    with redis.Redis.from_url(url) as client:
        client.append(seq_key(user_id), pack(events))


def wait_until(predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.05) -> Any:
    """Poll until predicate() is truthy; generous limit, it bounds a hang, not a speed."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval_s)


def metric_value(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample of the app's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0
