"""The load clients count every request and report sane percentiles, against a tiny server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from loadtest import httpload, wrk


class TinyServer:
    """Keep-alive HTTP/1.1 on a free port, in a thread: 200 "ok", or 500 for /fail.

    Counts the requests it answered, so a test can compare with the client's count."""

    def __init__(self) -> None:
        self.answered = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                status = b"500 Oops" if b" /fail " in head else b"200 OK"
                body = b'{"ok":true}'
                self.answered += 1  # before the write: the client may finish at once
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def __enter__(self) -> TinyServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[TinyServer]:
    with TinyServer() as s:
        yield s


def test_counts_exactly_the_requests_sent(server: TinyServer) -> None:
    before = server.answered
    reqs = [httpload.build_request("POST", "/rank", b'{"user_id":"u%d"}' % i) for i in range(300)]
    res = httpload.run_load(
        "127.0.0.1", server.port, iter(reqs), concurrency=4, duration_s=60, warmup_s=0
    )
    assert res.requests == 300
    assert server.answered - before == 300
    assert res.errors == 0
    s = res.summary()
    assert s["requests"] == 300 and s["status"] == {"200": 300}
    assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["rps"] > 0 and s["client_cpu_us_per_req"] > 0


def test_max_requests_bounds_a_cycled_sequence(server: TinyServer) -> None:
    res = httpload.run_load(
        "127.0.0.1",
        server.port,
        [httpload.build_request("GET", "/healthz")],
        concurrency=3,
        duration_s=60,
        warmup_s=0,
        max_requests=50,
    )
    assert res.requests == 50


def test_time_bounded_run_excludes_warmup(server: TinyServer) -> None:
    before = server.answered
    t0 = time.perf_counter()
    res = httpload.run_load(
        "127.0.0.1",
        server.port,
        [httpload.build_request("GET", "/healthz")],
        concurrency=2,
        duration_s=0.3,
        warmup_s=0.2,
    )
    whole_call_s = time.perf_counter() - t0
    assert 0 < res.requests < server.answered - before, "warm-up answers are not measured"
    # the measured window is the requested one, and the warm-up lies outside it
    assert res.duration_s >= 0.3
    assert res.duration_s <= whole_call_s - 0.2


def test_non_2xx_answers_are_errors_not_latencies(server: TinyServer) -> None:
    reqs = [httpload.build_request("GET", "/fail")] * 5 + [httpload.build_request("GET", "/ok")] * 5
    res = httpload.run_load("127.0.0.1", server.port, iter(reqs), concurrency=1, warmup_s=0)
    assert (res.requests, res.errors) == (5, 5)
    assert res.status_counts == {500: 5, 200: 5}


def test_percentiles_are_monotone_and_exact_on_known_data() -> None:
    lat = np.arange(1, 101, dtype=np.float64)  # 1..100 ms
    p = httpload.percentiles_ms(lat)
    assert (p["p50_ms"], p["p90_ms"], p["p99_ms"], p["max_ms"]) == (51.0, 91.0, 100.0, 100.0)
    rng = np.random.default_rng(0)
    p = httpload.percentiles_ms(rng.lognormal(size=1000))
    assert p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] <= p["max_ms"]


def test_wrk_script_quotes_bodies_safely() -> None:
    body = b'{"user_id":"a]]b","candidates":[1,2]}'
    script = wrk.lua_script("POST", "/rank", [body, None])
    assert "[=[" + body.decode() + "]=]" in script
    assert 'wrk.format("POST", "/rank")' in script and "done = function" in script


@pytest.mark.skipif(wrk.wrk_path() is None, reason="wrk is not installed")
def test_wrk_run_reports_monotone_percentiles(server: TinyServer) -> None:
    res = wrk.run_wrk(
        f"http://127.0.0.1:{server.port}",
        "POST",
        "/x",
        [b"{}", b"[]"],
        concurrency=2,
        duration_s=1,
        warmup_s=0,
    )
    s = res.summary()
    assert s["requests"] > 0 and s["errors"] == 0
    assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]


@pytest.mark.parametrize("text", ["[]", "a]", "a]=", "x]]y]=]z", "plain"])
def test_lua_long_strings_survive_closing_brackets(text: str) -> None:
    lit = wrk._lua_string(text.encode())
    eq = lit[1 : lit.index("[", 1)]
    close = f"]{eq}]"
    assert lit.endswith(close) and lit.index(close, len(eq) + 2) == len(lit) - len(close)
