"""Open-loop HTTP load: requests sent at a fixed arrival rate, whatever the server does.

A closed loop (wrk, locust users, `loadtest.httpload`) sends the next request only when
the last answer came, so a slow server is sent less and its tail is hidden (coordinated
omission). Here request i is due at `start + i / rate`; its latency runs from that
intended time, not from when a connection was free to send it. Requests wait in the
client's queue when every connection is busy, and that wait counts.

    res = run_open_loop("127.0.0.1", 8000, reqs, rate=800, duration_s=5, connections=64)
    res.summary()  # latencies from the intended send time; "achieved_rps", "late_ms_p99"

Sends are released by a thread that sleeps to each due time and wakes the loop
(`_Ticker`); every request due by then goes at once, and the client's own lateness (a
busy loop, the thread's wake-up) is counted too.
Requests still unanswered `drain_s` after the last was due are counted as errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, cast

import numpy as np

from loadtest.httpload import LoadResult, parse_head, run_fresh

PR_SET_TIMERSLACK: Final = 29  # prctl(2)


class _Conn(asyncio.Protocol):
    def __init__(self, run: _OpenRun) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
        self.intended = 0
        self.status = 0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.run.release(self)

    def send(self, intended_ns: int, req: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.buf.clear()
        self.need = -1
        self.intended = intended_ns
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            head = parse_head(self.buf)
            if head is None:
                return
            self.status, self.need = head
            if self.need < 0:  # no Content-Length
                self.run.record(self.intended, 0, ok=False)
                self.close()
                return
        if len(self.buf) >= self.need:
            self.busy = False
            self.run.record(self.intended, self.status, ok=True)
            self.run.release(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.busy = False
            self.run.record(self.intended, 0, ok=False)
        self.transport = None
        self.run.lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Ticker(threading.Thread):
    """Wakes the event loop at each request's intended send time.

    The loop's own timers have a resolution of a millisecond (libuv's, under uvloop): a
    loop waiting for a send due in under a millisecond spins, and one due in 0.5-1 ms
    fires a millisecond later. Against a server in another process answering 20 KB, the
    loop alone took 0.2-0.3 ms of CPU a request at 700-1,300 req/s (a core's worth at
    2,000: CPU the service needs on a 2-core box) and sent up to 0.5 ms late at 1,300 (p99).
    This thread sleeps to each due time and asks the loop to send what is due (`pump`):
    0.08 ms of CPU a request, sends 0.05-0.1 ms late (p99)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pump: Callable[[], None],
        start_ns: int,
        period_ns: float,
        total: int,
    ) -> None:
        super().__init__(name="openloop-ticker", daemon=True)
        self.loop, self.pump = loop, pump
        self.start_ns, self.period_ns, self.total = start_ns, period_ns, total
        self._stopped = threading.Event()

    def run(self) -> None:
        _tight_timer_slack()
        k = 0
        while k < self.total and not self._stopped.is_set():
            delay_ns = self.start_ns + int(k * self.period_ns) - time.perf_counter_ns()
            if delay_ns > 0:
                time.sleep(delay_ns / 1e9)
            try:
                self.loop.call_soon_threadsafe(self.pump)
            except RuntimeError:  # the loop is closed: the run is over
                return
            # next: the first request not yet due (several may have come due meanwhile)
            due_now = int((time.perf_counter_ns() - self.start_ns) / self.period_ns) + 1
            k = max(k + 1, due_now)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)


def _tight_timer_slack() -> None:
    """This thread's sleeps end when asked, not up to Linux's default 50 µs of timer slack
    later (a 0.5 ms sleep overshot by a median 76 µs, with 1 ns of slack by 22 µs). Elsewhere
    than Linux, nothing."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class _OpenRun:
    def __init__(self, warmup_end_ns: int) -> None:
        self.warmup_end_ns = warmup_end_ns
        self.queue: deque[tuple[int, bytes]] = deque()
        self.idle: list[_Conn] = []
        self.latencies_ns: list[int] = []
        self.status_counts: dict[int, int] = {}
        self.errors = 0
        self.answered = 0
        self.open = 0
        self.drained = asyncio.Event()  # set whenever nothing is outstanding
        self.first_intended = 0
        self.last_done = 0
        self.served_after_warmup = 0  # 2xx answers that came after the warm-up, whenever due
        self.last_served = 0

    def submit(self, intended_ns: int, req: bytes) -> None:
        self.open += 1
        self.drained.clear()
        if self.idle:
            self.idle.pop().send(intended_ns, req)
        else:
            self.queue.append((intended_ns, req))

    def release(self, conn: _Conn) -> None:
        if self.queue:
            conn.send(*self.queue.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def record(self, intended_ns: int, status: int, ok: bool) -> None:
        now = time.perf_counter_ns()
        self.answered += 1
        self.open -= 1
        if self.open == 0:
            self.drained.set()
        if ok and 200 <= status < 300 and now >= self.warmup_end_ns:
            self.served_after_warmup += 1
            self.last_served = now
        if intended_ns < self.warmup_end_ns:
            return
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        if not ok or not 200 <= status < 300:
            self.errors += 1
            return
        if not self.first_intended:
            self.first_intended = intended_ns
        self.last_done = now
        self.latencies_ns.append(now - intended_ns)


async def run_open_loop_async(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    connections: int = 64,
    drain_s: float = 5.0,
) -> LoadResult:
    """`rate` requests per second for warm-up + duration over up to `connections`
    keep-alive connections; latency from each request's intended send time."""
    if rate <= 0 or connections < 1:
        raise ValueError("rate must be > 0 and connections >= 1")
    loop = asyncio.get_running_loop()
    start = time.perf_counter_ns() + 50_000_000  # connections open first
    run = _OpenRun(warmup_end_ns=start + int(warmup_s * 1e9))
    conns = [
        (await loop.create_connection(lambda: _Conn(run), host, port))[1]
        for _ in range(connections)
    ]
    source = itertools.cycle(requests)
    total = int((warmup_s + duration_s) * rate)
    period_ns = 1e9 / rate
    lateness: list[int] = []
    sent = 0
    all_sent: asyncio.Future[None] = loop.create_future()

    def pump() -> None:  # on the loop: every request due by now goes
        nonlocal sent
        if all_sent.done():
            return
        now = time.perf_counter_ns()
        try:
            while sent < total and start + int(sent * period_ns) <= now:
                intended = start + int(sent * period_ns)
                lateness.append(now - intended)
                run.submit(intended, next(source))
                sent += 1
        except Exception as e:  # a callback's error would only be logged: end the run
            all_sent.set_exception(e)
            return
        if sent >= total:
            all_sent.set_result(None)

    cpu0 = time.process_time()
    ticker = _Ticker(loop, pump, start, period_ns, total)
    ticker.start()
    try:
        await all_sent
    finally:
        ticker.stop()
    if run.open > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.drained.wait(), drain_s)
    unanswered = run.open
    for c in conns:
        c.close()
    cpu = time.process_time() - cpu0
    lat = np.asarray(run.latencies_ns, dtype=np.float64) / 1e6
    window_ns = max(run.last_done - run.first_intended, 1)
    late = np.asarray(lateness, dtype=np.float64) / 1e6
    # answers per second once warm, whenever they were due: the service's throughput
    # (above capacity `rps` reads less, its window opening at the warm-up's backlog)
    served_s = (run.last_served - run.warmup_end_ns) / 1e9
    return LoadResult(
        tool="openloop",
        concurrency=connections,
        duration_s=window_ns / 1e9,
        latencies_ms=lat,
        errors=run.errors + unanswered,
        status_counts=run.status_counts,
        extra={
            "target_rps": rate,
            "sent": sent,
            "unanswered": unanswered,
            "client_late_ms_p99": float(np.percentile(late, 99)) if late.size else 0.0,
            "client_cpu_us_per_req": 1e6 * cpu / max(sent, 1),
            "served_rps": run.served_after_warmup / served_s if served_s > 0 else 0.0,
        },
    )


def reference_rate(closed_rps: float, beside_rps: float) -> float:
    """The saturated rate an open loop's fractions are taken of: the lower of a closed
    loop's (wrk's) and what the service answered beside this generator when offered more
    than it could take. On a shared box the generator's own CPU lowers what the service
    can do; a fraction of wrk's rate alone can be the service's whole capacity beside it.
    A ceiling that answered nothing leaves wrk's rate."""
    if beside_rps <= 0:
        return closed_rps
    return min(closed_rps, beside_rps)


def run_open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    connections: int = 64,
) -> LoadResult:
    """Synchronous wrapper on a fresh event loop (uvloop when installed)."""
    return run_fresh(
        run_open_loop_async(host, port, requests, rate, duration_s, warmup_s, connections)
    )
