"""Forgetting a user (`DELETE /users/{id}`): their data in every store, and every cached
state of them on every replica.

On the replica that takes the request:

1. drop the user here (the cached state, a pending write-back, what `Freshness`
   trusts) and remember the forget in `Forgotten`, so that a build or a read already in
   flight does not cache or write back what it read;
2. run every `Forgetter` (Redis: the sequence first, then states and idempotency keys;
   a later impression log adds its own);
3. drop the user here again: work that read Redis before step 2 finished is refused by
   the newer entry in `Forgotten`, and a state cached between 1 and 3 is dropped;
4. publish the forget on `FORGET_CHANNEL`; every other replica (and sibling worker)
   does 1 on receipt.

Without the message a replica still drops its state at its next Redis read of the user
(the sequence is then shorter than the state), and in push mode the sequence's deletion
is itself an invalidation. The message adds what those cannot: a build in flight there
is not cached, and a user who appends at least as many events as the forgotten state
covered before that replica reads again does not get them folded onto it. A replica
whose channel is down at that moment misses it (docs/service.md "Forgetting a user").
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from service.engine.forgotten import Forgotten
from service.engine.freshness import Freshness
from service.engine.registry import ModelRegistry
from service.engine.state_cache import StateWriteBack
from service.metrics import Metrics
from service.store.redis_store import SequenceStore

log = logging.getLogger(__name__)

# Not under ifa:control:<group>: a worker group could be named "forget".
FORGET_CHANNEL: Final = "ifa:forget"


class Forgetter(Protocol):
    """One store of per-user data: deletes a user's, returns how much of each kind."""

    kinds: tuple[str, ...]

    async def forget(self, user: str) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class ForgetResult:
    user: str
    removed: dict[str, int]  # kind -> items removed (every kind of every forgetter)
    cached_states_dropped: int  # on this replica


class ForgetUseCase:
    def __init__(
        self,
        forgetters: Sequence[Forgetter],
        store: SequenceStore,
        registry: ModelRegistry,
        freshness: Freshness,
        forgotten: Forgotten,
        writeback: StateWriteBack,
        metrics: Metrics,
    ) -> None:
        self.forgetters = list(forgetters)
        self.store = store
        self.registry = registry
        self.freshness = freshness
        self.forgotten = forgotten
        self.writeback = writeback
        self.metrics = metrics
        self.origin = uuid.uuid4().hex  # this process: its own broadcast comes back to it

    async def forget(self, user: str) -> ForgetResult:
        """StoreUnavailable when a store fails (some data may be gone: retry; a forget of
        nothing is a forget that removes zeros)."""
        dropped = self.drop_local(user)
        removed: dict[str, int] = {}
        try:
            for forgetter in self.forgetters:
                removed.update(await forgetter.forget(user))
        finally:
            dropped += self.drop_local(user)
        message = json.dumps({"user": user, "origin": self.origin}).encode()
        await self.store.publish(FORGET_CHANNEL, message)
        self.metrics.users_forgotten.labels("request").inc()
        self.metrics.forgotten_states.labels("request").inc(dropped)
        log.info("forgot user %s: %s, %d cached states", user, removed, dropped)
        return ForgetResult(user, removed, dropped)

    def drop_local(self, user: str) -> int:
        """Everything this process holds of `user`; the number of cached states dropped."""
        self.forgotten.forget(user)
        self.freshness.invalidate(user)
        self.writeback.discard(user)
        # Every version served (a rollout's candidate and shadow hold states too); a slot
        # no longer served lives on only in the requests that took it, and whatever they
        # cache or write is refused by `forgotten`.
        return sum(int(s.cache.forget(user)) for _, s, _ in self.registry.served())

    def on_broadcast(self, payload: bytes) -> None:
        """Another replica forgot a user."""
        try:
            message = json.loads(payload)
            user, origin = str(message["user"]), str(message["origin"])
        except (ValueError, KeyError, TypeError):
            log.warning("forget message ignored: %r", payload[:200])
            return
        if origin == self.origin:
            return
        dropped = self.drop_local(user)
        self.metrics.users_forgotten.labels("broadcast").inc()
        self.metrics.forgotten_states.labels("broadcast").inc(dropped)
