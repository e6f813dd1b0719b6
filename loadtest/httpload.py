"""A lean closed-loop HTTP/1.1 load client: asyncio protocols over keep-alive sockets.

Each of `concurrency` connections sends one precomputed request, waits for the whole
response (headers + Content-Length body, nothing else parsed), records the latency with
`time.perf_counter_ns` and sends the next one. No HTTP library, no JSON, no per-request
allocation beyond the response buffer: on a 2-core box the client must cost far less CPU
per request than the server it measures (`bench` measures its ceiling on /healthz).

    reqs = [build_request("POST", "/rank", body, host="127.0.0.1:8000")]
    result = run_load("127.0.0.1", 8000, reqs, concurrency=8, duration_s=5, warmup_s=1)
    result.summary()  # {"requests": ..., "p50_ms": ..., "p99_ms": ..., "rps": ...}

Responses must carry Content-Length (uvicorn's do); chunked bodies count as errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0)


def build_request(
    method: str,
    path: str,
    body: bytes | None = None,
    host: str = "127.0.0.1",
    content_type: str = "application/json",
) -> bytes:
    """The exact bytes of one keep-alive HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head + (body or b"")


@dataclass
class LoadResult:
    """Latencies of the measured window (warm-up excluded) and what went wrong."""

    tool: str
    concurrency: int
    duration_s: float  # length of the measured window
    latencies_ms: np.ndarray  # (requests,) float64, completion order
    errors: int = 0  # non-2xx answers, malformed answers, dropped connections
    status_counts: dict[int, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return int(self.latencies_ms.shape[0])

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        out: dict[str, Any] = {
            "tool": self.tool,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "duration_s": round(self.duration_s, 3),
            "rps": self.requests / self.duration_s if self.duration_s > 0 else 0.0,
        }
        for key, value in percentiles_ms(lat).items():
            out[key] = value
        out["mean_ms"] = float(lat.mean()) if lat.size else float("nan")
        if self.status_counts:
            out["status"] = {str(k): v for k, v in sorted(self.status_counts.items())}
        out.update(self.extra)
        return out


def percentiles_ms(lat: np.ndarray) -> dict[str, float]:
    """p50, p90, p99 and max of latencies in ms (NaN for none). Monotone by construction."""
    if lat.size == 0:
        return {
            "p50_ms": float("nan"),
            "p90_ms": float("nan"),
            "p99_ms": float("nan"),
            "max_ms": float("nan"),
        }
    p50, p90, p99 = np.percentile(lat, PERCENTILES, method="higher")
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "max_ms": float(lat.max()),
    }


def parse_head(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(status, bytes of the whole response) once the header is in `buf`; None before.
    The length is -1 when the response has no Content-Length (not supported here)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    status = int(head[9:12]) if head[:5] == b"http/" else 0
    pos = head.find(b"\r\ncontent-length:")
    if pos < 0:
        return status, -1
    stop = head.find(b"\r\n", pos + 2)
    return status, end + 4 + int(head[pos + 17 : stop if stop >= 0 else len(head)])


class _Conn(asyncio.Protocol):
    """One keep-alive connection that runs requests back to back."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the whole response once its header is parsed
        self.status = 0
        self.t0 = 0
        self.done: asyncio.Future[None] = run.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        req = self.run.next_request()
        if req is None or self.transport is None:
            self._finish()
            return
        self.buf.clear()
        self.need = -1
        self.t0 = time.perf_counter_ns()
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            head = parse_head(self.buf)
            if head is None:
                return
            self.status, self.need = head
            if self.need < 0:  # no Content-Length
                self.run.record(self.t0, 0, self.status, ok=False)
                self._abort()
                return
        if len(self.buf) >= self.need:
            t1 = time.perf_counter_ns()
            self.run.record(self.t0, t1, self.status, ok=200 <= self.status < 300)
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.t0 and self.need != 0:
                self.run.dropped += 1
            self.done.set_result(None)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    def _finish(self) -> None:
        self.t0 = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


class _Run:
    """Shared state of one closed-loop run: the request source and the samples."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        requests: Iterator[bytes],
        warmup_end_ns: int,
        stop_ns: int,
        max_requests: int | None,
    ) -> None:
        self.loop = loop
        self.requests = requests
        self.warmup_end_ns = warmup_end_ns
        self.stop_ns = stop_ns
        self.remaining = max_requests
        self.samples: list[int] = []
        self.errors = 0
        self.dropped = 0
        self.status_counts: dict[int, int] = {}
        self.first_ns = 0
        self.last_ns = 0
        self.total = 0  # answers including warm-up (for the client's CPU cost per request)

    def next_request(self) -> bytes | None:
        if time.perf_counter_ns() >= self.stop_ns:
            return None
        if self.remaining is not None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
        return next(self.requests, None)

    def record(self, t0: int, t1: int, status: int, ok: bool) -> None:
        self.total += 1
        if t0 < self.warmup_end_ns:
            return
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        if not ok:
            self.errors += 1
            return
        if not self.first_ns:
            self.first_ns = t0
        self.last_ns = t1
        self.samples.append(t1 - t0)


async def run_load_async(
    host: str,
    port: int,
    requests: Sequence[bytes] | Iterator[bytes],
    concurrency: int = 1,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    max_requests: int | None = None,
) -> LoadResult:
    """Closed loop: `concurrency` connections, each back to back, for warm-up + duration.

    `requests` is cycled when it is a sequence; an iterator is used once (the run ends
    when it is exhausted, as it does after `max_requests` requests).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    loop = asyncio.get_running_loop()
    source: Iterator[bytes] = (
        itertools.cycle(list(requests)) if isinstance(requests, Sequence) else iter(requests)
    )
    cpu0 = time.process_time()
    start = time.perf_counter_ns()
    warm_end = start + int(warmup_s * 1e9)
    run = _Run(loop, source, warm_end, warm_end + int(duration_s * 1e9), max_requests)
    conns: list[_Conn] = []
    for _ in range(concurrency):
        _, proto = await loop.create_connection(lambda: _Conn(run), host, port)
        conns.append(proto)
    await asyncio.gather(*(c.done for c in conns))
    end = time.perf_counter_ns()
    cpu = time.process_time() - cpu0
    lat = np.asarray(run.samples, dtype=np.float64) / 1e6
    window_ns = (run.last_ns - run.first_ns) if run.samples else 0
    if max_requests is None and not isinstance(requests, Iterator):
        window_ns = max(window_ns, min(end, run.stop_ns) - warm_end)
    return LoadResult(
        tool="pyclient",
        concurrency=concurrency,
        duration_s=max(window_ns, 1) / 1e9,
        latencies_ms=lat,
        errors=run.errors + run.dropped,
        status_counts=run.status_counts,
        extra={"client_cpu_us_per_req": 1e6 * cpu / max(run.total, 1)},
    )


def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes] | Iterator[bytes],
    concurrency: int = 1,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    max_requests: int | None = None,
) -> LoadResult:
    """Synchronous wrapper: runs the load on a fresh event loop (uvloop when installed)."""
    return run_fresh(
        run_load_async(host, port, requests, concurrency, duration_s, warmup_s, max_requests)
    )


def run_fresh(coro: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    """Run a load coroutine to completion on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(coro)
    with contextlib.closing(uvloop.new_event_loop()) as loop:
        return loop.run_until_complete(coro)
