"""The app's own time per warm /rank, in process: the ASGI app called directly (no
sockets, no load generator), a real Redis, the served model. On a box whose loopback is
slow or noisy this still compares two variants of the request path, because the variants
run as alternating blocks in one process and the drift falls on both alike.

    python -m loadtest.asgi_cost [--artifacts DIR] [--compare fast|log] [--blocks 40]

`--compare fast`: POST /rank through the router and FastAPI's endpoint machinery against
the fast path (service.http.fast_path); `--compare log`: the impression log off against
on. Prints one JSON object: median µs per request of each variant over the blocks, the
paired median difference (b - a), the same for the loop's whole time per request (the
background work the requests leave, such as the impression writer's, included), /healthz,
and the scorer alone on the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

USERS = 8
EVENTS = 100_000
ITEMS = 100_000
BODIES = 32


def _set_fast(app: Any, on: bool, saved: dict[str, Any]) -> None:
    saved.setdefault("fast", app.fast)
    app.fast = saved["fast"] if on else None


def _set_log(app: Any, on: bool, saved: dict[str, Any]) -> None:
    saved.setdefault("log", app.state.impressions)
    app.state.impressions = saved["log"] if on else None


COMPARISONS: dict[str, tuple[str, str, Callable[[Any, bool, dict[str, Any]], None]]] = {
    "fast": ("routed", "fast", _set_fast),
    "log": ("log_off", "log_on", _set_log),
}


def scope_of(method: str, path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {"arrived": time.perf_counter()},
    }


async def call(app: Any, method: str, path: str, body: bytes = b"") -> int:
    """One request through the ASGI app; its status."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the answer is sent first
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope_of(method, path, body), receive, send)
    return int(sent[0]["status"])


async def block_us(
    app: Any, method: str, path: str, bodies: list[bytes], n: int
) -> tuple[float, float]:
    """(median µs of one request, µs of the block's wall time per request) over n
    requests, yielding to the loop between them so the push channel, the impression
    writer and the re-checks run as in a server. The first is the request path alone;
    the second adds what the requests leave for the loop to do in the background."""
    times = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        status = await call(app, method, path, bodies[i % len(bodies)])
        times.append(time.perf_counter() - t)
        if status != 200:
            raise RuntimeError(f"{method} {path} answered {status}")
        await asyncio.sleep(0)
    wall = time.perf_counter() - start
    return float(np.median(times) * 1e6), wall / n * 1e6


async def measure(
    artifacts: str,
    compare: str,
    blocks: int,
    block: int,
    m: int,
    progress: bool = True,
    events: int = EVENTS,
) -> dict[str, Any]:
    from loadtest.bench_measure import rank_body
    from loadtest.seed import connect, seed_synthetic
    from service.app import create_app
    from service.settings import Settings
    from service.store.embedded_redis import RedisServer, free_port

    with tempfile.TemporaryDirectory(prefix="ifa-asgi-cost-") as tmp:
        redis = RedisServer(Path(tmp), port=free_port(), persist=False).start()
        try:
            client = connect(redis.url)
            seed_synthetic(
                client, USERS, EVENTS, items=ITEMS, prefix="warm", seed=11, progress=False
            )
            client.close()
            settings = Settings(
                redis_url=redis.url,
                artifacts_dir=Path(artifacts),
                infer_threads=1,
                infer_workers=2,
                log_level="warning",
            )
            app = create_app(settings)
            rng = np.random.default_rng(0)
            bodies = [
                rank_body(f"warm-{i % USERS}", rng.integers(0, ITEMS, m).tolist())
                for i in range(BODIES)
            ]
            async with app.router.lifespan_context(app):
                for body in bodies * 2:  # built, then verified: warm
                    await call(app, "POST", "/rank", body)
                slot = app.state.rank.registry.slot
                state = slot.cache.get("warm-0")
                items = np.asarray(json.loads(bodies[0])["candidates"], np.int64)
                score = []
                for _ in range(200):
                    t = time.perf_counter()
                    slot.runtime.score(state, items)
                    score.append(time.perf_counter() - t)
                healthz, _ = await block_us(app, "GET", "/healthz", [b""], 500)
                name_a, name_b, toggle = COMPARISONS[compare]
                saved: dict[str, Any] = {}
                a: list[tuple[float, float]] = []
                b: list[tuple[float, float]] = []
                for k in range(blocks):
                    toggle(app, False, saved)
                    a.append(await block_us(app, "POST", "/rank", bodies, block))
                    toggle(app, True, saved)
                    b.append(await block_us(app, "POST", "/rank", bodies, block))
                    if progress:
                        print(f"\rblock {k + 1}/{blocks}", end="", file=sys.stderr, flush=True)
                if progress:
                    print(file=sys.stderr)
        finally:
            redis.stop()
    return {
        "m": m,
        "blocks": blocks,
        "requests_per_block": block,
        f"{name_a}_us": float(np.median([x for x, _ in a])),
        f"{name_b}_us": float(np.median([x for x, _ in b])),
        "paired_diff_us": float(np.median(np.subtract(b, a)[:, 0])),
        # the loop's whole time per request, the background work the requests leave
        # included (the impression writer's packing and sends): what bounds the rate
        f"{name_a}_loop_us": float(np.median([w for _, w in a])),
        f"{name_b}_loop_us": float(np.median([w for _, w in b])),
        "paired_loop_diff_us": float(np.median(np.subtract(b, a)[:, 1])),
        "healthz_us": healthz,
        "score_alone_us": float(np.median(score) * 1e6),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--artifacts", default=None, help="default: IFA_ARTIFACTS_DIR or artifacts/")
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="fast")
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--block", type=int, default=100, help="requests per block")
    p.add_argument("--m", type=int, default=500, help="candidates per request")
    args = p.parse_args(argv)
    from loadtest.bench import resolve_artifacts

    with tempfile.TemporaryDirectory(prefix="ifa-asgi-cost-model-") as tmp:
        import os

        given = args.artifacts or os.environ.get("IFA_ARTIFACTS_DIR", "artifacts")
        artifacts, _ = resolve_artifacts(given, Path(tmp))
        result = asyncio.run(measure(artifacts, args.compare, args.blocks, args.block, args.m))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
