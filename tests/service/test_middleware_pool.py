"""Unit tier for the HTTP middlewares (on a bare app, no Redis, no model) and the
inference pool (its backlog estimate is what admission control reads)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from svc_helpers import registry_value

from service.engine.pool import InferencePool
from service.http.middleware import (
    ARRIVED,
    BodyLimitMiddleware,
    BodyRules,
    RequestMetricsMiddleware,
    install_error_handlers,
)
from service.metrics import Metrics


def bare_app(metrics: Metrics, limit: int = 64) -> FastAPI:
    app = FastAPI()

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        body = await request.body()
        if body == b"busy":
            return Response(status_code=503)
        request.state.degraded = "stale_state" if body == b"stale" else None
        return Response(b"{}", media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"{}", media_type="application/json")

    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, rules=BodyRules(limit))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return registry_value(metrics.registry, name, **labels)


def test_body_limit_by_content_length_and_while_streaming() -> None:
    metrics = Metrics()
    with TestClient(bare_app(metrics, limit=64)) as client:
        r = client.post("/rank", content=b"x" * 65)
        assert r.status_code == 413 and "64 bytes" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b"x" * 40
            yield b"x" * 40

        r = client.post("/rank", content=chunks())
        assert r.status_code == 413
        assert client.post("/rank", content=b"x" * 64).status_code == 200
    assert sample(metrics, "ifa_http_responses_total", route="/rank", code="413") == 2


def test_request_metrics_count_rank_outcomes_and_skip_health() -> None:
    metrics = Metrics()
    with TestClient(bare_app(metrics)) as client:
        client.post("/rank", content=b"ok")
        client.post("/rank", content=b"stale")
        client.post("/rank", content=b"busy")
        client.get("/healthz")
    count = "ifa_rank_request_duration_seconds_count"
    assert sample(metrics, count, outcome="ok") == 1
    assert sample(metrics, count, outcome="degraded") == 1
    assert sample(metrics, count, outcome="rejected") == 1
    assert sample(metrics, "ifa_http_responses_total", route="/rank", code="200") == 2
    assert (
        metrics.registry.get_sample_value(
            "ifa_http_responses_total", {"route": "/healthz", "code": "200"}
        )
        is None
    )  # health and metrics endpoints are not requests


def test_request_duration_runs_from_the_arrival_stamp() -> None:
    """Under `ifa-rank serve` the protocol stamps a request as its first byte is parsed;
    the wait for the event loop before any middleware runs is part of its duration."""
    metrics = Metrics()
    app = bare_app(metrics)

    async def stamped(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})[ARRIVED] = time.perf_counter() - 0.050  # waited 50 ms
        await app(scope, receive, send)

    with TestClient(stamped) as client:
        assert client.post("/rank", content=b"ok").status_code == 200
    took = sample(metrics, "ifa_rank_request_duration_seconds_sum", outcome="ok")
    assert took >= 0.050
    with TestClient(bare_app(fresh := Metrics())) as client:  # no stamp: from the middleware
        client.post("/rank", content=b"ok")
    assert sample(fresh, "ifa_rank_request_duration_seconds_sum", outcome="ok") < took


def test_pool_reports_its_backlog_and_returns_results_and_errors() -> None:
    async def run() -> None:
        pool = InferencePool(1)
        release = threading.Event()
        assert pool.expected_wait_ms() == 0.0  # idle: a job starts at once
        blocked = asyncio.ensure_future(pool.run(release.wait, 30))
        queued = asyncio.ensure_future(pool.run(lambda: 7))
        await asyncio.sleep(0)  # both submitted
        assert pool.pending == 2
        assert pool.expected_wait_ms() > 0.0  # the one worker is taken
        release.set()
        assert await blocked is True and await queued == 7
        assert pool.pending == 0 and pool.expected_wait_ms() == 0.0

        def boom() -> None:
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            await pool.run(boom)
        assert pool.pending == 0
        await pool.shutdown()

    asyncio.run(run())
