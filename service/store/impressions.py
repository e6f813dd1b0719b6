"""The impression log: what /rank answered (and the clicks /events says answer it), to
Redis Streams, off the request path.

    ifa:imp:{<shard>}   stream; an entry is an impression or a click (field `type`)

    impression  rid, uid, ts (ms), v (model version), deg (degraded reason or ""),
                items (int64 little-endian, best first: an item's rank is its index),
                scores (float32 little-endian, the same order)
    shadow      the same fields: the rollout's shadow version's scores of the same
                request (never returned to the client; `ifa-rank logs export` skips them)
    click       rid, uid, item, ts (unix s), action

A user's records go to one shard (a stable hash of the user id), so a user's impressions
are in one stream and, on a cluster, the shards (each its own hash tag) spread over the
primaries. `offer` never waits and never fails: it samples, then puts the record on a
bounded queue; a full queue drops the record (counted). One background task writes
batches: per stream, one call of a Lua script that runs `XADD ... MAXLEN ~ <max_len>`
(bounded: the oldest entries are trimmed) for each record, laid out by `record_args`.
Redis down or slow drops what was not written (counted), never a request. Read back by
`model_export.data.served` (`ifa-rank logs export`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

log = logging.getLogger(__name__)

STREAM_PREFIX: Final = "ifa:imp:"
# Records per write. The write is packed on the event loop in one go (when it was a
# redis-py pipeline of XADDs, 256 records stalled every request in flight for ~5 ms and
# sent 1.6 MB at once); the round trips saved beyond 32 are worth less than that tail.
BATCH: Final = 32

# KEYS[1]: a stream. ARGV[1]: the MAXLEN ~ bound. ARGV[2..]: the records, as
# `record_args` lays them out: a head (a uint32 count n, n uint32 lengths, then the
# strings: field, value, field, value, ...), where a length of OWN_ARGUMENT marks a
# value sent as the next argument of its own instead. One script call per batch: a
# pipeline of XADDs cost the event loop ~60 us a record in redis-py's packing and reply
# parsing. The large values (the items and scores) go as their own arguments because
# cutting them out of one packed string (`string.sub`) copies them in Redis, which is
# single-threaded and shared by every replica. At M = 500, medians of 6 runs of
# `python -m loadtest.log_cost` (event loop / Redis CPU per record): everything packed
# 41 / 48 us, this layout 41 / 41 us, every field its own argument 59 / 37 us (redis-py
# packs each argument in Python). docs/performance.md has the runs.
OWN_ARGUMENT: Final = 0xFFFFFFFF  # in a head's lengths: the value is the next argument
OWN_FROM: Final = 256  # bytes: a value this long or longer goes as its own argument
_WRITE_LUA: Final = """
local bound = ARGV[1]
local i, written = 2, 0
while i <= #ARGV do
  local head = ARGV[i]
  local n = struct.unpack('<I4', head)
  local cmd = {'XADD', KEYS[1], 'MAXLEN', '~', bound, '*'}
  local at = 5 + 4 * n
  for j = 1, n do
    local len = struct.unpack('<I4', head, 1 + 4 * j)
    if len == OWN_ARGUMENT then
      i = i + 1
      cmd[6 + j] = ARGV[i]
    else
      cmd[6 + j] = string.sub(head, at, at + len - 1)
      at = at + len
    end
  end
  redis.call(unpack(cmd))
  i, written = i + 1, written + 1
end
return written
""".replace("OWN_ARGUMENT", str(OWN_ARGUMENT))


def record_args(fields: dict[str, bytes | str | int], out: list[bytes]) -> None:
    """Append one record to a `_WRITE_LUA` argument list: its head, then its values of
    OWN_FROM bytes or more, each as its own argument. str is sent as UTF-8 and int in
    decimal, as redis-py would send them to XADD."""
    pieces: list[bytes] = []
    lengths: list[int] = []
    own: list[bytes] = []
    for name, value in fields.items():
        key = name.encode()
        raw = value if isinstance(value, bytes) else str(value).encode()
        pieces.append(key)
        lengths.append(len(key))
        if len(raw) >= OWN_FROM:
            lengths.append(OWN_ARGUMENT)
            own.append(raw)
        else:
            pieces.append(raw)
            lengths.append(len(raw))
    out.append(struct.pack(f"<{len(lengths) + 1}I", len(lengths), *lengths) + b"".join(pieces))
    out.extend(own)


def stream_key(shard: int) -> str:
    return f"{STREAM_PREFIX}{{{shard}}}"


def shard_of(user: str, shards: int) -> int:
    digest = hashlib.blake2b(user.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % max(1, shards)


def sampled(request_id: str, rate: float) -> bool:
    """Deterministic in the request id: a retried request is logged or not alike."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < rate


@dataclass(frozen=True, slots=True)
class Impression:
    request_id: str
    user_id: str
    ts_ms: int
    model_version: str
    degraded: str | None
    items: bytes  # int64 little-endian, best first
    scores: bytes  # float32 little-endian, the same order
    kind: str = "imp"  # "shadow": scored by the shadow version, not answered

    @classmethod
    def of(
        cls,
        request_id: str,
        user_id: str,
        ts_ms: int,
        model_version: str,
        degraded: str | None,
        item_ids: Sequence[int] | np.ndarray,
        scores: Sequence[float] | np.ndarray,
        kind: str = "imp",
    ) -> Impression:
        # encoded as the request queues it: from the answer's arrays a microsecond, and
        # the writer then only lays them out
        items = np.asarray(item_ids).astype("<i8", copy=False).tobytes()
        weights = np.asarray(scores).astype("<f4", copy=False).tobytes()
        return cls(request_id, user_id, ts_ms, model_version, degraded, items, weights, kind)

    def fields(self) -> dict[str, bytes | str | int]:
        return {
            "type": self.kind,
            "rid": self.request_id,
            "uid": self.user_id,
            "ts": self.ts_ms,
            "v": self.model_version,
            "deg": self.degraded or "",
            "items": self.items,
            "scores": self.scores,
        }


@dataclass(frozen=True, slots=True)
class Click:
    request_id: str
    user_id: str
    item_id: int
    ts: int
    action: int

    def fields(self) -> dict[str, bytes | str | int]:
        return {
            "type": "click",
            "rid": self.request_id,
            "uid": self.user_id,
            "item": self.item_id,
            "ts": self.ts,
            "action": self.action,
        }


Record = Impression | Click


class ImpressionLog:
    """`client`: an async Redis or RedisCluster client. `on_logged(n)` and
    `on_dropped(reason, n)` count (reasons: `queue_full`, `redis`, `forgotten`,
    `shutdown`). `mark()` and `forgotten_since(user, mark)`: a record whose user was
    forgotten (DELETE /users) after it was queued is not written."""

    def __init__(
        self,
        client: Any,
        *,
        shards: int,
        max_len: int,
        sample_rate: float,
        queue_size: int,
        timeout_s: float,
        on_logged: Callable[[int], None],
        on_dropped: Callable[[str, int], None],
        mark: Callable[[], int] = lambda: 0,
        forgotten_since: Callable[[str, int], bool] = lambda user, mark: False,
        linger_s: float = 0.0,
    ) -> None:
        self.client = client
        self._xadd = client.register_script(_WRITE_LUA)
        self.linger_s = linger_s
        self.shards = max(1, shards)
        self.max_len = max_len
        self.sample_rate = sample_rate
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[tuple[Record, int]] = asyncio.Queue(maxsize=queue_size)
        self._mark = mark
        self._forgotten_since = forgotten_since
        self._on_logged = on_logged
        self._on_dropped = on_dropped
        self._task: asyncio.Task[None] | None = None

    def offer_impression(
        self,
        request_id: str,
        user_id: str,
        model_version: str,
        degraded: str | None,
        item_ids: Sequence[int] | np.ndarray,
        scores: Sequence[float] | np.ndarray,
        kind: str = "imp",
    ) -> None:
        """An answer (`imp`, sampled at `sample_rate`), or a shadow version's scores
        (`shadow`: not sampled again, the shadow rate sampled them)."""
        if kind == "imp" and not sampled(request_id, self.sample_rate):
            return
        ts_ms = int(time.time() * 1000)
        self._put(
            Impression.of(
                request_id, user_id, ts_ms, model_version, degraded, item_ids, scores, kind
            )
        )

    def offer_click(self, click: Click) -> None:
        self._put(click)  # never sampled out: a click of a sampled-out request joins nothing

    def _put(self, record: Record) -> None:
        try:
            self._queue.put_nowait((record, self._mark()))
        except asyncio.QueueFull:
            self._on_dropped("queue_full", 1)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def settled(self) -> None:
        """Returns once every record queued so far is written or dropped."""
        await self._queue.join()

    async def close(self, timeout_s: float) -> None:
        """Write what is queued (bounded by `timeout_s`), then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.settled()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        left = self._queue.qsize()
        if left:
            self._on_dropped("shutdown", left)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self.linger_s > 0 and self._queue.qsize() < BATCH - 1:
                # A pipeline's cost to the loop is mostly per call, not per record (one
                # record alone: ~360 µs of CPU; each of 32 together: ~65 µs): let more
                # records join before writing.
                await asyncio.sleep(self.linger_s)
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            keep = [r for r, m in batch if not self._forgotten_since(r.user_id, m)]
            if len(keep) < len(batch):
                self._on_dropped("forgotten", len(batch) - len(keep))
            try:
                if keep:
                    lost = await self._write(keep)
                    if lost:
                        self._on_dropped("redis", lost)
                    if lost < len(keep):
                        self._on_logged(len(keep) - lost)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down, slow or refusing: the log gives way
                log.debug("impression log: %d records dropped: %s", len(keep), e)
                self._on_dropped("redis", len(keep))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _args(self, records: list[Record]) -> list[bytes]:
        """`_WRITE_LUA`'s arguments for one stream's records."""
        args = [str(self.max_len).encode()]
        for record in records:
            record_args(record.fields(), args)
        return args

    async def _write(self, batch: list[Record]) -> int:
        """One script call per stream, concurrently; returns how many records were not
        written (their stream's call failed). A timeout raises: the whole batch counts."""
        streams: dict[str, list[Record]] = {}
        for record in batch:
            streams.setdefault(stream_key(shard_of(record.user_id, self.shards)), []).append(record)
        async with asyncio.timeout(self.timeout_s):
            done = await asyncio.gather(
                *(self._xadd(keys=[k], args=self._args(recs)) for k, recs in streams.items()),
                return_exceptions=True,
            )
        lost = 0
        for recs, result in zip(streams.values(), done, strict=True):
            if isinstance(result, BaseException):
                log.debug("impression log: %d records dropped: %s", len(recs), result)
                lost += len(recs)
        return lost
