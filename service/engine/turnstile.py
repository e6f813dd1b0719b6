"""Admitted /rank requests start their work at most `per_iteration` to an event-loop
iteration, in the order they were admitted.

asyncio runs, in one iteration, every callback that was ready when it began: each request
read in the last poll runs its whole warm path (about 1.5 ms of Python and ONNX Runtime)
back to back with the others, and only then does the loop read its sockets again. A
request that arrives meanwhile waits unread in the kernel for the rest of that batch,
then takes whatever place the next poll gives it: its latency is up to two batches, and
none of that first wait is seen by the service's clock or by admission.

`Turnstile.enter` lets `per_iteration` requests start in an iteration; the others wait in
the order they entered, and the loop polls its sockets between two groups of starts, so
a request arriving meanwhile is read, stamped and queued behind them, and its wait is on
the service's clock (admission checks it again when its turn comes). 1 is strict arrival
order at the cost of a loop iteration (an epoll call and a few callbacks) per request.
It is not a lock: a request that suspends (a Redis read, the inference pool) does not
hold the next ones.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Turnstile:
    def __init__(self, per_iteration: int = 1) -> None:
        self.per_iteration = max(1, int(per_iteration))
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._left = self.per_iteration  # starts left in this iteration
        self._ticking = False  # a `_tick` is scheduled

    @property
    def waiting(self) -> int:
        """Admitted requests waiting for their turn."""
        return len(self._waiting)

    async def enter(self) -> None:
        """An admitted request: returns when it may start."""
        if not self._waiting and self._left > 0:
            self._left -= 1
            self._schedule()
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._schedule()
        # A waiter cancelled before its turn is skipped (its future is done); one
        # cancelled after it has used its turn.
        await turn

    def _schedule(self) -> None:
        if not self._ticking:
            self._ticking = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        """Once per iteration while requests come: the next group of waiters is released
        (they start in the next iteration, after the loop has polled its sockets)."""
        self._ticking = False
        released = 0
        while self._waiting and released < self.per_iteration:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                released += 1
        # those released start in the next iteration: the starts left there are the rest
        self._left = self.per_iteration - released
        if released or self._waiting:
            self._schedule()
