"""Forgetting a user in Redis: delete every key of the user, and their entries in the
impression log, counted by kind.

Every key of a user carries the user id as its hash tag (`ifa:seq:{u}`,
`ifa:state:{u}:<version>`, `ifa:idem:{u}:<key>`), so the keys are found by the tag:

* one Redis: `SCAN ... MATCH ifa:*{u}*` over the whole keyspace, the tag's glob
  characters escaped. An admin path: keys/1000 round trips of `COUNT 1000`, other
  clients served between them (measured 0.65 s for a keyspace of 1M keys on loopback).
* a cluster: the user's keys all live in the slot of `{u}`: `CLUSTER COUNTKEYSINSLOT` and
  `CLUSTER GETKEYSINSLOT` on the node that owns it (routed by slot), a slot's keys only
  (about 1/16384 of the data set), listed at once: the command has no cursor, and the
  other users' keys of the slot stay.

Order: the sequence first (its name is known), then whatever the tag finds. From the
moment the sequence is gone a state write-back for the user is refused (the write-back
script checks that the sequence still holds the events a state covers,
`redis_store._WRITE_STATE_LUA`): a state of the old history is either found by the
search or refused (unless as many events were appended again in between).
Deletion is `UNLINK` in batches (all keys of a user are in one slot, so a multi-key call
is fine on a cluster too); a value is freed off Redis' main thread.

A new kind of per-user data kept in Redis under the user's hash tag joins `KINDS` (the
same scan finds it); data kept elsewhere, or in keys shared between users like the
impression log's streams (`ImpressionForgetter`), is another forgetter in the list the
forget use case runs (service/usecases/forget.py).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from service.store.impressions import shard_of, stream_key
from service.store.redis_store import (
    RedisSequenceStore,
    StoreUnavailable,
    idem_key,
    seq_key,
    state_key,
)

# kind (the answer's name) -> the key's prefix before the `{user}` tag
KINDS: Final = {
    "sequence": seq_key("").partition("{")[0],
    "states": state_key("", "").partition("{")[0],
    "idempotency_keys": idem_key("", "").partition("{")[0],
}
SCAN_COUNT: Final = 1000
DELETE_BATCH: Final = 500
_GLOB: Final = re.compile(r"([*?\[\]\\])")


def scan_pattern(user: str) -> str:
    """The SCAN pattern of a user's keys. The user id alphabet has no glob characters
    today ([A-Za-z0-9_.:@-]); escaping keeps a wider one from matching other users."""
    escaped = _GLOB.sub(r"\\\1", user)
    return f"ifa:*{{{escaped}}}*"


def kind_of(key: bytes | str, user: str) -> str | None:
    """The kind of `key` when it is one of `user`'s (exactly their tag, a known prefix)."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    for kind, prefix in KINDS.items():
        head = f"{prefix}{{{user}}}"
        if text == head or text.startswith(head + ":"):
            return kind
    return None


async def _guarded(
    store: RedisSequenceStore, op: str, fn: Callable[[], Awaitable[Any]], user: str | None
) -> Any:
    # the store's discipline (timeouts, every failure a StoreUnavailable), plus the cluster
    # client's own exception root, which is not a RedisError
    try:
        return await store._call(op, fn, user=user)
    except RedisClusterException as e:
        raise StoreUnavailable(f"redis {op}: {type(e).__name__}: {e}") from e


class RedisForgetter:
    """The Redis part of a forget: the user's sequence, states and idempotency keys."""

    kinds: tuple[str, ...] = tuple(KINDS)

    def __init__(self, store: RedisSequenceStore) -> None:
        self.store = store
        self.client = store.client

    async def _call(self, op: str, fn: Callable[[], Awaitable[Any]], user: str) -> Any:
        return await _guarded(self.store, op, fn, user)

    async def forget(self, user: str) -> dict[str, int]:
        """Delete the user's keys; how many of each kind were there."""
        removed = dict.fromkeys(KINDS, 0)
        removed["sequence"] = int(
            await self._call("forget", lambda: self.client.unlink(seq_key(user)), user)
        )
        by_kind: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
        for key in await self._keys(user):
            kind = kind_of(key, user)
            if kind is not None and kind != "sequence":  # (re-created by an append since)
                by_kind[kind].append(key)
        for kind, keys in by_kind.items():
            for i in range(0, len(keys), DELETE_BATCH):
                batch = keys[i : i + DELETE_BATCH]
                n = await self._call("forget", partial(self.client.unlink, *batch), user)
                removed[kind] += int(n)
        return removed

    async def _keys(self, user: str) -> list[bytes]:
        if isinstance(self.client, aioredis.RedisCluster):
            return await self._slot_keys(self.client, user)
        return await self._scan_keys(self.client, user)

    async def _scan_keys(self, client: aioredis.Redis, user: str) -> list[bytes]:
        pattern = scan_pattern(user)
        found: set[bytes] = set()  # SCAN may return a key twice
        cursor: Any = 0
        while True:
            scan = partial(client.scan, cursor, match=pattern, count=SCAN_COUNT)
            cursor, keys = await self._call("forget_scan", scan, user)
            found.update(keys)
            if int(cursor) == 0:
                return sorted(found)

    async def _slot_keys(self, client: aioredis.RedisCluster, user: str) -> list[bytes]:
        slot = key_slot(seq_key(user).encode())
        count = int(
            await self._call("forget_scan", lambda: client.cluster_countkeysinslot(slot), user)
        )
        while True:
            want = count + 1  # one more than counted: a key added since shows as a full reply
            listing = partial(client.cluster_get_keys_in_slot, slot, want)
            keys = await self._call("forget_scan", listing, user)
            if len(keys) < want:
                return [k.encode() if isinstance(k, str) else k for k in keys]
            count = 2 * count + 1


# One page of a shared impression stream, read and filtered inside Redis (an entry holds
# a whole answer's items and scores: kilobytes that need not cross the network): the
# entries after ARGV[1], at most ARGV[2] of them, those of user ARGV[3] deleted.
_FORGET_PAGE_LUA: Final = """
local page = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local deleted = 0
for _, entry in ipairs(page) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'uid' then
      if fields[i + 1] == ARGV[3] then
        deleted = deleted + redis.call('XDEL', KEYS[1], entry[1])
      end
      break
    end
  end
end
local last = false
if #page > 0 then last = page[#page][1] end
return {#page, deleted, last}
"""


class ImpressionForgetter:
    """The impression log's part (service/store/impressions.py): the user's entries,
    impressions and clicks alike (field `uid`), in their shard's stream. The stream is
    shared with other users, so all of it is read, `SCAN_COUNT` entries per script call,
    inside Redis (the log keeps about IFA_IMPRESSION_MAX_LEN entries in all). Records
    still queued in a replica's log writer at that moment (milliseconds' worth) are
    written after it."""

    kinds: tuple[str, ...] = ("impressions",)

    def __init__(self, store: RedisSequenceStore, shards: int) -> None:
        self.store = store
        self.shards = shards
        self._page = store.client.register_script(_FORGET_PAGE_LUA)

    async def forget(self, user: str) -> dict[str, int]:
        key = stream_key(shard_of(user, self.shards))
        start: bytes | str = "-"
        deleted = 0
        while True:
            page = partial(self._page, keys=[key], args=[start, SCAN_COUNT, user])
            read, gone, last = await _guarded(self.store, "forget_impressions", page, None)
            deleted += int(gone)
            if int(read) < SCAN_COUNT:
                return {"impressions": deleted}
            start = b"(" + bytes(last)  # exclusive: after the last entry read
