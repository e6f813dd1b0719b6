"""POST /rank takes the fast path (service.http.fast_path, service.http.inline_rank: the
rules of our middlewares in one coroutine around the handler, no router, no FastAPI
endpoint machinery). Every answer must be the one the routed stack gives: the same
statuses, bodies, headers and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import make_settings, metric_value, seed_sequence, user

from service.app import create_app
from service.http.fast_path import RankApp


@pytest.fixture
def client(redis_url: str, tiny_artifacts: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(redis_url, tiny_artifacts, max_candidates=50))
    with TestClient(app) as c:
        yield c


HEADERS = ("content-type", "content-length", "connection", "retry-after")


def answer(client: TestClient, fast: bool, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    app = client.app
    assert isinstance(app, RankApp) and app.fast is not None
    saved = app.fast
    app.fast = saved if fast else None
    try:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        r = client.post("/rank", content=content, headers=headers, **kw)
    finally:
        app.fast = saved
    payload = r.json()
    head = {k: r.headers.get(k) for k in HEADERS}
    if r.status_code == 200:  # per-request fields differ between any two answers
        payload.pop("request_id")
        payload.pop("timings_ms")
        head.pop("content-length")
    return r.status_code, payload, head


BAD: list[Any] = [
    b"{not json",
    b"",
    {"user_id": "u", "candidates": []},
    {"user_id": "bad id!", "candidates": [1]},
    {"user_id": "u", "candidates": list(range(51))},  # over max_candidates
    {"user_id": "u", "candidates": [1], "budget_ms": -1},
    {"user_id": "u", "candidates": ["7"]},
    [1, 2, 3],
]


@pytest.mark.parametrize("body", BAD, ids=range(len(BAD)))
def test_bad_input_gets_the_routed_answer(client: TestClient, body: Any) -> None:
    fast, routed = answer(client, True, body), answer(client, False, body)
    assert fast == routed and fast[0] == 422, (fast, routed)


def test_an_answer_is_the_routed_answer_and_counted_alike(
    client: TestClient, redis_url: str
) -> None:
    u = user()
    seed_sequence(redis_url, u, 50)
    body = {"user_id": u, "candidates": [5, 1, 9, 1], "top_k": 3}
    before = metric_value(client, "ifa_http_responses_total", route="/rank", code="200")
    fast, routed = answer(client, True, body), answer(client, False, body)
    assert fast == routed and fast[0] == 200 and len(fast[1]["items"]) == 3
    after = metric_value(client, "ifa_http_responses_total", route="/rank", code="200")
    assert after - before == 2  # both counted by the same middleware
    ok = metric_value(client, "ifa_rank_request_duration_seconds_count", outcome="ok")
    assert ok >= 2


def test_only_post_rank_takes_it(client: TestClient) -> None:
    assert client.get("/rank").status_code == 405  # the router's answer, as before
    slash = client.post("/rank/", json={"user_id": "u", "candidates": [1]}, follow_redirects=False)
    assert slash.status_code == 307  # the router's redirect, as before
    assert "/rank" in client.get("/openapi.json").json()["paths"]  # still documented


def test_the_body_rules_answer_alike(client: TestClient) -> None:
    """Refused by Content-Length (before a byte of the body is read), or by size."""
    body = {"user_id": "u", "candidates": [1]}
    for headers, code in (({"content-length": "x1"}, 400), ({"content-length": "99999999"}, 413)):
        fast, routed = (answer(client, f, body, headers=headers) for f in (True, False))
        assert fast == routed and fast[0] == code, (fast, routed)
        assert fast[2]["connection"] == "close"
    # no Content-Length: refused while streaming, past the limit (1 MiB by default)
    part = b" " * 65_536
    codes = []
    for inline in (True, False):
        app = client.app
        assert isinstance(app, RankApp)
        saved = app.fast
        app.fast = saved if inline else None
        try:
            r = client.post("/rank", content=iter([b'{"user_id": "u",'] + [part] * 20))
        finally:
            app.fast = saved
        codes.append((r.status_code, r.json()))
    assert codes[0] == codes[1] and codes[0][0] == 413, codes


def test_a_draining_process_closes_alike(client: TestClient, redis_url: str) -> None:
    u = user()
    seed_sequence(redis_url, u, 10)
    app = client.app
    assert isinstance(app, RankApp)
    app.state.shutting_down = True
    try:
        for body in ({"user_id": u, "candidates": [3, 2]}, b"{not json"):
            fast, routed = answer(client, True, body), answer(client, False, body)
            assert fast == routed and fast[2]["connection"] == "close", (fast, routed)
    finally:
        app.state.shutting_down = False
    fast = answer(client, True, {"user_id": u, "candidates": [3, 2]})
    assert fast[0] == 200 and fast[2]["connection"] is None


def test_refusals_are_counted_alike(client: TestClient) -> None:
    def counts() -> tuple[float, float]:
        return (
            metric_value(client, "ifa_http_responses_total", route="/rank", code="422"),
            metric_value(client, "ifa_rank_request_duration_seconds_count", outcome="error"),
        )

    before = counts()
    answer(client, True, b"{not json")
    middle = counts()
    answer(client, False, b"{not json")
    after = counts()
    assert middle[0] - before[0] == 1 and after[0] - middle[0] == 1
    assert middle[1] - before[1] == 1 and after[1] - middle[1] == 1
