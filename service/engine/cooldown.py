"""The /rank cooldown after a Redis failure: skip Redis for a while and answer degraded at
once, instead of every request paying a timeout against a dead or hung server."""

from __future__ import annotations

import time

from service.store.redis_store import StoreUnavailable


class Cooldown:
    """After Redis fails, /rank skips it for a while (answers degrade at once instead of
    every request paying a timeout against a dead or hung server). Kept per node (the
    error's `scope`): on a cluster, a lost primary does not degrade the other users.

    A refused or broken connection trips it at once. A timeout trips it only as the
    `timeouts_to_trip`-th in a row with no success between: on a CPU-saturated box a
    healthy Redis' replies are read late now and then, and taking that for an outage
    would turn most answers stale (a hung server times out every call and still trips)."""

    def __init__(self, cooldown_ms: float, timeouts_to_trip: int = 3) -> None:
        self._cooldown = cooldown_ms / 1000.0
        self._timeouts_to_trip = max(1, timeouts_to_trip)
        self._timeouts: dict[str | None, int] = {}
        self._until: dict[str | None, float] = {}

    def blocked(self, scope: str | None = None) -> bool:
        until = self._until.get(scope)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._until[scope]
        return False

    def failed(self, error: StoreUnavailable) -> None:
        scope = error.scope
        if error.timed_out:
            self._timeouts[scope] = self._timeouts.get(scope, 0) + 1
            if self._timeouts[scope] < self._timeouts_to_trip:
                return
        self._timeouts.pop(scope, None)
        self.trip(scope)

    def succeeded(self, scope: str | None = None) -> None:
        self._timeouts.pop(scope, None)

    def trip(self, scope: str | None = None) -> None:
        self._until[scope] = time.monotonic() + self._cooldown

    def reset(self) -> None:
        self._until.clear()
