"""Which users' cached states are known to be current without asking Redis.

A user is *verified* at length n when a snapshot read showed the sequence at n and no
invalidation for that user arrived between the read's start and its answer (an
invalidation that races the read poisons it). A verified user stays verified until an
invalidation for them arrives (pushed by Redis, `service.store.push`), this replica
appends for them (`invalidate`, before /events answers, so a /rank that follows an
acknowledged append through this replica always sees it), `max_age_s` passes (the bound
on staleness should a push be lost without the channel noticing), or the channel's state
changes (everything is forgotten: pushes may have been missed).

`fresh(user, n)` is true only for a verified user whose cached state covers exactly n
events, while the channel is up. Bounded: at most `capacity` users are remembered (LRU).

`due(user)`: a verified user past half of `max_age_s` with no read of theirs in flight.
The resolver then re-reads their length in the background while the request is answered
from the cache (still within the bound), so a user asked for more often than every
`max_age_s / 2` never waits for the re-check on a request's path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class Freshness:
    def __init__(
        self,
        capacity: int,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = max(1, capacity)
        self.max_age_s = max_age_s
        self._clock = clock
        self.up = False  # the push channel is live: only then is anything fresh
        self._verified: OrderedDict[str, tuple[int, float]] = OrderedDict()  # n, when
        self._reading: dict[str, int] = {}  # snapshot reads in flight per user
        self._poisoned: set[str] = set()
        self._generation = 0  # bumped on every channel state change
        self.invalidations = 0

    def fresh(self, user: str, n: int) -> bool:
        if not self.up:
            return False
        seen = self._verified.get(user)
        if seen is None or seen[0] != n:
            return False
        if self._clock() - seen[1] > self.max_age_s:
            del self._verified[user]
            return False
        return True

    def reading(self, user: str) -> bool:
        """A snapshot read of `user` is in flight."""
        return user in self._reading

    def due(self, user: str) -> bool:
        seen = self._verified.get(user)
        return (
            seen is not None
            and user not in self._reading
            and self._clock() - seen[1] > 0.5 * self.max_age_s
        )

    def begin(self, user: str) -> int:
        """A snapshot read of `user` starts; pass the token to `end`."""
        self._reading[user] = self._reading.get(user, 0) + 1
        return self._generation

    def end(self, user: str, token: int, length: int | None) -> None:
        """The read answered `length` events (None: it failed)."""
        left = self._reading.get(user, 1) - 1
        if left > 0:
            self._reading[user] = left
        else:
            self._reading.pop(user, None)
        poisoned = user in self._poisoned
        if left <= 0:
            self._poisoned.discard(user)
        if length is None or poisoned or not self.up or token != self._generation:
            return
        self._verified[user] = (length, self._clock())
        self._verified.move_to_end(user)
        if len(self._verified) > self.capacity:
            self._verified.popitem(last=False)

    def invalidate(self, user: str) -> None:
        self.invalidations += 1
        self._verified.pop(user, None)
        if user in self._reading:
            self._poisoned.add(user)

    def invalidate_all(self) -> None:
        self._verified.clear()
        self._poisoned.update(self._reading)

    def set_up(self, up: bool) -> None:
        """The push channel went up or down: forget everything either way."""
        self.up = up
        self._generation += 1
        self.invalidate_all()

    def __len__(self) -> int:
        return len(self._verified)
