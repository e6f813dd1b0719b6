"""Eight writers appending with idempotency keys and retrying on failure, while Redis is
paused (SIGSTOP), resumed, then killed (SIGKILL) and restarted from its append-only file:
every answer is 200 or a 503 with Retry-After (never a 500, never a hang: 503s keep coming
while Redis is paused), and afterwards each user's sequence holds every acknowledged batch
exactly once. The real app, a real persisting redis-server (AOF, fsync every second)."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path

import redis
from fastapi.testclient import TestClient
from svc_helpers import T0, make_settings, user, wait_until

from ifa_common.records import unpack
from service.app import create_app
from service.store.embedded_redis import RedisServer
from service.store.redis_store import seq_key

WRITERS = 8
BATCH = 3


def test_writers_through_a_paused_then_killed_redis_lose_and_duplicate_nothing(
    private_redis: RedisServer, tiny_artifacts: Path
) -> None:
    settings = make_settings(
        private_redis.url, tiny_artifacts, redis_timeout_ms=200, redis_cooldown_ms=100
    )
    users = [user(f"w{i}") for i in range(WRITERS)]
    acked: dict[str, list[int]] = {u: [] for u in users}
    statuses: Counter[int] = Counter()
    retry_after: set[str | None] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def acks() -> int:
        with lock:
            return sum(len(v) for v in acked.values())

    def shed() -> int:
        with lock:
            return statuses[503]

    with TestClient(create_app(settings)) as client:

        def writer(u: str) -> None:
            k = 0
            while not stop.is_set():
                batch = [
                    {"item_id": k * BATCH + j, "ts": T0 + 10 * k + j, "action": 1}
                    for j in range(BATCH)
                ]
                body = {"user_id": u, "events": batch, "idempotency_key": f"{u}-{k}"}
                while True:  # a client that retries the same batch until it is acknowledged
                    r = client.post("/events", json=body)
                    with lock:
                        statuses[r.status_code] += 1
                        if r.status_code == 503:
                            retry_after.add(r.headers.get("retry-after"))
                    if r.status_code == 200:
                        with lock:
                            acked[u].append(k)
                        break
                    stop.wait(0.02)
                k += 1

        threads = [threading.Thread(target=writer, args=(u,)) for u in users]
        for t in threads:
            t.start()
        try:
            assert private_redis.proc is not None
            wait_until(lambda: acks() >= 80)
            os.kill(private_redis.proc.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: shed() >= 2 * WRITERS)  # answers keep coming: no hang
            finally:
                os.kill(private_redis.proc.pid, signal.SIGCONT)
            resumed = acks()
            wait_until(lambda: acks() >= resumed + 80)
            private_redis.kill()  # SIGKILL: no shutdown, no final save
            before = shed()
            wait_until(lambda: shed() > before)
            private_redis.start()  # reloads the append-only file
            restarted = acks()
            wait_until(lambda: acks() >= restarted + 80)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert set(statuses) <= {200, 503}, statuses
    assert retry_after and all(v is not None and v.isdigit() for v in retry_after), retry_after
    with redis.Redis.from_url(private_redis.url) as r:
        for u in users:
            events = unpack(r.get(seq_key(u)) or b"")
            batches = Counter((events["item_id"] // BATCH).tolist())
            assert all(c == BATCH for c in batches.values()), f"{u}: a batch stored twice"
            # every batch a writer sent was retried until acknowledged, so what is stored
            # is exactly what was acknowledged: nothing lost, nothing extra
            assert sorted(batches) == sorted(acked[u]), u
