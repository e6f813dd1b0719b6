"""Start-up waits for the push channel's first session (service/store/push.py
`InvalidationListener.started`): a process that says it has started is subscribed to
its siblings' announcements. A real Redis, and a port where nothing listens."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis

from service.store.cluster import NodeAddress, single_node
from service.store.embedded_redis import free_port
from service.store.push import InvalidationListener


async def first_session(url: str, timeout_s: float) -> tuple[bool, list[bool], int]:
    client = aioredis.Redis.from_url(url)
    states: list[bool] = []
    node = single_node(client.connection_pool)

    async def one() -> list[NodeAddress]:
        return [node]

    listener = InvalidationListener(
        one,
        None,
        on_keys=lambda keys: None,
        on_state=states.append,
        retry_s=0.05,
        channels={b"ifa:control:test": lambda payload: None},
    )
    task = asyncio.get_running_loop().create_task(listener.run())
    try:
        up = await listener.started(timeout_s)
        return up, states, listener.sessions
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


def test_started_returns_once_the_channels_are_subscribed(redis_url: str) -> None:
    up, states, sessions = asyncio.run(first_session(redis_url, 30.0))
    assert up and sessions == 1 and states[-1] is True


def test_started_gives_up_after_its_timeout_when_redis_is_down() -> None:
    up, states, sessions = asyncio.run(first_session(f"redis://127.0.0.1:{free_port()}", 0.3))
    assert not up and sessions == 0
    assert states and not any(states)  # each failed session said the channel was down
