"""Garbage in: every case is a 4xx with a message naming the problem, never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import make_settings

from service.app import create_app

OK_RANK: dict[str, Any] = {"user_id": "u1", "candidates": [1, 2]}
OK_EVENT: dict[str, Any] = {"item_id": 1, "ts": 1}


@pytest.fixture(scope="module")
def client(redis_server: Any, tiny_artifacts: Path) -> Iterator[TestClient]:
    if not redis_server.running():
        redis_server.start()
    settings = make_settings(
        redis_server.url,
        tiny_artifacts,
        max_candidates=50,
        max_events_per_call=5,
        max_body_bytes=4096,
    )
    with TestClient(create_app(settings)) as c:
        yield c


RANK_CASES = [
    ({**OK_RANK, "candidates": []}, "candidates"),
    ({**OK_RANK, "candidates": list(range(51))}, "candidates"),
    ({**OK_RANK, "candidates": ["a"]}, "candidates.0"),
    ({**OK_RANK, "candidates": ["1"]}, "candidates.0"),
    ({**OK_RANK, "candidates": [1.5]}, "candidates.0"),
    ({**OK_RANK, "candidates": [True]}, "candidates.0"),
    ({**OK_RANK, "candidates": [-1]}, "candidates.0"),
    ({**OK_RANK, "candidates": [2**63]}, "candidates.0"),
    ({**OK_RANK, "candidates": "1,2"}, "candidates"),
    ({**OK_RANK, "candidates": None}, "candidates"),
    ({"user_id": "u1"}, "candidates"),
    ({**OK_RANK, "user_id": "x" * 129}, "user_id"),
    ({**OK_RANK, "user_id": ""}, "user_id"),
    ({**OK_RANK, "user_id": "a b"}, "user_id"),
    ({**OK_RANK, "user_id": "u{1}"}, "user_id"),
    ({**OK_RANK, "user_id": "ü"}, "user_id"),
    ({**OK_RANK, "user_id": 42}, "user_id"),
    ({**OK_RANK, "top_k": 0}, "top_k"),
    ({**OK_RANK, "top_k": -3}, "top_k"),
    ({**OK_RANK, "top_k": "5"}, "top_k"),
    ({**OK_RANK, "budget_ms": 0}, "budget_ms"),
    ({**OK_RANK, "budget_ms": -1}, "budget_ms"),
    ({**OK_RANK, "budget_ms": "fast"}, "budget_ms"),
    ({**OK_RANK, "budget_ms": 1e300}, "budget_ms"),
    ({**OK_RANK, "request_id": "x" * 200}, "request_id"),
    ([1, 2, 3], "body"),
    ("hello", "body"),
]


@pytest.mark.parametrize(("body", "field"), RANK_CASES)
def test_rank_rejects_bad_input_naming_the_field(client: TestClient, body: Any, field: str) -> None:
    r = client.post("/rank", json=body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["error"].startswith(f"{field}:"), out
    assert out["detail"] and "input" not in out["detail"][0]  # nothing echoed back


EVENT_CASES = [
    ({"user_id": "u1", "events": []}, "events"),
    ({"user_id": "u1", "events": [OK_EVENT] * 6}, "events"),
    ({"user_id": "u1", "events": [{"ts": 1}]}, "events.0.item_id"),
    ({"user_id": "u1", "events": [{"item_id": 1}]}, "events.0.ts"),
    ({"user_id": "u1", "events": [{**OK_EVENT, "ts": -5}]}, "events.0.ts"),
    ({"user_id": "u1", "events": [{**OK_EVENT, "ts": 1.5}]}, "events.0.ts"),
    ({"user_id": "u1", "events": [{**OK_EVENT, "category": -1}]}, "events.0.category"),
    ({"user_id": "u1", "events": [{**OK_EVENT, "action": 2**31}]}, "events.0.action"),
    ({"user_id": "u1", "events": [{**OK_EVENT, "item_id": "7"}]}, "events.0.item_id"),
    ({"user_id": "u1", "events": [OK_EVENT], "idempotency_key": ""}, "idempotency_key"),
    ({"user_id": "u1", "events": [OK_EVENT], "idempotency_key": "a b"}, "idempotency_key"),
    ({"user_id": "bad id", "events": [OK_EVENT]}, "user_id"),
]


@pytest.mark.parametrize(("body", "field"), EVENT_CASES)
def test_events_rejects_bad_input_naming_the_field(
    client: TestClient, body: Any, field: str
) -> None:
    r = client.post("/events", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(f"{field}:"), r.json()


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"\xff\xfe", b'{"user_id": "u1", "candidates": [1,', b"null", b"[]"],
)
def test_non_json_bodies_are_4xx_with_a_message(client: TestClient, raw: bytes) -> None:
    for path in ("/rank", "/events"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, raw, r.status_code, r.text)
        assert r.json()["error"]


def test_wrong_content_type_is_4xx(client: TestClient) -> None:
    r = client.post("/rank", content=b"user_id=u1", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500 and r.json()["error"]


def test_oversize_body_is_413(client: TestClient) -> None:
    big = {"user_id": "u1", "candidates": list(range(2000))}  # > 4096 bytes
    r = client.post("/rank", json=big)
    assert r.status_code == 413 and "4096" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"user_id": "u1", "candidates": ['
        for _ in range(100):
            yield b"1," * 50
        yield b"1]}"

    r = client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_unknown_routes_and_methods_are_4xx_json(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404
    r = client.get("/rank")
    assert r.status_code == 405 and r.json()["detail"]


def test_extreme_but_valid_values_are_served(client: TestClient) -> None:
    r = client.post(
        "/rank",
        json={
            "user_id": "a" * 128,
            "candidates": [0, 2**63 - 1],
            "top_k": 10**30,
            "budget_ms": 0.001,
        },
    )
    assert r.status_code == 200, r.text
    extreme = {"item_id": 2**63 - 1, "ts": 2**63 - 1, "category": 2**63 - 1, "action": 2**31 - 1}
    r = client.post(
        "/events",
        json={"user_id": "u.x@y:z-_", "events": [extreme, {"item_id": 0, "ts": 0}]},
    )
    assert r.status_code == 200, r.text
    r = client.post("/rank", json={"user_id": "u.x@y:z-_", "candidates": [0, 2**63 - 1]})
    assert r.status_code == 200, r.text
    assert all(isinstance(it["score"], float) for it in r.json()["items"])  # NaN would be null
