"""What one `ifa-rank bench` run measures: sizes, repeats, durations, concurrencies."""

from __future__ import annotations

from dataclasses import dataclass

FIGURES = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "rps")


@dataclass(frozen=True)
class BenchPlan:
    quick: bool
    repeats: int
    duration_s: float
    warmup_s: float
    n_events: int = 100_000
    m: int = 500
    m_large: int = 2000  # the long candidate list (warm, one at a time)
    warm_users: int = 8
    bodies_per_user: int = 4
    cold_requests: int = 20
    cold_warmup: int = 2
    refresh_requests: int = 10
    items: int = 20_000
    concurrency: tuple[int, ...] = (1, 2, 8, 16)
    healthz_concurrency: tuple[int, ...] = (1, 8)  # the baseline and the generator's ceiling
    # open loop: fixed arrival rates as fractions of the saturated rate, the lower of
    # wrk's and the one answered beside the open-loop generator when it offers
    # `open_loop_ceiling_offer` times wrk's rate over `open_loop_ceiling_connections`
    open_loop_fractions: tuple[float, ...] = (0.5, 0.8, 1.0)
    open_loop_connections: int = 64
    open_loop_ceiling_offer: float = 1.5
    open_loop_ceiling_connections: int = 16
    # the same warm runs against several worker processes (`serve --workers N`)
    worker_counts: tuple[int, ...] = (2,)
    worker_concurrency: tuple[int, ...] = (1, 8, 16)
    # the interleaved variants (loadtest/bench_variants.py): a Redis Cluster beside one
    # Redis, the impression log off beside on
    cluster_concurrency: tuple[int, ...] = (1, 16)
    variants: bool = True

    @classmethod
    def make(
        cls, quick: bool, repeats: int | None = None, duration: float | None = None
    ) -> BenchPlan:
        if quick:
            return cls(
                quick=True,
                repeats=repeats or 3,
                duration_s=duration or 3.0,
                warmup_s=1.0,
                cold_requests=8,
                refresh_requests=5,
            )
        return cls(
            quick=False,
            repeats=repeats or 5,
            duration_s=duration or 10.0,
            warmup_s=2.0,
            cold_requests=30,
            refresh_requests=20,
        )
