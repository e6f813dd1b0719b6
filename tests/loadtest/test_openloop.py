"""The open-loop driver against a tiny asyncio HTTP server that serves one request at a
time in `SERVICE_S`: below capacity latency is about the service time; above it, the
backlog grows and the latency from the intended send time shows it (a closed loop would
not: it slows down with the server)."""

from __future__ import annotations

import asyncio

from loadtest.httpload import build_request, run_load_async
from loadtest.openloop import run_open_loop_async

SERVICE_S = 0.005  # capacity 200 req/s


async def serve_one_at_a_time() -> tuple[asyncio.Server, int]:
    lock = asyncio.Lock()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                async with lock:
                    await asyncio.sleep(SERVICE_S)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_open_loop_counts_the_backlog_a_closed_loop_hides() -> None:
    async def main() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        server, port = await serve_one_at_a_time()
        reqs = [build_request("POST", "/x", b"{}", host=f"127.0.0.1:{port}")]
        async with server:
            under = await run_open_loop_async(
                "127.0.0.1", port, reqs, rate=50, duration_s=1.0, warmup_s=0.2, connections=8
            )
            over = await run_open_loop_async(
                "127.0.0.1", port, reqs, rate=400, duration_s=1.0, warmup_s=0.2, connections=8
            )
            closed = await run_load_async(
                "127.0.0.1", port, reqs, concurrency=8, duration_s=1.0, warmup_s=0.2
            )
        return under.summary(), over.summary(), closed.summary()

    under, over, closed = asyncio.run(main())
    assert under["sent"] == 60 and under["errors"] == 0 and under["unanswered"] == 0
    assert over["sent"] == 480 and over["errors"] == 0  # all answered, late
    # Twice the capacity for a second: the backlog, not the service time, sets the tail.
    assert over["p99_ms"] > 20 * under["p50_ms"]
    assert over["rps"] < 0.75 * over["target_rps"]  # the server kept its own pace
    # the closed loop at 8 connections sees only 8 requests ahead of each one
    assert closed["p99_ms"] < over["p99_ms"] / 4
