"""One /rank request as the engine sees it: the model slot it started with, the user, its
deadline, its candidate count, the time each stage took and why the answer is degraded.
Created by the rank use case, carried through the state ladder, read by the metrics and
the response."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.engine.slot import ModelSlot


@dataclass(slots=True)
class Timings:
    redis: float = 0.0  # ms
    state: float = 0.0
    score: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
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

    def remaining_ms(self) -> float:
        return (self.deadline - time.perf_counter()) * 1e3
