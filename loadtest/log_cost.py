"""What the impression log costs per record: the CPU of the process that writes it (the
service's event loop: queueing, laying out, redis-py's packing and the reply) and the
CPU of the Redis server that runs the writes, both read from /proc around the writes.

    python -m loadtest.log_cost [--m 500] [--records 3200] [--repeats 3] [--code DIR]

Records go in rounds of one full write (32), each round written before the next: the
steady state of a busy service, where the writer's batches are full. The loop is uvloop
where installed, as under `ifa-rank serve`. `--code DIR` imports `service` from another
checkout (e.g. `git worktree add /tmp/base <commit>`), so two versions of the writer can
be compared in turns on one box. Prints one JSON object: medians over the repeats, µs of
CPU per record.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from loadtest.sysinfo import proc_cpu_s

T = TypeVar("T")


async def settled(log: Any) -> None:
    """Every record queued so far written: `settled()`, or for a checkout from before it
    (`--code`), the writer's queue itself."""
    if hasattr(log, "settled"):
        await log.settled()
    else:
        await log._queue.join()


async def one_repeat(url: str, redis_pid: int, m: int, records: int) -> tuple[float, float]:
    import redis.asyncio as aioredis

    from service.store import impressions

    client = aioredis.Redis.from_url(url)
    dropped: list[int] = []
    log = impressions.ImpressionLog(
        client,
        shards=1,
        max_len=100_000,
        sample_rate=1.0,
        queue_size=records,
        timeout_s=10.0,
        on_logged=lambda n: None,
        on_dropped=lambda reason, n: dropped.append(n),
        linger_s=0.0,
    )
    log.start()
    rng = np.random.default_rng(0)
    items, scores = rng.integers(0, 100_000, m), rng.random(m)
    ids = [(uuid.uuid4().hex, f"user-{i % 8}") for i in range(records)]
    batch = impressions.BATCH
    try:
        mine, theirs = time.process_time(), proc_cpu_s(redis_pid)
        for start in range(0, records, batch):
            for request_id, user in ids[start : start + batch]:
                log.offer_impression(request_id, user, "v1", None, items, scores)
            await settled(log)
        mine, theirs = time.process_time() - mine, proc_cpu_s(redis_pid) - theirs
    finally:
        await log.close(1.0)
        await client.aclose()
    if dropped:
        raise RuntimeError(f"{sum(dropped)} records dropped")
    return mine / records * 1e6, theirs / records * 1e6


async def measure(m: int, records: int, repeats: int) -> dict[str, Any]:
    from service.store.embedded_redis import RedisServer, free_port

    with tempfile.TemporaryDirectory(prefix="ifa-log-cost-") as tmp:
        redis = RedisServer(Path(tmp), port=free_port(), persist=False).start()
        try:
            assert redis.proc is not None
            await one_repeat(redis.url, redis.proc.pid, m, records)  # fills the stream
            writer, server = [], []
            for _ in range(repeats):
                w, s = await one_repeat(redis.url, redis.proc.pid, m, records)
                writer.append(w)
                server.append(s)
        finally:
            redis.stop()
    return {
        "m": m,
        "records": records,
        "repeats": repeats,
        "writer_cpu_us_per_record": float(np.median(writer)),
        "redis_cpu_us_per_record": float(np.median(server)),
    }


def uvloop_run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=500, help="items per impression")
    p.add_argument("--records", type=int, default=3200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--code", default=None, help="import `service` from this checkout")
    a = p.parse_args(argv)
    if a.code is not None:
        sys.path.insert(0, str(Path(a.code).resolve()))
    # the loop the service runs on (`ifa-rank serve`: uvloop), whose writes differ
    run = asyncio.run if importlib.util.find_spec("uvloop") is None else uvloop_run
    out = run(measure(a.m, a.records, a.repeats))
    if a.code is not None:
        out["code"] = str(Path(a.code).resolve())
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
