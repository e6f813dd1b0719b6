"""The service on a real Redis Cluster (3 primaries, a replica each) under traffic: a
primary killed, then slots resharded. A real uvicorn process, HTTP traffic from threads.

What is measured is printed (pytest -s shows it): seconds to recovery and the counts of
degraded answers and 503s. docs/deploy.md quotes a run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis
from e2e.http_traffic import Traffic
from e2e.uvicorn_proc import Service, service_env
from redis.crc import key_slot
from svc_helpers import wait_until

from ifa_common.records import unpack
from loadtest.redis_cluster import LocalRedisCluster
from loadtest.server import http_json
from service.store.redis_store import seq_key

pytestmark = pytest.mark.slow


def cluster_service(cluster: LocalRedisCluster, artifacts: Path, log: Path) -> Service:
    env = service_env(
        cluster.url,
        artifacts,
        IFA_REDIS_CLUSTER="true",
        # an acknowledged append is on a replica too: it survives the primary's loss
        IFA_EVENTS_WAIT_REPLICAS="1",
        IFA_EVENTS_WAIT_MS="150",
        IFA_REDIS_TIMEOUT_MS="300",
        IFA_REDIS_COOLDOWN_MS="100",
    )
    return Service(env, log).start()


def users_on(cluster: LocalRedisCluster, prefix: str, per_master: int) -> dict[int, list[str]]:
    """`per_master` user ids on each primary (by their keys' slot)."""
    out: dict[int, list[str]] = {port: [] for port, _ in cluster.masters()}
    i = 0
    while any(len(v) < per_master for v in out.values()):
        u = f"{prefix}-{i}"
        i += 1
        port = cluster.master_of_slot(key_slot(seq_key(u).encode()))
        if len(out[port]) < per_master:
            out[port].append(u)
    return out


def stored_items(cluster: LocalRedisCluster, user: str) -> list[int]:
    with redis.RedisCluster.from_url(cluster.url) as c:
        raw = c.get(seq_key(user)) or b""
    return [int(x) for x in unpack(raw)["item_id"]]


def assert_each_ack_once(traffic: Traffic, cluster: LocalRedisCluster) -> None:
    for user in traffic.writers:
        items = stored_items(cluster, user)
        acked = traffic.acked.get(user, 0)
        # exactly 0, 1, 2, ... once each: retried appends duplicated nothing; every
        # acknowledged one is there (the last may have landed unacknowledged at the stop)
        assert items == list(range(len(items))), (user, items[:20])
        assert acked <= len(items) <= acked + 1, (user, acked, len(items))


def test_a_primary_killed_under_traffic(
    private_redis_cluster: LocalRedisCluster, tiny_artifacts: Path, tmp_path: Path
) -> None:
    cluster = private_redis_cluster
    svc = cluster_service(cluster, tiny_artifacts, tmp_path / "svc.log")
    try:
        by_master = users_on(cluster, "fo", per_master=4)
        victim = next(iter(by_master))
        lost = set(by_master[victim])
        users = [u for us in by_master.values() for u in us]
        writers = [us[0] for us in by_master.values()]  # one writer per primary
        traffic = Traffic(svc.port, users, writers).start()
        time.sleep(1.5)
        t_kill = time.monotonic()
        cluster.kill(victim)
        # one node down is not "Redis unreachable": the pod stays in the Service
        assert http_json(svc.base_url + "/readyz")[0] == 200
        failover_s = cluster.wait_failover(victim)
        cluster.restart(victim)  # what an orchestrator does: it comes back as a replica
        cluster.wait_healthy()
        healed_s = time.monotonic() - t_kill

        def full_again() -> bool:
            recent = traffic.since(time.monotonic() - 1.0)
            return len(recent) > 20 and all(a.degraded is None for a in recent)

        wait_until(full_again, what="every answer full again")
        time.sleep(0.5)
        traffic.stop()
    finally:
        svc.stop()

    answers = traffic.answers
    after = [a for a in answers if a.t >= t_kill]
    degraded = [a for a in after if a.degraded is not None]
    recovered_s = max((a.t for a in degraded), default=t_kill) - t_kill
    collateral = [a for a in degraded if a.user not in lost]
    ev = np.array(traffic.event_statuses)
    print(
        f"\nfailover: replica promoted after {failover_s:.2f} s, cluster healed (old primary "
        f"back as a replica) after {healed_s:.2f} s, last degraded answer "
        f"{recovered_s:.2f} s after the kill; /rank answers after the kill: {len(after)}, "
        f"degraded {len(degraded)} ({len(collateral)} of users on other primaries, at "
        f"{sorted({round(a.t - t_kill, 1) for a in collateral})} s), "
        f"kinds {sorted({a.degraded for a in degraded if a.degraded})}; /events calls "
        f"{ev.size}, 200: {(ev == 200).sum()}, 503: {(ev == 503).sum()}"
    )
    assert not traffic.client_errors, (t_kill, traffic.client_errors[:5])
    assert {a.status for a in answers} == {200}  # no 5xx, no dropped connection
    assert set(ev.tolist()) <= {200, 503}  # appends refused while unreplicable, never a 500
    assert traffic.refused_writers <= lost  # ... and only the lost primary's
    assert any(a.user in lost for a in degraded)  # the lost slots' users were flagged
    assert all(a.degraded in ("stale_state", "no_history") for a in degraded)
    # the other primaries' users are served through it: none degraded in 25 runs, two
    # allowed for a Redis timeout on a slow box. (Until the cluster client stopped
    # retrying itself, some runs degraded 7-23 of their answers within a tenth of a
    # second: redis-py's retry of a lost primary's failed pipeline closed the connections
    # to every node first. service/store/cluster.py; the deterministic check of it is in
    # tests/service/test_store.py.)
    assert len(collateral) <= 2, collateral[:5]
    assert_each_ack_once(traffic, cluster)


def test_a_reshard_under_traffic_fails_no_request(
    private_redis_cluster: LocalRedisCluster, tiny_artifacts: Path, tmp_path: Path
) -> None:
    cluster = private_redis_cluster
    (source, _), (target, _) = cluster.masters()[:2]
    moving = set(cluster.slots_of(source)[:40])  # redis-cli moves the lowest slots first
    users: list[str] = []
    i = 0
    while len(users) < 6:  # users whose slots are about to move
        u = f"rs-{i}"
        i += 1
        if key_slot(seq_key(u).encode()) in moving:
            users.append(u)
    svc = cluster_service(cluster, tiny_artifacts, tmp_path / "svc.log")
    try:
        traffic = Traffic(svc.port, users, writers=users[:3]).start()
        time.sleep(1.0)
        moved = cluster.reshard(source, target, slots=len(moving))
        time.sleep(1.0)
        traffic.stop()
    finally:
        svc.stop()
    assert set(moved) == moving
    assert all(cluster.master_of_slot(s) == target for s in moving)
    answers = traffic.answers
    ev = traffic.event_statuses
    print(
        f"\nreshard of {len(moving)} slots: /rank answers {len(answers)}, degraded "
        f"{sum(a.degraded is not None for a in answers)}; /events calls {len(ev)}, "
        f"not 200: {sum(s != 200 for s in ev)}"
    )
    assert {a.status for a in answers} == {200}
    assert all(a.degraded is None for a in answers), [a for a in answers if a.degraded][:5]
    assert set(ev) == {200}  # MOVED and ASK were followed: no failed append
    assert_each_ack_once(traffic, cluster)
