"""The open-loop driver against a tiny asyncio HTTP server that serves one request at a
time in `SERVICE_S`: below capacity latency is about the service time; above it, the
backlog grows and the latency from the intended send time shows it (a closed loop would
not: it slows down with the server)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace

import uvloop

from loadtest import report
from loadtest.bench_http import open_loop
from loadtest.bench_plan import BenchPlan
from loadtest.httpload import build_request, run_load_async
from loadtest.openloop import reference_rate, run_open_loop_async

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


@contextlib.asynccontextmanager
async def one_at_a_time() -> AsyncIterator[tuple[int, list[bytes]]]:
    """The one-at-a-time server, serving while in the block: its port and a request."""
    server, port = await serve_one_at_a_time()
    async with server:
        yield port, [build_request("POST", "/x", b"{}", host=f"127.0.0.1:{port}")]


def test_open_loop_counts_the_backlog_a_closed_loop_hides() -> None:
    async def main() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        async with one_at_a_time() as (port, reqs):
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


def test_open_loop_throughput_above_capacity_is_the_servers_pace() -> None:
    """Offered twice what the server can do, the answers come at the server's pace
    (`served_rps`), while `rps`, whose window opens at the warm-up's backlog, reads less."""

    async def main() -> tuple[dict[str, float], dict[str, float]]:
        async with one_at_a_time() as (port, reqs):
            over = await run_open_loop_async(
                "127.0.0.1", port, reqs, rate=400, duration_s=1.0, warmup_s=0.5, connections=4
            )
            closed = await run_load_async(
                "127.0.0.1", port, reqs, concurrency=4, duration_s=1.0, warmup_s=0.2
            )
        return over.summary(), closed.summary()

    over, closed = asyncio.run(main())
    assert over["served_rps"] < 0.75 * over["target_rps"]
    assert over["rps"] < over["served_rps"]
    # the same pace a closed loop measures on the same server
    assert 0.7 < over["served_rps"] / closed["rps"] < 1.3


def test_reference_rate_is_the_lower_of_the_two_saturated_rates() -> None:
    assert reference_rate(1000.0, 800.0) == 800.0
    assert reference_rate(1000.0, 1200.0) == 1000.0
    assert reference_rate(1000.0, 0.0) == 1000.0  # a ceiling that answered nothing


def test_bench_open_loop_takes_its_fractions_of_what_the_server_answered_beside_it() -> None:
    """The bench told a closed-loop rate five times this server's capacity runs its
    loads at fractions of what the server answered beside the open-loop generator."""
    started: queue.Queue[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]] = queue.Queue()

    async def serve() -> None:
        async with one_at_a_time() as (port, _):
            done = asyncio.Event()
            started.put((asyncio.get_running_loop(), done, port))
            await done.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    loop, done, port = started.get(timeout=10)
    plan = dataclasses.replace(
        BenchPlan.make(quick=True, duration=1.0),
        warmup_s=0.3,
        open_loop_fractions=(0.5,),
        open_loop_connections=4,
        open_loop_ceiling_connections=4,
    )
    svc = SimpleNamespace(host="127.0.0.1", port=port)
    try:
        out = open_loop(svc, plan, [b"{}"], {"rank_warm_c16": {"rps": 1000.0}})
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(timeout=10)
    capacity = 1 / SERVICE_S
    assert out["saturated_rps"] == 1000.0
    assert 0 < out["ceiling_rps"] <= 1.05 * capacity  # one request at a time, 5 ms each
    assert out["reference_rps"] == out["ceiling_rps"]
    half = out["runs"]["0.5"]
    assert half["target_rps"] == 0.5 * out["reference_rps"]
    assert half["errors"] == 0
    assert "beside the open-loop generator" in report._ceiling_text(out)


def test_open_loop_sleeps_between_sends_due_under_a_millisecond_apart() -> None:
    """At 2,000 req/s a send is due every 0.5 ms, under the event loop's timer resolution
    (uvloop's, the bench's loop: a millisecond): a loop that waited for it would spin
    through the gaps, a core's worth of the box the service needs. The generator's CPU
    time per request (process CPU, not wall time) stays under half the gap; the loop's
    own timers took 558 µs a request here."""

    async def main() -> dict[str, float]:
        async with one_at_a_time() as (port, reqs):
            r = await run_open_loop_async(
                "127.0.0.1", port, reqs, rate=2000, duration_s=1.0, warmup_s=0.2, connections=4
            )
        return r.summary()

    # the bench's loop; the runner cancels the server's handlers still queued at the end
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        r = runner.run(main())
    assert r["sent"] == 2400
    period_us = 1e6 / r["target_rps"]
    assert r["client_cpu_us_per_req"] < 0.5 * period_us
