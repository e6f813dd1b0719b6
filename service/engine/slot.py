"""A loaded model version: the runtime seam it is used through, its own state cache and
its score-time fit. A request takes the slot once at its start and uses it to the end,
so a reload never mixes versions inside one request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ifa_common.state import UserState
from service.engine.state_cache import StateCache


class Runtime(Protocol):
    """What the service uses of `service.engine.runtime.ModelRuntime` (docs/CONTRACTS.md)."""

    version: str
    provider: str
    providers: list[str]
    manifest: dict[str, Any]
    dims: tuple[int, int, int]

    def empty_state(self) -> UserState: ...
    def build_state(self, events: np.ndarray) -> UserState: ...
    def fold(self, state: UserState, partial: UserState) -> UserState: ...
    def score(self, state: UserState, items: np.ndarray) -> np.ndarray: ...
    def serialize_state(self, state: UserState) -> bytes: ...
    def deserialize_state(self, buf: bytes) -> UserState: ...
    def estimate_build_ms(self, n_events: int) -> float: ...


@dataclass
class ModelSlot:
    """One loaded model version with its own state cache and cost model.

    A request takes the slot once at its start and uses it to the end, so a reload
    (which swaps `ModelRegistry.slot`) never mixes versions inside one request.
    """

    runtime: Runtime
    cache: StateCache
    warmup_ms: dict[str, float] = field(default_factory=dict)
    score_fixed_ms: float = 0.2
    score_per_candidate_ms: float = 0.001
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.runtime.version

    def calibrate(self, counts: Sequence[int]) -> None:
        """Fit score time = a + b * M on the warm-up timings (score_<M> entries)."""
        pts = [(m, self.warmup_ms[f"score_{m}"]) for m in counts if f"score_{m}" in self.warmup_ms]
        if len(pts) >= 2:
            ms = np.array([p[0] for p in pts], float)
            ts = np.array([p[1] for p in pts], float)
            b, a = np.polyfit(ms, ts, 1)
            self.score_per_candidate_ms = max(float(b), 1e-6)
            self.score_fixed_ms = max(float(a), 0.0)
        elif pts:
            self.score_fixed_ms = pts[0][1]

    def estimate_score_ms(self, m: int) -> float:
        return self.score_fixed_ms + self.score_per_candidate_ms * m
