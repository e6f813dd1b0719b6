"""Locust scenarios: the traffic a recommender front end sends to the ranking service.

    locust -f loadtest/locustfile.py --host http://ranker:8000 --headless -u 50 -r 10 -t 5m
    python -m loadtest.run            # starts a local service, seeds it, gates on the result

Users (weights set the mix; `--class-picker` in the web UI to pick some):

* `WarmRanker` (rank-heavy feed traffic): POST /rank for users with cached histories,
  candidate counts log-uniform in [--min-candidates, --max-candidates] (100..1000),
  half the calls with `top_k` 50, Poisson arrivals (exponential think time).
* `EventWriter`: a user's session: POST /events with 1-20 new behaviours (idempotency
  key on every batch, so locust's retries cannot double-append), then /rank for it.
* `ColdRanker`: first contact: users seeded with long histories that nothing has ranked
  yet (`--cold-prefix`, one pass over the pool), then brand-new users with no history.
* `BurstyRanker`: on/off Poisson process: quiet, then bursts at --burst-factor times
  the rate (a page load fanning out several rank calls at once).

Seeded ids are `<prefix>-<i>` for i < count (see `ifa-rank seed`). Against a remote
deployment, seed its Redis first (`ifa-rank seed --redis-url ... --prefix warm`) or point
`--warm-prefix` at users it already has. Load generation on the service's own box costs
CPU: locust's numbers here are for SLO gating, not the latency figures of `make bench`.
"""

from __future__ import annotations

import itertools
import math
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.env import Environment

_cold_counter = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("ifa-rank scenarios")
    g.add_argument("--warm-prefix", default="warm", env_var="LOADTEST_WARM_PREFIX")
    g.add_argument(
        "--warm-users",
        type=int,
        default=100,
        env_var="LOADTEST_WARM_USERS",
        help="seeded users <warm-prefix>-0..N-1",
    )
    g.add_argument("--cold-prefix", default="cold", env_var="LOADTEST_COLD_PREFIX")
    g.add_argument(
        "--cold-users",
        type=int,
        default=0,
        env_var="LOADTEST_COLD_USERS",
        help="seeded, never-ranked users; after them, brand-new users",
    )
    g.add_argument("--items", type=int, default=20_000, env_var="LOADTEST_ITEMS")
    g.add_argument("--min-candidates", type=int, default=100, env_var="LOADTEST_MIN_CANDIDATES")
    g.add_argument("--max-candidates", type=int, default=1000, env_var="LOADTEST_MAX_CANDIDATES")
    g.add_argument(
        "--rate",
        type=float,
        default=10.0,
        env_var="LOADTEST_RATE",
        help="mean requests/s per simulated user (Poisson)",
    )
    g.add_argument("--burst-factor", type=float, default=8.0, env_var="LOADTEST_BURST_FACTOR")
    g.add_argument(
        "--budget-ms",
        type=float,
        default=0.0,
        env_var="LOADTEST_BUDGET_MS",
        help="budget_ms sent with /rank (0: the service default)",
    )


def _opt(env: Environment, name: str, default: Any) -> Any:
    opts = env.parsed_options
    return getattr(opts, name, default) if opts is not None else default


def poisson_wait(rate_of: Callable[[Any], float]) -> Callable[[Any], float]:
    """wait_time for Poisson arrivals: exponential gaps with mean 1 / rate."""

    def wait(user: Any) -> float:
        return random.expovariate(max(rate_of(user), 1e-6))

    return wait


def candidate_count(lo: int, hi: int) -> int:
    """Log-uniform in [lo, hi]: many small pages, a long tail of big ones."""
    lo, hi = max(1, lo), max(lo, hi)
    return round(math.exp(random.uniform(math.log(lo), math.log(hi))))


class _Ranker(FastHttpUser):
    abstract = True

    def rank(self, user_id: str, name: str, top_k: int | None = None) -> None:
        env = self.environment
        m = candidate_count(_opt(env, "min_candidates", 100), _opt(env, "max_candidates", 1000))
        items = _opt(env, "items", 20_000)
        body: dict[str, Any] = {
            "user_id": user_id,
            "candidates": [random.randrange(items) for _ in range(m)],
        }
        if top_k:
            body["top_k"] = top_k
        budget = _opt(env, "budget_ms", 0.0)
        if budget:
            body["budget_ms"] = budget
        with self.client.post("/rank", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
                return
            data = r.json()
            got = len(data.get("items", []))
            want = min(m, top_k) if top_k else m
            if got != want:
                r.failure(f"{got} items for {m} candidates (top_k {top_k})")

    def warm_user(self) -> str:
        env = self.environment
        n = max(1, _opt(env, "warm_users", 100))
        return f"{_opt(env, 'warm_prefix', 'warm')}-{random.randrange(n)}"


class WarmRanker(_Ranker):
    weight = 6
    wait_time = poisson_wait(lambda u: _opt(u.environment, "rate", 10.0))

    @task
    def rank_warm(self) -> None:
        self.rank(self.warm_user(), "/rank warm", top_k=random.choice((None, 50)))


class EventWriter(_Ranker):
    weight = 2
    wait_time = poisson_wait(lambda u: _opt(u.environment, "rate", 10.0) / 2)

    @task
    def session(self) -> None:
        user = self.warm_user()
        items = _opt(self.environment, "items", 20_000)
        now = int(time.time())
        evs = [
            {"item_id": random.randrange(items), "ts": now, "action": random.randrange(4)}
            for _ in range(random.randint(1, 20))
        ]
        body = {"user_id": user, "events": evs, "idempotency_key": uuid.uuid4().hex}
        with self.client.post("/events", json=body, name="/events", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
                return
            if r.json().get("appended") != len(evs):
                r.failure(f"appended {r.json().get('appended')} of {len(evs)}")
        self.rank(user, "/rank after events", top_k=50)


class ColdRanker(_Ranker):
    weight = 1
    wait_time = between(0.5, 1.5)

    @task
    def rank_cold(self) -> None:
        env = self.environment
        k = next(_cold_counter)
        if k < _opt(env, "cold_users", 0):
            self.rank(f"{_opt(env, 'cold_prefix', 'cold')}-{k}", "/rank cold (seeded)")
        else:
            self.rank(f"new-{uuid.uuid4().hex[:16]}", "/rank new user", top_k=50)


class BurstyRanker(_Ranker):
    """On/off: 2 s quiet at 1/4 the rate, 0.5 s bursts at burst_factor times it."""

    weight = 1

    def wait_time(self) -> float:
        rate = _opt(self.environment, "rate", 10.0)
        phase = time.monotonic() % 2.5
        factor = _opt(self.environment, "burst_factor", 8.0) if phase >= 2.0 else 0.25
        return random.expovariate(max(rate * factor, 1e-6))

    @task
    def rank_burst(self) -> None:
        self.rank(self.warm_user(), "/rank burst", top_k=random.choice((None, 50)))
