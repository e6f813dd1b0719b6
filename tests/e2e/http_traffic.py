"""Traffic for the scale-out tests: /rank readers and idempotent /events writers against
real service processes, everything they saw recorded for the assertions.

A writer appends one event per call, item id = its running count, under the idempotency
key `<user>:<count>`, and retries the same call until it gets a 200 (what a well-behaved
client does with a 503): afterwards each user's stored sequence must hold exactly
0, 1, 2, ... once each.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class Http:
    """One keep-alive connection (reopened after an error)."""

    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, self.timeout_s)
            self._conn.request("POST", path, json.dumps(body).encode(), headers)
            r = self._conn.getresponse()
            payload = r.read()
            return r.status, json.loads(payload) if payload else None
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            self.close()
            return -1, repr(e)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class RankAnswer:
    t: float
    user: str
    status: int
    degraded: str | None


@dataclass
class Traffic:
    """`readers` threads ranking `users` round robin, one writer thread per writer user."""

    port: int
    users: list[str]
    writers: list[str]
    readers: int = 2
    candidates: list[int] = field(default_factory=lambda: list(range(20)))
    answers: list[RankAnswer] = field(default_factory=list)
    event_statuses: list[int] = field(default_factory=list)
    refused_writers: set[str] = field(default_factory=set)  # writers answered 503 at least once
    client_errors: list[str] = field(default_factory=list)  # no HTTP answer (status -1)
    acked: dict[str, int] = field(default_factory=dict)  # user -> events acknowledged
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Traffic:
        for i in range(self.readers):
            self._threads.append(threading.Thread(target=self._read, args=(i,), daemon=True))
        for user in self.writers:
            self._threads.append(threading.Thread(target=self._write, args=(user,), daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
            assert not t.is_alive(), "a traffic thread did not stop"

    def _read(self, offset: int) -> None:
        http = Http(self.port)
        i = offset
        while not self._stop.is_set():
            user = self.users[i % len(self.users)]
            i += 1
            status, body = http.post("/rank", {"user_id": user, "candidates": self.candidates})
            degraded = body.get("degraded") if status == 200 and isinstance(body, dict) else None
            with self._lock:
                if status == -1:
                    self.client_errors.append(f"{time.monotonic():.3f} /rank {body}")
                self.answers.append(RankAnswer(time.monotonic(), user, status, degraded))
        http.close()

    def _write(self, user: str) -> None:
        http = Http(self.port)
        count = 0
        while not self._stop.is_set():
            body = {
                "user_id": user,
                "events": [{"item_id": count, "ts": 1_700_000_000 + count}],
                "idempotency_key": f"{user}:{count}",
            }
            status, answer = http.post("/events", body)
            with self._lock:
                self.event_statuses.append(status)
                if status == 503:
                    self.refused_writers.add(user)
                if status == -1:
                    self.client_errors.append(f"{time.monotonic():.3f} /events {answer}")
            if status == 200:
                count += 1
                self.acked[user] = count
                time.sleep(0.01)
            else:
                time.sleep(0.05)  # retried with the same key
        http.close()

    def since(self, t: float) -> list[RankAnswer]:
        with self._lock:
            return [a for a in self.answers if a.t >= t]
