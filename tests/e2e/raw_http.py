"""Helpers of the e2e tests that talk to a service over raw sockets."""

from __future__ import annotations

import json
import socket

import httpx
from e2e.uvicorn_proc import Service


def connect(svc: Service, timeout_s: float = 5.0) -> socket.socket:
    url = httpx.URL(svc.base_url)
    return socket.create_connection((url.host, url.port or 80), timeout=timeout_s)


def status(reply: bytes) -> int:
    """The status of a raw HTTP/1.1 reply (0: none)."""
    return int(reply[9:12]) if reply.startswith(b"HTTP/1.1 ") else 0


def json_detail(reply: bytes) -> str:
    """The `detail` of a raw reply's JSON error body (the app's error shape)."""
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str), detail
    return detail


def answers_normally(svc: Service) -> None:
    r = httpx.post(
        svc.base_url + "/rank", json={"user_id": "after", "candidates": [1, 2]}, timeout=10
    )
    assert r.status_code == 200
