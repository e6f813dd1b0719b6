"""Hand-made hostile inputs against a real uvicorn process: deeply nested JSON, 64 KB of
headers, a body that stops arriving, a 10 MB body. Each gets a 4xx or a closed
connection, never a 500 or a stuck request, and the next request is answered normally."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e.raw_http import answers_normally, connect, status
from e2e.uvicorn_proc import Service, start_service

from service.store.embedded_redis import RedisServer


@pytest.fixture(scope="module")
def svc(
    redis_server: RedisServer, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("hostile") / "service.log"
    service = start_service(redis_server, tiny_artifacts, log, IFA_BODY_TIMEOUT_S="1")
    yield service
    assert service.stop(), log.read_text()[-3000:]


def raw(svc: Service, payload: bytes, then_wait_s: float = 10.0) -> bytes:
    """Send bytes, read until the server answers and closes (or `then_wait_s` passes)."""
    with connect(svc, then_wait_s) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if (
                    b"\r\n\r\n" in b"".join(chunks)
                    and b"connection: close" not in b"".join(chunks).lower()
                ):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def test_deeply_nested_json_is_a_422(svc: Service) -> None:
    body = b'{"user_id": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b', "candidates": [1]}'
    for path in ("/rank", "/events", "/admin/reload"):
        r = httpx.post(
            svc.base_url + path, content=body, headers={"content-type": "application/json"}
        )
        assert 400 <= r.status_code < 500, (path, r.status_code)
    answers_normally(svc)


def test_64_kb_of_headers_are_refused(svc: Service) -> None:
    headers = b"".join(b"x-filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(64))
    reply = raw(svc, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
    assert reply == b"" or 400 <= status(reply) < 500, reply[:200]  # 400 or closed
    answers_normally(svc)


def test_a_body_that_stops_arriving_is_a_408(svc: Service) -> None:
    head = (
        b"POST /rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n"
    )
    reply = raw(svc, head + b'{"user_id": "slow"', then_wait_s=15)  # then nothing
    assert status(reply) == 408, reply[:200]
    answers_normally(svc)


def test_a_10_mb_body_is_a_413(svc: Service) -> None:
    r = httpx.post(
        svc.base_url + "/rank",
        content=b"[" + b"1," * 5_000_000 + b"1]",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    answers_normally(svc)
