"""Sustained load well above what the service can serve within the budget: the excess is
shed at once with 503 + Retry-After, nothing else goes wrong, and the moment the load
stops the service answers normally again. Real uvicorn, real Redis, the bench's lean
closed-loop client (64 connections, so the server, not the client, is the bottleneck)."""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Final

import numpy as np
from e2e.uvicorn_proc import Service, start_service

from loadtest.httpload import LoadResult, build_request, run_load
from service.store.embedded_redis import RedisServer

CONNECTIONS = 64
# 64 connections queue for more than this most of the time (a served answer costs the
# loop ~0.3-0.5 ms, a shed one ~0.1 ms), whatever the box's speed: most must be shed.
# 10 ms rather than less: preemption by the load client and Redis on the same 2 cores
# (a millisecond or two) must not decide whether an answer kept its budget.
BUDGET_MS = 10.0
BUDGET = f'"budget_ms": {BUDGET_MS}'.encode()
PROBE_BUDGET_MS = 3.0


LE: Final = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.1, float("inf"))


def served_histogram(svc: Service) -> np.ndarray:
    """Cumulative counts of the answers served (ok or degraded, not shed) by the service's
    own request duration histogram, at the bucket bounds LE."""
    return np.array(
        [
            sum(
                svc.metric(
                    "ifa_rank_request_duration_seconds_bucket",
                    le="+Inf" if le == float("inf") else str(le),
                    outcome=outcome,
                )
                for outcome in ("ok", "degraded")
            )
            for le in LE
        ]
    )


def test_overload_is_shed_with_503_and_retry_after_then_recovers(
    redis_server: RedisServer, tiny_artifacts: Path, tmp_path: Path
) -> None:
    svc = start_service(
        redis_server, tiny_artifacts, tmp_path / "service.log", IFA_SHED_MIN_WAIT_MS="1"
    )
    rng = np.random.default_rng(0)
    bodies = [
        json.dumps(
            {
                "user_id": f"ovl-{i % 8}",
                "candidates": rng.integers(0, 100, 64).tolist(),
                "budget_ms": BUDGET_MS,
            }
        ).encode()
        for i in range(32)
    ]
    probe_statuses: Counter[int] = Counter()
    retry_after: set[str | None] = set()
    served_ms: list[float] = []
    result: list[LoadResult] = []
    try:
        conn = http.client.HTTPConnection(svc.host, svc.port, timeout=30)
        # every user warm and verified first (the load measures shedding, not builds):
        # the first answer builds the state, the second's read verifies it
        for b in bodies[:8] * 2:
            conn.request("POST", "/rank", b.replace(BUDGET, b'"budget_ms": 60000'))
            assert conn.getresponse().read() and True
        reqs = [build_request("POST", "/rank", b, host=f"{svc.host}:{svc.port}") for b in bodies]
        failed: list[BaseException] = []

        def drive() -> None:
            try:
                result.append(run_load(svc.host, svc.port, reqs, CONNECTIONS, 3.0, 0.5))
            except BaseException as e:  # reported below, with the service's log
                failed.append(e)

        before = served_histogram(svc)
        # the probe's budget is tighter than the load's, so it meets the shedding too
        probe = bodies[0].replace(BUDGET, f'"budget_ms": {PROBE_BUDGET_MS}'.encode())
        load = threading.Thread(target=drive)
        load.start()
        while load.is_alive():  # one more client beside the load, reading headers
            conn.request("POST", "/rank", probe, {"content-type": "application/json"})
            r = conn.getresponse()
            payload = r.read()
            probe_statuses[r.status] += 1
            if r.status == 503:
                retry_after.add(r.getheader("retry-after"))
            elif r.status == 200:
                served_ms.append(json.loads(payload)["timings_ms"]["total"])
        load.join()
        under_load = served_histogram(svc) - before  # the whole load's answers, not a sample
        # the load is gone: a request with an ordinary budget is served at once (the
        # 3 ms one could still meet the tail of the backlog being answered)
        relaxed = bodies[1].replace(BUDGET, b'"budget_ms": 1000')
        assert relaxed != bodies[1]
        conn.request("POST", "/rank", relaxed, {"content-type": "application/json"})
        after = conn.getresponse()
        after.read()
        conn.close()
    finally:
        clean = svc.stop()
    assert not failed and result, (failed, svc.log()[-2000:])
    (res,) = result
    statuses = Counter(res.status_counts) + probe_statuses
    assert set(statuses) <= {200, 503}, statuses  # shed or served, nothing else
    assert statuses[503] > 0 and statuses[200] > 0, statuses
    assert probe_statuses[503] > 0 and retry_after == {"1"}, (probe_statuses, retry_after)
    assert after.status == 200, after.status  # full service the moment the load stops
    assert clean, svc.log()[-2000:]
    # Accepted answers keep the budget (by the service's own clock, from the request's
    # first byte to its answer sent): admission counts the wait and plans with what the
    # answer still costs as observed (the scorer under load and the work around it, above
    # their means), and no admitted request starts a Redis round trip that cannot come
    # back in time. The bug this test was written for (a Redis read started by an
    # admitted request waited for the whole queue again) made such answers take about
    # 190 ms against a 3 ms budget, far outside either line. Five runs alone on a busy
    # box gave 96.7-99.8 % within the budget and all within twice it; inside `make test`
    # (this process traced by coverage, its load client slower and hungrier) 89 % and
    # 97.7 %. Preemption on two shared cores decides that last part, so the line is
    # drawn well below: 75 % within the budget, 95 % within twice it. How close admission
    # plans is the unit tests' part (test_state_ladder.py, test_cost.py).
    served = under_load[-1]
    within = under_load[LE.index(BUDGET_MS / 1e3)]
    within_twice = under_load[LE.index(2 * BUDGET_MS / 1e3)]
    p = np.percentile(served_ms, [50, 99]) if served_ms else [float("nan")] * 2
    print(
        f"overload: {dict(statuses)} over {res.duration_s:.1f} s; of {served:.0f} answers "
        f"served, {within / served:.1%} within the {BUDGET_MS:.0f} ms budget and "
        f"{within_twice / served:.1%} within twice it (the service's histogram, arrival to "
        f"answer sent); probe's answers ({PROBE_BUDGET_MS:.0f} ms budget): p50 {p[0]:.2f} ms, "
        f"p99 {p[1]:.2f} ms (timings_ms.total)"
    )
    histogram = {le: int(n) for le, n in zip(LE, under_load, strict=True)}
    assert within >= 0.75 * served, histogram
    assert within_twice >= 0.95 * served, histogram
