"""BodyRules: the body's size limit and the deadline of each part, kept by one timer per
event loop (service/http/middleware.py, _BodyWatch)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from service.http.middleware import BodyRules, BodyTimeout, BodyTooLarge


def parts(*messages: Message, stall: bool = False) -> Callable[[], Awaitable[Message]]:
    """A receive() giving `messages` in turn, then (stall) never answering."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if stall:
            await asyncio.Event().wait()  # a client that stops sending
        raise AssertionError("read past the body")

    return receive


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_body_in_parts_is_read_whole() -> None:
    rules = BodyRules(limit=10)
    got = asyncio.run(rules.read(parts(body(b"abc", True), body(b"", True), body(b"de"))))
    assert got == b"abcde"


def test_over_the_limit_while_streaming_is_413() -> None:
    rules = BodyRules(limit=4)
    with pytest.raises(BodyTooLarge):
        asyncio.run(rules.read(parts(body(b"abc", True), body(b"de"))))


def test_a_disconnect_mid_body_is_the_client_leaving() -> None:
    rules = BodyRules(limit=10)
    with pytest.raises(ClientDisconnect):
        asyncio.run(rules.read(parts(body(b"ab", True), {"type": "http.disconnect"})))


def test_a_part_that_never_comes_is_408_after_the_timeout() -> None:
    rules = BodyRules(limit=100, timeout_s=0.2)

    async def run() -> float:
        t = time.perf_counter()
        with pytest.raises(BodyTimeout):
            await rules.read(parts(body(b"ab", True), stall=True))
        return time.perf_counter() - t

    assert asyncio.run(run()) >= 0.2  # never before its deadline


def test_only_the_overdue_read_times_out_and_the_watch_stops() -> None:
    rules = BodyRules(limit=100, timeout_s=0.3)

    async def run() -> tuple[list[str], bool]:
        async def slow_client() -> str:
            try:
                await rules.read(parts(body(b"a", True), stall=True))
            except BodyTimeout:
                return "408"
            return "read"

        async def steady_client() -> str:
            done = asyncio.Event()

            async def receive() -> Message:
                await asyncio.sleep(0.02)  # well within the deadline
                done.set()
                return body(b"b", more=False)

            await rules.read(receive)
            return "read" if done.is_set() else "?"

        results = list(await asyncio.gather(slow_client(), steady_client()))
        await asyncio.sleep(2 * rules.tick_s)  # a tick with nothing waiting disarms it
        watch = rules._watch
        assert watch is not None
        return results, not watch.waiting and watch.timer is None and not watch.fired

    results, idle = asyncio.run(run())
    assert results == ["408", "read"]
    assert idle


def test_a_cancellation_not_its_own_passes_through() -> None:
    rules = BodyRules(limit=100, timeout_s=30)

    async def run() -> None:
        task = asyncio.ensure_future(rules.read(parts(stall=True)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
