"""service.engine.turnstile: admitted /rank requests start one per event-loop iteration, in the
order they entered, and the loop polls its sockets between two starts."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable

from service.engine.turnstile import Turnstile


def ticker(loop: asyncio.AbstractEventLoop) -> Callable[[], int]:
    """A counter of loop iterations: a callback that reschedules itself runs once in each."""
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        loop.call_soon(tick)

    loop.call_soon(tick)
    return lambda: count


def test_requests_start_one_per_iteration_in_the_order_they_entered() -> None:
    async def main() -> list[tuple[int, int]]:
        gate, started = Turnstile(), []
        iteration = ticker(asyncio.get_running_loop())

        async def request(i: int) -> None:
            await gate.enter()
            started.append((i, iteration()))

        await asyncio.gather(*(request(i) for i in range(6)))
        assert gate.waiting == 0
        return started

    started = asyncio.run(main())
    assert [i for i, _ in started] == list(range(6))
    ticks = [t for _, t in started]
    assert all(b > a for a, b in itertools.pairwise(ticks)), ticks


def test_the_loop_reads_its_sockets_between_two_starts() -> None:
    """A byte sent while the first request works is read before the second starts; with
    every request started at once (no turnstile) it is read only after all of them."""

    async def main(gated: bool) -> list[str]:
        loop = asyncio.get_running_loop()
        gate, events = Turnstile(), []
        a, b = socket.socketpair()

        def readable() -> None:
            b.recv(1)
            events.append("read")

        loop.add_reader(b.fileno(), readable)

        async def request(i: int) -> None:
            if gated:
                await gate.enter()
            events.append(f"start {i}")
            if i == 0:
                a.send(b"x")  # arrives while the others wait

        try:
            await asyncio.gather(*(request(i) for i in range(3)))
            for _ in range(3):  # let the reader run if it has not yet
                await asyncio.sleep(0)
        finally:
            loop.remove_reader(b.fileno())
            a.close()
            b.close()
        return events

    assert asyncio.run(main(True)) == ["start 0", "read", "start 1", "start 2"]
    assert asyncio.run(main(False)) == ["start 0", "start 1", "start 2", "read"]


def test_a_request_alone_starts_without_waiting_for_the_loop() -> None:
    async def main() -> tuple[int, int]:
        gate = Turnstile()
        iteration = ticker(asyncio.get_running_loop())
        await asyncio.sleep(0)
        before = iteration()
        await gate.enter()
        return before, iteration()

    before, after = asyncio.run(main())
    assert after == before


def test_a_cancelled_waiter_does_not_hold_the_ones_behind_it() -> None:
    async def main() -> list[int]:
        gate, started = Turnstile(), []
        tasks: list[asyncio.Task[None]] = []

        async def request(i: int) -> None:
            await gate.enter()
            started.append(i)
            if i == 0:
                tasks[1].cancel()  # waiting: skipped
                asyncio.get_running_loop().call_soon(tasks[2].cancel)  # after its release

        tasks.extend(asyncio.create_task(request(i)) for i in range(5))
        await asyncio.gather(*tasks, return_exceptions=True)
        assert tasks[1].cancelled() and tasks[2].cancelled()
        return started

    assert asyncio.run(main()) == [0, 3, 4]


def test_a_few_start_per_iteration_when_asked() -> None:
    """`per_iteration` 3: seven requests start in groups of three, in order."""

    async def main() -> list[tuple[int, int]]:
        gate, started = Turnstile(per_iteration=3), []
        iteration = ticker(asyncio.get_running_loop())

        async def request(i: int) -> None:
            await gate.enter()
            started.append((i, iteration()))

        await asyncio.gather(*(request(i) for i in range(7)))
        return started

    started = asyncio.run(main())
    assert [i for i, _ in started] == list(range(7))
    groups = [[i for i, t in started if t == tick] for tick in sorted({t for _, t in started})]
    assert groups == [[0, 1, 2], [3, 4, 5], [6]]
