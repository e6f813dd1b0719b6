"""Appends learnt by push: Redis' server-assisted client-side caching in broadcast mode.

Two dedicated connections (RESP2, so any Redis >= 6) to each node that holds sequences
(the one Redis, or every primary of a cluster):

    sub   CLIENT ID, then SUBSCRIBE __redis__:invalidate: receives the invalidations
    reg   CLIENT TRACKING ON REDIRECT <sub's id> BCAST PREFIX ifa:seq: and nothing else;
          tracking lives as long as this connection does

Every write to a key under the prefix (an append by any replica, a delete, an expiry, a
key leaving or entering a node in a reshard; a FLUSHALL as a null key) reaches
`on_keys`. Every connection is pinged every `ping_interval_s`; a reply missing for three
intervals, a read error or a closed socket on any node ends the session: `on_state(False)`
at once (the service falls back to asking Redis on every request), then a new session
after `retry_s` (`on_state(True)` once every node tracks again). On a cluster the set of
primaries is asked for again every `topology_interval_s`: a failover or a new primary
ends the session, and the next one tracks the new set. Invalidations sent while no
session was up are lost, which is why the consumer forgets what it knew whenever the
state changes. The `channels` (plain pub/sub, e.g. the control channel of the workers of
one `serve`) are subscribed on the first node (a cluster forwards every PUBLISH to all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from service.store.cluster import NodeAddress

log = logging.getLogger(__name__)

CHANNEL: Final = b"__redis__:invalidate"


class InvalidationListener:
    """`prefix` None: no tracking, only the `channels`. `discover` names the nodes to
    track (called at each session start, and every `topology_interval_s` when set)."""

    def __init__(
        self,
        discover: Callable[[], Awaitable[list[NodeAddress]]],
        prefix: str | None,
        on_keys: Callable[[list[bytes] | None], None],
        on_state: Callable[[bool], None],
        ping_interval_s: float = 0.5,
        retry_s: float = 0.5,
        channels: dict[bytes, Callable[[bytes], None]] | None = None,
        topology_interval_s: float | None = None,
    ) -> None:
        self._discover = discover
        self.prefix = prefix
        self._channels = dict(channels or {})
        self._on_keys = on_keys
        self._on_state = on_state
        self.ping_interval_s = ping_interval_s
        self.retry_s = retry_s
        self.topology_interval_s = topology_interval_s
        self.sessions = 0  # sessions started (a reconnect is a new session)
        self._first_up = asyncio.Event()
        self.nodes: list[str] = []  # the nodes the current (or last) session tracks

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

    async def started(self, timeout_s: float) -> bool:
        """True once a session has come up (every channel subscribed, tracking on), False
        if none has within `timeout_s`: the start-up waits for it, so a process that says
        it has started hears what its siblings announce from then on."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._first_up.wait()
        except TimeoutError:
            return False
        return True

    async def _session(self) -> None:
        nodes = await self._discover()
        if not nodes:
            raise ConnectionError("no node to track")
        conns: list[Any] = []
        try:
            pairs = []
            for i, node in enumerate(nodes):
                sub, reg = node.connect(None), node.connect(3 * self.ping_interval_s)
                conns += [sub, reg]
                await self._open(sub, reg, self._channels if i == 0 else {})
                pairs.append((sub, reg))
            self.nodes = [node.name for node in nodes]
            self.sessions += 1
            self._on_state(True)
            self._first_up.set()
            tasks = {asyncio.create_task(self._read(sub)) for sub, _ in pairs}
            tasks.add(asyncio.create_task(self._ping(pairs)))
            if self.topology_interval_s is not None:
                tasks.add(asyncio.create_task(self._watch(set(self.nodes))))
            try:
                done, _ = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
                for task in done:
                    task.result()  # re-raise what ended the session
                raise ConnectionError("session ended")
            finally:
                # all stopped and their outcome collected before the sockets close, also
                # when this session is cancelled (shutdown): no orphaned task errors
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    async def _open(self, sub: Any, reg: Any, control: dict[bytes, Any]) -> None:
        await sub.connect()
        await sub.send_command("CLIENT", "ID")
        client_id = int(await sub.read_response())
        channels = [*([CHANNEL] if self.prefix is not None else []), *control]
        if channels:
            await sub.send_command("SUBSCRIBE", *channels)
            for _ in channels:
                await sub.read_response()
        await reg.connect()
        if self.prefix is not None:
            await reg.send_command(
                "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self.prefix
            )
            reply = await reg.read_response()
            if reply not in (b"OK", "OK"):
                raise RuntimeError(f"CLIENT TRACKING answered {reply!r}")

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

    async def _ping(self, pairs: list[tuple[Any, Any]]) -> None:
        while True:
            await asyncio.sleep(self.ping_interval_s)
            for sub, reg in pairs:
                await sub.send_command("PING")  # its pong is read (and dropped) by _read
                await reg.send_command("PING")
            for _, reg in pairs:
                await reg.read_response()

    async def _watch(self, names: set[str]) -> None:
        assert self.topology_interval_s is not None
        while True:
            await asyncio.sleep(self.topology_interval_s)
            try:
                now = {node.name for node in await self._discover()}
            except Exception as e:  # a dead node answers no ping either: _ping ends it
                log.debug("push: topology check failed: %s", e)
                continue
            if now != names:
                raise ConnectionError(f"primaries changed: {sorted(names)} -> {sorted(now)}")
