"""One /rank request as the engine sees it: the model slot it started with, the user, its
deadline, its candidate count, the time each stage took, how its state was found and why
the answer is degraded. Created by the rank use case, filled in by the state ladder, read
by the response and, once per answered request, by `Metrics.observe_rank`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.engine.slot import ModelSlot


@dataclass(slots=True)
class Timings:
    queue: float = 0.0  # ms: arrival (HTTP middleware) to the use case's admission
    redis: float = 0.0
    state: float = 0.0
    score: float = 0.0
    serialize: float = 0.0  # filled in by the HTTP layer; not part of the answer
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "queue": round(self.queue, 3),
            "redis": round(self.redis, 3),
            "state": round(self.state, 3),
            "score": round(self.score, 3),
            "total": round(self.total, 3),
        }


@dataclass(slots=True)
class RankContext:
    slot: ModelSlot
    user: str
    deadline: float  # time.perf_counter() seconds
    candidates: int  # M: the scorer's share of the budget is reserved for it
    timings: Timings = field(default_factory=Timings)
    degraded: str | None = None  # partial_state, stale_state, no_history
    sequence_length: int | None = None  # None: Redis was not reached
    cache_result: str | None = None  # hit, refresh, miss (None: Redis was not reached)
    state_source: str | None = None  # local, redis, build
    forget_mark: int = 0  # Forgotten.mark() as the state lookup began (set by the resolver)
    admitted: float = field(default_factory=time.perf_counter)  # perf_counter() seconds

    @property
    def version(self) -> str:
        return self.slot.runtime.version

    def around_ms(self) -> float:
        """Since admission, the time outside the Redis, state and scorer stages."""
        tm = self.timings
        return (time.perf_counter() - self.admitted) * 1e3 - tm.redis - tm.state - tm.score

    def remaining_ms(self) -> float:
        return (self.deadline - time.perf_counter()) * 1e3
