"""The one cost model the engine plans with: what scoring M candidates, building a state
from N events and reading N records from Redis are expected to take.

Scoring and building are fitted (a + b·x) on the timings the runtime measures at warm-up;
reading is a moving average of the bulk reads actually made, and the scorer's fit is
scaled by how much slower inline calls actually run under load (`score_ms_now`). What an
answer costs beyond its state and scorer (serialisation, the envelope, the metrics) is a
moving average of the answers made (`rest_ms_now` adds it). The inference pool keeps its
own queue estimate (how long a job waits, not how long it runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

READ_MS_PER_RECORD = 3e-5  # the guess before the first bulk read
READ_EWMA = 0.2  # weight of a new read in the moving average
MIN_READ_SAMPLE = 1000  # records: shorter reads are dominated by the round trip
SCORE_EWMA = 0.05  # weight of a new inline scorer call in the load factor
AROUND_EWMA = 0.05  # weight of a new answer in the time around the scorer
MAX_SCORE_LOAD = 10.0
# Plans take an observed cost at its mean plus this many mean absolute deviations: at the
# mean, about half the answers admitted with little budget to spare would finish late.
SPREAD = 2.0


@dataclass
class Observed:
    """A moving average and a moving mean absolute deviation around it."""

    mean: float
    weight: float
    dev: float = 0.0

    def add(self, x: float) -> None:
        self.dev += self.weight * (abs(x - self.mean) - self.dev)
        self.mean += self.weight * (x - self.mean)

    def high(self) -> float:
        """What to plan with: the mean and SPREAD deviations."""
        return self.mean + SPREAD * self.dev


@dataclass
class Warmup:
    """Median timings measured by `ModelRuntime.warmup`, in ms."""

    build_ms: dict[int, float] = field(default_factory=dict)  # events -> build_state time
    score_ms: dict[int, float] = field(default_factory=dict)  # candidates -> score time
    chunk_events: int = 16_384  # events per state-graph call (a build is ceil(n/chunk) calls)


def _line(points: dict[int, float], fixed: float, slope: float) -> tuple[float, float]:
    """(a, b) of a + b·x through the points; the defaults when there are too few."""
    if len(points) >= 2:
        xs = np.array(list(points), float)
        ys = np.array(list(points.values()), float)
        b, a = np.polyfit(xs, ys, 1)
        return max(float(a), 0.0), max(float(b), 1e-6)
    if points:
        return next(iter(points.values())), slope
    return fixed, slope


@dataclass
class CostModel:
    score_fixed_ms: float = 0.2
    score_per_candidate_ms: float = 0.001
    build_fixed_ms: float = 0.5  # per state-graph call
    build_per_event_ms: float = 0.002
    chunk_events: int = 16_384
    read_ms_per_record: float = READ_MS_PER_RECORD
    # Observed / fitted scorer time (>= 1): the fit is taken on an idle process at
    # warm-up, and under load the same call takes about twice as long (shared caches, the
    # other core busy). Admission plans with the observed time.
    score_load: Observed = field(default_factory=lambda: Observed(1.0, SCORE_EWMA))
    # ms an answer takes after admission beyond its Redis, state and scorer stages: the
    # answer's serialisation, its envelope and metrics, and the Python around them (the
    # ordering is in the scorer's stage).
    around: Observed = field(default_factory=lambda: Observed(0.0, AROUND_EWMA))

    @classmethod
    def from_warmup(cls, w: Warmup) -> CostModel:
        cost = cls(chunk_events=w.chunk_events)
        cost.score_fixed_ms, cost.score_per_candidate_ms = _line(
            w.score_ms, cost.score_fixed_ms, cost.score_per_candidate_ms
        )
        built = {n: ms for n, ms in w.build_ms.items() if n > 0}
        cost.build_fixed_ms, cost.build_per_event_ms = _line(
            built, cost.build_fixed_ms, cost.build_per_event_ms
        )
        return cost

    def score_ms(self, candidates: int) -> float:
        return self.score_fixed_ms + self.score_per_candidate_ms * candidates

    def score_ms_now(self, candidates: int) -> float:
        """What scoring M candidates takes at the moment (the fit times the load factor)."""
        return self.score_ms(candidates) * self.score_load.high()

    def rest_ms_now(self, candidates: int) -> float:
        """What an answer still costs once its state is in hand: the scorer at the
        moment and the work around it."""
        return self.score_ms_now(candidates) + self.around.high()

    def observe_around(self, ms: float) -> None:
        """An answer that took `ms` after admission beyond its Redis, state and scorer."""
        self.around.add(max(ms, 0.0))

    def observe_score(self, candidates: int, ms: float) -> None:
        """An inline scorer call (no queue in it) that took `ms`."""
        ratio = min(max(ms / self.score_ms(candidates), 1.0), MAX_SCORE_LOAD)
        self.score_load.add(ratio)

    def build_ms(self, events: int) -> float:
        if events <= 0:
            return 0.0
        calls = -(-int(events) // self.chunk_events)
        return calls * self.build_fixed_ms + events * self.build_per_event_ms

    def read_ms(self, records: int) -> float:
        return records * self.read_ms_per_record

    def observe_read(self, records: int, ms: float) -> None:
        """A bulk read that took `ms`: refine the per-record estimate."""
        if records >= MIN_READ_SAMPLE:
            per = ms / records
            self.read_ms_per_record += READ_EWMA * (per - self.read_ms_per_record)
