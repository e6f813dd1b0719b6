"""An answer first, its bookkeeping after (service/http/answered.py): the bookkeeping runs
once the whole answer is sent, a failure in it is logged and changes nothing the client
got, and the request's measured duration ends at the send, not after the bookkeeping."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import MutableMapping
from typing import Any

import pytest
from svc_helpers import registry_value

from service.http.answered import AnsweredThen
from service.http.middleware import ARRIVED, RequestMetricsMiddleware
from service.metrics import Metrics


def _scope(path: str = "/rank", arrived: float | None = None) -> dict[str, Any]:
    state = {} if arrived is None else {ARRIVED: arrived}
    return {"type": "http", "method": "POST", "path": path, "headers": [], "state": state}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def test_the_bookkeeping_runs_once_the_answer_is_sent() -> None:
    sent: list[MutableMapping[str, Any]] = []
    seen_then: list[list[str]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    def then() -> None:
        seen_then.append([m["type"] for m in sent])

    asyncio.run(AnsweredThen(b'{"a":1}', then)(_scope(), _receive, send))
    assert seen_then == [["http.response.start", "http.response.body"]]
    assert sent[1]["body"] == b'{"a":1}'
    assert (b"content-type", b"application/json") in sent[0]["headers"]


def test_a_failure_after_the_answer_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    def then() -> None:
        raise RuntimeError("the metrics are gone")

    with caplog.at_level(logging.ERROR, logger="service.http.answered"):
        asyncio.run(AnsweredThen(b"{}", then)(_scope(), _receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert "after an answer failed" in caplog.text and "the metrics are gone" in caplog.text


def test_the_request_duration_ends_at_the_send() -> None:
    metrics = Metrics()
    then_at: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await AnsweredThen(b"{}", lambda: then_at.append(time.perf_counter()))(scope, receive, send)
        await asyncio.sleep(0.01)  # more work after the answer, in the same request

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    arrived = time.perf_counter()
    asyncio.run(RequestMetricsMiddleware(app, metrics)(_scope(arrived=arrived), _receive, send))
    name = "ifa_rank_request_duration_seconds"
    assert registry_value(metrics.registry, f"{name}_count", outcome="ok") == 1
    duration = registry_value(metrics.registry, f"{name}_sum", outcome="ok")
    # measured to the send: before the bookkeeping began, so before the sleep
    assert 0 < duration <= then_at[0] - arrived
