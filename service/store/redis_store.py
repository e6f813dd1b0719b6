"""User sequences and cached user states in Redis (layout: docs/design.md §4, docs/service.md).

    ifa:seq:{<user>}                   string: append-only 32-byte event records
    ifa:state:{<user>}:<model_version> string: serialised UserState (n, t_ref inside)
    ifa:idem:{<user>}:<key>            string: the original answer of an /events call

The user id sits in a hash tag, so every key of one user lives in one Redis Cluster slot
(the append script touches two keys; `service.store.cluster` for the cluster client).
Every failure of Redis (refused, timed out, a protocol error) surfaces as
`StoreUnavailable`, with the node it concerns; callers decide how to degrade.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ifa_common.records import RECORD_SIZE, unpack
from ifa_common.state import covered_events
from service.store.cluster import call_cluster, make_cluster_client, node_of, ping_any_node

log = logging.getLogger(__name__)

T = TypeVar("T")

# One GETRANGE reads at most this many records (4 MiB); a long tail is several
# GETRANGEs in one pipeline, so each reply has its own read timeout.
READ_CHUNK_RECORDS: Final = 131_072
READ_SOCKET_BYTES: Final = 1 << 20

# A replay refreshes the key's TTL: a write, so that a WAIT after it (IFA_EVENTS_WAIT_REPLICAS)
# also covers the original append, which the replication stream carried before it.
_APPEND_LUA: Final = """
local prev = redis.call('GET', KEYS[2])
if prev then
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
  return {0, prev}
end
local nbytes = redis.call('APPEND', KEYS[1], ARGV[1])
local answer = ARGV[2] .. ':' .. tostring(nbytes) .. ':' .. ARGV[3]
redis.call('SET', KEYS[2], answer, 'EX', tonumber(ARGV[4]))
return {1, answer}
"""

# The warm path's one command: the sequence length, the tail after the caller's state
# (ARGV[1] < 0: none) and the stored state (ARGV[3] == "1"), read atomically. One
# EVALSHA instead of a pipeline of two or three commands: less client CPU per /rank
# (docs/performance.md) and no append between STRLEN and GETRANGE.
_SNAPSHOT_LUA: Final = """
local nbytes = redis.call('STRLEN', KEYS[1])
local tail = false
if tonumber(ARGV[1]) >= 0 then tail = redis.call('GETRANGE', KEYS[1], ARGV[1], ARGV[2]) end
local state = false
if ARGV[3] == '1' then state = redis.call('GET', KEYS[2]) end
return {nbytes, tail, state}
"""


# A state is written back only while the sequence still holds every event it covers: a
# state built from a history deleted meanwhile (DELETE /users/{id}, through any replica)
# must not come back, to be folded onto the user's next events.
_WRITE_STATE_LUA: Final = """
if redis.call('STRLEN', KEYS[1]) < tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""


class StoreUnavailable(RuntimeError):
    """Redis did not answer (down, too slow, or an error reply). `timed_out`: it said
    nothing in time, which on a saturated CPU happens to a healthy server too."""

    def __init__(self, message: str, timed_out: bool = False, scope: str | None = None) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.scope = scope  # the node (cluster) it concerns; None: the one Redis


class IdempotencyConflict(ValueError):
    """An idempotency key reused with a different batch of events."""


def seq_key(user: str) -> str:
    return f"ifa:seq:{{{user}}}"


def user_of_seq_key(key: bytes | str) -> str:
    """seq_key's inverse: b"ifa:seq:{u42}" -> "u42"."""
    text = key.decode() if isinstance(key, bytes) else key
    return text[text.index("{") + 1 : text.rindex("}")]


def state_key(user: str, model_version: str) -> str:
    return f"ifa:state:{{{user}}}:{model_version}"


def idem_key(user: str, key: str) -> str:
    return f"ifa:idem:{{{user}}}:{key}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One round trip's view of a user: sequence length, maybe its tail, maybe a state."""

    length: int  # records in the sequence
    tail: bytes  # records [tail_from, tail_from + len(tail)/32), possibly capped
    tail_from: int | None  # None: no tail was requested
    state_blob: bytes | None  # the stored state of the model version, if requested


@dataclass(frozen=True, slots=True)
class AppendResult:
    appended: int
    length: int
    replayed: bool  # an idempotent retry: nothing was appended now


class SequenceStore(Protocol):
    """What the engine and the use cases need from storage (Redis; in-memory in unit tests)."""

    async def snapshot(
        self, user: str, model_version: str, have_n: int | None, tail_cap: int
    ) -> Snapshot: ...

    async def read_range(self, user: str, start: int, stop: int) -> np.ndarray: ...

    async def append(
        self, user: str, records: bytes, idempotency_key: str | None
    ) -> AppendResult: ...

    async def write_states(self, items: Sequence[tuple[str, str, bytes]]) -> None: ...

    async def publish(self, channel: str, message: bytes) -> None: ...

    async def length(self, user: str) -> int: ...

    async def ping(self) -> None: ...

    def scope(self, user: str) -> str | None:
        """The node that holds `user` (None: there is one Redis): a failure there is
        not a failure of the others."""
        ...


Client = aioredis.Redis | aioredis.RedisCluster


def make_client(url: str, timeout_ms: float, max_connections: int, cluster: bool = False) -> Client:
    """Async client with explicit timeouts and no hidden retries (we degrade instead)."""
    if cluster:
        return make_cluster_client(url, timeout_ms, max_connections, READ_SOCKET_BYTES)
    timeout = timeout_ms / 1000.0
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        # a 100k-event sequence is 3.2 MB: read it in 1 MiB socket reads, not redis-py's
        # 64 KiB default (about 3x faster on long reads, docs/performance.md; small replies
        # are unaffected, as the reader takes what the socket has, up to this size)
        socket_read_size=READ_SOCKET_BYTES,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisSequenceStore:
    def __init__(
        self,
        client: Client,
        *,
        timeout_ms: float,
        idempotency_ttl_s: int,
        state_ttl_s: int,
        wait_replicas: int = 0,
        wait_ms: int = 0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self._timeout = timeout_ms / 1000.0
        self._idem_ttl = int(idempotency_ttl_s)
        self._state_ttl = int(state_ttl_s)
        self._append_script = client.register_script(_APPEND_LUA)
        self._snapshot_script = client.register_script(_SNAPSHOT_LUA)
        self._on_error = on_error
        self._wait_replicas = wait_replicas
        self._wait_ms = wait_ms
        self.cluster = isinstance(client, aioredis.RedisCluster)

    def scope(self, user: str) -> str | None:
        if isinstance(self.client, aioredis.RedisCluster):
            return node_of(self.client, seq_key(user))
        return None

    async def _call(
        self,
        op: str,
        fn: Callable[[], Awaitable[T]],
        slack: float = 0.0,
        user: str | None = None,
    ) -> T:
        # socket timeouts bound each reply; the outer guard bounds the whole call
        # (pool wait + connect + replies) so that nothing waits on Redis unboundedly.
        try:
            async with asyncio.timeout(3 * self._timeout + slack):
                if isinstance(self.client, aioredis.RedisCluster):
                    return await call_cluster(self.client, fn)
                return await fn()
        except Exception as e:
            # Beyond its own errors, redis-py's async cluster client races itself when a
            # node fails: a connection closed by one command while another writes to it
            # ("'NoneType' object has no attribute 'writelines'", "unable to perform
            # operation on <TCPTransport closed=True>"; tests/e2e/test_cluster.py). A
            # client failure is a Redis failure here, never a 500; the unexpected kinds
            # are logged whole, so that a bug of ours does not pass for an outage.
            if not isinstance(e, RedisError | OSError | TimeoutError):
                log.warning("redis client error in %s", op, exc_info=True)
            if self._on_error is not None:
                self._on_error(op)
            timed_out = isinstance(e, TimeoutError | RedisTimeoutError)
            scope = self.scope(user) if user is not None else None
            if not timed_out and not self.cluster:
                # A refused or reset connection: after a restart of Redis every pooled
                # socket is dead; drop them all at once instead of discovering them one
                # failed request at a time. (A timeout says nothing about the sockets.)
                await self._drop_idle_connections()
            where = f" ({scope})" if scope else ""
            raise StoreUnavailable(
                f"redis {op}{where}: {type(e).__name__}: {e}", timed_out, scope
            ) from e

    async def _drop_idle_connections(self) -> None:
        # (the cluster client does this itself, per node)
        assert isinstance(self.client, aioredis.Redis)
        try:
            await self.client.connection_pool.disconnect(inuse_connections=False)
        except asyncio.CancelledError:
            # redis-py can surface a cancellation from a connection it was closing; only
            # a cancellation of this task itself may propagate (never a 500 from cleanup).
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:  # best effort on an already broken pool
            log.debug("dropping idle redis connections failed", exc_info=True)

    async def snapshot(
        self, user: str, model_version: str, have_n: int | None, tail_cap: int
    ) -> Snapshot:
        """STRLEN (+ GETRANGE of up to `tail_cap` records after `have_n`, when the caller
        has a state) (+ GET of the stored state, when it has none): one command."""
        with_tail = have_n is not None and tail_cap > 0
        start = have_n * RECORD_SIZE if have_n is not None and with_tail else -1
        stop = start + tail_cap * RECORD_SIZE - 1 if with_tail else -1
        keys = [seq_key(user), state_key(user, model_version)]
        args = [start, stop, "1" if have_n is None else "0"]
        nbytes_r, tail_r, blob = await self._call(
            "snapshot", lambda: self._snapshot_script(keys=keys, args=args), user=user
        )
        tail, tail_from = b"", None
        if with_tail:
            tail_from = have_n
            tail = bytes(tail_r or b"")
            tail = tail[: len(tail) - len(tail) % RECORD_SIZE]
        return Snapshot(
            length=int(nbytes_r) // RECORD_SIZE, tail=tail, tail_from=tail_from, state_blob=blob
        )

    async def read_range(self, user: str, start: int, stop: int) -> np.ndarray:
        """Records [start, stop) as EVENT_DTYPE (N,), chunked GETRANGEs in one pipeline."""
        if stop <= start:
            return unpack(b"")
        key = seq_key(user)

        async def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for lo in range(start, stop, READ_CHUNK_RECORDS):
                hi = min(stop, lo + READ_CHUNK_RECORDS)
                pipe.getrange(key, lo * RECORD_SIZE, hi * RECORD_SIZE - 1)
            return list(await pipe.execute())

        chunks = -(-(stop - start) // READ_CHUNK_RECORDS)
        parts = await self._call("read", run, slack=chunks * self._timeout, user=user)
        buf = b"".join(parts)
        buf = buf[: len(buf) - len(buf) % RECORD_SIZE]
        return unpack(buf)

    async def append(self, user: str, records: bytes, idempotency_key: str | None) -> AppendResult:
        if self._wait_replicas:
            return await self._append_replicated(user, records, idempotency_key)
        n = len(records) // RECORD_SIZE
        if idempotency_key is None:
            nbytes = await self._call(
                "append", lambda: self.client.append(seq_key(user), records), user=user
            )
            return AppendResult(appended=n, length=int(nbytes) // RECORD_SIZE, replayed=False)
        digest = hashlib.blake2b(records, digest_size=12).hexdigest()
        keys: list[str] = [seq_key(user), idem_key(user, idempotency_key)]
        args: list[bytes | str] = [records, str(n), digest, str(self._idem_ttl)]
        reply = await self._call("append", lambda: self._append_script(keys, args), user=user)
        return self._idempotent_result(reply, digest)

    async def _append_replicated(
        self, user: str, records: bytes, idempotency_key: str | None
    ) -> AppendResult:
        """The append, then WAIT on the same connection (WAIT counts the replicas that have
        this connection's writes): a pipeline of two, sent to the user's node."""
        n = len(records) // RECORD_SIZE
        digest = hashlib.blake2b(records, digest_size=12).hexdigest()

        async def run() -> list[Any]:
            wait: dict[str, Any] = {}
            if isinstance(self.client, aioredis.RedisCluster):  # (initialized by _call)
                wait["target_nodes"] = self.client.get_node_from_key(seq_key(user))
            pipe = self.client.pipeline(transaction=False)
            if idempotency_key is None:
                pipe.append(seq_key(user), records)
            else:
                keys = [seq_key(user), idem_key(user, idempotency_key)]
                # EVAL, not EVALSHA: a pipeline cannot load a missing script and retry
                pipe.eval(_APPEND_LUA, 2, *keys, records, str(n), digest, str(self._idem_ttl))
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms, **wait)
            return list(await pipe.execute())

        reply, acked = await self._call("append", run, slack=self._wait_ms / 1e3, user=user)
        if int(acked) < self._wait_replicas:
            raise StoreUnavailable(
                f"redis append: {int(acked)} of {self._wait_replicas} replicas "
                f"acknowledged within {self._wait_ms} ms",
                scope=self.scope(user),
            )
        if idempotency_key is None:
            return AppendResult(appended=n, length=int(reply) // RECORD_SIZE, replayed=False)
        return self._idempotent_result(reply, digest)

    def _idempotent_result(self, reply: Any, digest: str) -> AppendResult:
        fresh, answer = reply
        appended_s, nbytes_s, stored_digest = bytes(answer).decode().split(":")
        if not fresh and stored_digest != digest:
            raise IdempotencyConflict(
                "idempotency_key was already used for a different batch of events"
            )
        return AppendResult(
            appended=int(appended_s), length=int(nbytes_s) // RECORD_SIZE, replayed=not fresh
        )

    async def write_states(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        if not items:
            return

        async def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for user, version, blob in items:
                covers = (covered_events(blob) or 0) * RECORD_SIZE
                keys = (seq_key(user), state_key(user, version))
                # EVAL, not EVALSHA: a pipeline cannot load a missing script and retry
                pipe.eval(_WRITE_STATE_LUA, 2, *keys, blob, self._state_ttl, covers)
            return list(await pipe.execute())

        await self._call("write_states", run)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call("publish", lambda: self.client.publish(channel, message))

    async def length(self, user: str) -> int:
        return (
            int(await self._call("strlen", lambda: self.client.strlen(seq_key(user)), user=user))
            // RECORD_SIZE
        )

    async def ping(self) -> None:
        if isinstance(self.client, aioredis.RedisCluster):
            # any node that answers: one lost primary degrades its users, not the replica
            await self._call("ping", partial(ping_any_node, self.client))
        else:
            await self._call("ping", self.client.ping)
