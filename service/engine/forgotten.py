"""Users forgotten lately (`DELETE /users/{id}`, here or on another replica), so that work
which read a user's data before the forget cannot put it back.

A state build or a snapshot read can be in flight while a user is forgotten: it holds
events or a state read before the deletion and would cache it, or write it back to Redis,
after. Such work takes a `mark()` when it starts and keeps its result only while
`since(user, mark)` is false.

Bounded: the last `capacity` forgets are remembered. Work older than the oldest of them
cannot tell whether its user was among those dropped, so it is treated as forgotten: it
is not cached (a later request rebuilds it), which is never wrong, only slower.
"""

from __future__ import annotations

from collections import OrderedDict


class Forgotten:
    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = max(1, capacity)
        self._clock = 0  # bumped by every forget: marks compare against it
        self._last: OrderedDict[str, int] = OrderedDict()  # user -> clock at their forget
        self._dropped = 0  # the newest clock value among the forgets no longer remembered

    def mark(self) -> int:
        """Now, for a later `since`."""
        return self._clock

    def forget(self, user: str) -> None:
        self._clock += 1
        self._last[user] = self._clock
        self._last.move_to_end(user)
        while len(self._last) > self.capacity:
            _, at = self._last.popitem(last=False)
            self._dropped = max(self._dropped, at)

    def since(self, user: str, mark: int) -> bool:
        """Was `user` forgotten after `mark` (or can that no longer be ruled out)?"""
        at = self._last.get(user)
        if at is not None:
            return at > mark
        return mark < self._dropped

    def __len__(self) -> int:
        return len(self._last)
