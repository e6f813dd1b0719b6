"""Appends learnt by push: Redis' server-assisted client-side caching in broadcast mode.

Two dedicated connections (RESP2, so any Redis >= 6):

    sub   CLIENT ID, then SUBSCRIBE __redis__:invalidate: receives the invalidations
    reg   CLIENT TRACKING ON REDIRECT <sub's id> BCAST PREFIX ifa:seq: and nothing else;
          tracking lives as long as this connection does

Every write to a key under the prefix (an append by any replica, a delete, an expiry; a
FLUSHALL as a null key) reaches `on_keys`. Both connections are pinged every
`ping_interval_s`; a reply missing for three intervals, a read error or a closed socket
ends the session: `on_state(False)` at once (the service falls back to asking Redis on
every request), then a new session after `retry_s` (`on_state(True)` once tracking is on
again). Invalidations sent while no session was up are lost, which is why the consumer
forgets what it knew whenever the state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

CHANNEL: Final = b"__redis__:invalidate"


class InvalidationListener:
    """`prefix` None: no tracking, only the `channels` (plain pub/sub messages, e.g. the
    control channel the workers of one `serve` share)."""

    def __init__(
        self,
        pool: aioredis.ConnectionPool,
        prefix: str | None,
        on_keys: Callable[[list[bytes] | None], None],
        on_state: Callable[[bool], None],
        ping_interval_s: float = 0.5,
        retry_s: float = 0.5,
        channels: dict[bytes, Callable[[bytes], None]] | None = None,
    ) -> None:
        self._pool = pool
        self.prefix = prefix
        self._channels = dict(channels or {})
        self._on_keys = on_keys
        self._on_state = on_state
        self.ping_interval_s = ping_interval_s
        self.retry_s = retry_s
        self.sessions = 0  # sessions started (a reconnect is a new session)

    def _connection(self, read_timeout: float | None) -> Any:
        # RESP2 on both: the invalidations arrive as plain pub/sub replies on `sub` (a
        # RESP3 connection would hand them to redis-py's push handler instead)
        kwargs = {**self._pool.connection_kwargs, "socket_timeout": read_timeout, "protocol": 2}
        return self._pool.connection_class(**kwargs)

    async def run(self) -> None:
        """Sessions until cancelled."""
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("push invalidation channel down (%s: %s)", type(e).__name__, e)
            self._on_state(False)
            await asyncio.sleep(self.retry_s)

    async def _session(self) -> None:
        sub = self._connection(read_timeout=None)
        reg = self._connection(read_timeout=3 * self.ping_interval_s)
        try:
            await sub.connect()
            await sub.send_command("CLIENT", "ID")
            client_id = int(await sub.read_response())
            channels = [*([CHANNEL] if self.prefix is not None else []), *self._channels]
            await sub.send_command("SUBSCRIBE", *channels)
            for _ in channels:
                await sub.read_response()
            await reg.connect()
            if self.prefix is not None:
                await reg.send_command(
                    "CLIENT",
                    "TRACKING",
                    "ON",
                    "REDIRECT",
                    client_id,
                    "BCAST",
                    "PREFIX",
                    self.prefix,
                )
                reply = await reg.read_response()
                if reply not in (b"OK", "OK"):
                    raise RuntimeError(f"CLIENT TRACKING answered {reply!r}")
            self.sessions += 1
            self._on_state(True)
            tasks = {
                asyncio.create_task(self._read(sub)),
                asyncio.create_task(self._ping(sub, reg)),
            }
            try:
                done, _ = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
                for task in done:
                    task.result()  # re-raise what ended the session
                raise ConnectionError("session ended")
            finally:
                # both stopped and their outcome collected before the sockets close, also
                # when this session is cancelled (shutdown): no orphaned task errors
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for conn in (sub, reg):
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    async def _read(self, sub: Any) -> None:
        while True:
            async with asyncio.timeout(3 * self.ping_interval_s):
                msg = await sub.read_response()
            if isinstance(msg, list) and len(msg) == 3 and msg[0] in (b"message", "message"):
                handler = self._channels.get(msg[1])
                if handler is not None:
                    handler(msg[2])
                elif msg[1] == CHANNEL:
                    self._on_keys(msg[2])  # a list of keys, or None for "every key" (FLUSHALL)

    async def _ping(self, sub: Any, reg: Any) -> None:
        while True:
            await asyncio.sleep(self.ping_interval_s)
            await sub.send_command("PING")  # its pong is read (and dropped) by _read
            await reg.send_command("PING")
            await reg.read_response()
