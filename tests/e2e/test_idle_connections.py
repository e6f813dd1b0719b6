"""Idle and slow connections against a real uvicorn process (raw sockets): a connection
that never completes a request head is closed after IFA_HEADER_TIMEOUT_S, connections
past IFA_MAX_CONNECTIONS are refused at once, and ordinary keep-alive clients and slow
bodies are untouched. Every socket operation has a timeout: nothing here can hang."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.raw_http import answers_normally, connect, json_detail, status
from e2e.uvicorn_proc import Service, start_service

from service.store.embedded_redis import RedisServer

HEAD_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 20
SLACK_S = 3.0  # scheduling on a busy machine; the bounds are the configured timeouts


@pytest.fixture(scope="module")
def svc(
    redis_server: RedisServer, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("idle") / "service.log"
    service = start_service(
        redis_server,
        tiny_artifacts,
        log,
        IFA_HEADER_TIMEOUT_S=str(HEAD_TIMEOUT_S),
        IFA_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    yield service
    assert service.stop(), log.read_text()[-3000:]


def until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, str]:
    """Read until the server closes (`eof` or `reset`) or `limit_s` passes (`open`)."""
    deadline = time.monotonic() + limit_s
    data = b""
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return data, "eof"
            data += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        return data, "reset"
    return data, "open"


def rank_request(user: str) -> bytes:
    body = json.dumps({"user_id": user, "candidates": [1, 2, 3]}).encode()
    return (
        b"POST /rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


def read_response(sock: socket.socket) -> int:
    """One HTTP/1.1 response with a content-length (the service's): its status."""
    sock.settimeout(10.0)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert len(body) == length, "more than one response"
    return status(head)


def test_a_connection_that_sends_nothing_is_closed(svc: Service) -> None:
    with connect(svc) as sock:
        start = time.monotonic()
        reply, how = until_closed(sock, HEAD_TIMEOUT_S + SLACK_S)
        took = time.monotonic() - start
    print(f"\nsilent connection: {how} after {took:.2f} s (timeout {HEAD_TIMEOUT_S} s)")
    assert how in ("eof", "reset") and reply == b"", (how, reply[:200])
    assert took >= HEAD_TIMEOUT_S * 0.5
    answers_normally(svc)


def test_slow_headers_are_closed_with_a_408(svc: Service) -> None:
    """A byte of headers every 0.2 s: each resets nothing, the head is due from connecting."""
    with connect(svc) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        reply, how, sent = b"", "open", 0
        while how == "open" and time.monotonic() - start < HEAD_TIMEOUT_S + SLACK_S:
            try:
                sock.sendall(b"a")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                how = "reset"
                break
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                reply, how = until_closed(sock, SLACK_S)
        took = time.monotonic() - start
    print(f"\nslow headers ({sent} bytes dripped): {how} after {took:.2f} s, {reply[:30]!r}")
    assert how in ("eof", "reset"), how
    assert reply == b"" or status(reply) == 408, reply[:200]
    if reply:
        assert "request head not received" in json_detail(reply), reply
    assert HEAD_TIMEOUT_S * 0.5 <= took <= HEAD_TIMEOUT_S + SLACK_S
    answers_normally(svc)


def test_a_head_stalled_after_a_response_is_closed_with_a_408(svc: Service) -> None:
    """Between requests uvicorn's keep-alive timer runs, and stops at the next byte: the
    head timeout then bounds the rest of that head."""
    with connect(svc) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert read_response(sock) == 200
        sock.sendall(b"GET /healthz HT")  # then nothing
        start = time.monotonic()
        reply, how = until_closed(sock, HEAD_TIMEOUT_S + SLACK_S)
        took = time.monotonic() - start
    print(f"\nhead stalled after a response: {how} after {took:.2f} s, {reply[:30]!r}")
    assert how in ("eof", "reset"), how
    assert status(reply) == 408 or reply == b"", reply[:200]
    if reply:
        assert "request head not received" in json_detail(reply), reply
    assert took >= HEAD_TIMEOUT_S * 0.5
    answers_normally(svc)


def test_connections_over_the_cap_are_refused_and_idle_ones_closed(svc: Service) -> None:
    opened = 60
    socks = [connect(svc) for _ in range(opened)]
    start = time.monotonic()
    try:
        # A request while the cap is full: a 503 or a closed connection, never a hang.
        with connect(svc) as extra:
            try:
                extra.sendall(rank_request("over-the-cap"))
                reply, how = until_closed(extra, SLACK_S)
            except (BrokenPipeError, ConnectionResetError):
                reply, how = b"", "reset"
        print(f"\nrequest while full: {how}, {reply[:40]!r}")
        assert how in ("eof", "reset"), how
        assert reply == b"" or status(reply) == 503, reply[:200]
        if reply:
            assert b"retry-after: 1" in reply.lower()
            assert json_detail(reply).startswith("too many connections"), reply

        # The refused ones were answered at once; the others hold until the head timeout.
        closed_at: dict[int, float] = {}
        replies: dict[int, bytes] = {}
        while len(closed_at) < opened and time.monotonic() - start < HEAD_TIMEOUT_S + SLACK_S:
            open_ = [s for i, s in enumerate(socks) if i not in closed_at]
            readable, _, _ = select.select(open_, [], [], 0.05)
            for s in readable:
                i = socks.index(s)
                replies[i], _ = until_closed(s, 1.0)
                closed_at[i] = time.monotonic() - start
        refused = [i for i, r in replies.items() if status(r) == 503]
        timed_out = [i for i in closed_at if i not in refused]
        held = opened - len(refused)
        close_s = sorted(closed_at[i] for i in timed_out) or [0.0]
        print(
            f"{opened} idle connections, cap {MAX_CONNECTIONS}: {held} held, "
            f"{len(refused)} refused with 503 (by {max((closed_at[i] for i in refused), default=0):.2f} s), "
            f"{len(timed_out)} closed by the head timeout between {close_s[0]:.2f} s and "
            f"{close_s[-1]:.2f} s, {opened - len(closed_at)} still open"
        )
        assert held <= MAX_CONNECTIONS
        assert len(closed_at) == opened, "a connection outlived the head timeout"
        assert all(closed_at[i] < HEAD_TIMEOUT_S * 0.5 for i in refused)
        assert all(replies[i] == b"" for i in timed_out)
    finally:
        for s in socks:
            s.close()
    answers_normally(svc)


def test_a_keep_alive_client_is_never_closed(svc: Service) -> None:
    """50 requests on one connection, over several head timeouts in all; one pause
    between two requests is longer than the head timeout (idle between requests is the
    keep-alive timeout's: 60 s in the tests' uvicorn command, 5 s under `ifa-rank serve`)."""
    gaps = [0.02, 0.05, 0.1, 0.3]
    with connect(svc) as sock:
        start = time.monotonic()
        statuses = []
        for i in range(50):
            sock.sendall(rank_request(f"keep-alive-{i % 5}"))
            statuses.append(read_response(sock))
            time.sleep(HEAD_TIMEOUT_S * 1.5 if i == 25 else gaps[i % len(gaps)])
        took = time.monotonic() - start
    print(f"\nkeep-alive client: {len(statuses)} requests on one connection over {took:.2f} s")
    assert statuses == [200] * 50
    assert took > 3 * HEAD_TIMEOUT_S


def test_a_slow_body_is_not_cut_by_the_head_timeout(svc: Service) -> None:
    """Once the head is in, the body has IFA_BODY_TIMEOUT_S (10 s here) per part."""
    request = rank_request("slow-body")
    head, _, body = request.partition(b"\r\n\r\n")
    with connect(svc) as sock:
        start = time.monotonic()
        sock.sendall(head + b"\r\n\r\n")
        third = len(body) // 3
        for part in (body[:third], body[third : 2 * third], body[2 * third :]):
            time.sleep(HEAD_TIMEOUT_S * 0.8)
            sock.sendall(part)
        code = read_response(sock)
        took = time.monotonic() - start
    print(f"\nslow body: {code} after {took:.2f} s")
    assert code == 200
    assert took > 2 * HEAD_TIMEOUT_S
