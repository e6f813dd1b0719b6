"""LocalRedisCluster with real redis-server nodes: it starts healthy, a killed master fails
over to its replica without losing replicated keys and rejoins as a replica, and a
reshard moves slots with their keys."""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from loadtest.redis_cluster import BUS_OFFSET, SLOTS, LocalRedisCluster

TAGS = ["{a}", "{b}", "{c}"]  # slots 15495, 3300 and 7365: one on each of the 3 masters


def test_starts_healthy_with_every_slot_served(
    redis_cluster: LocalRedisCluster, redis_cluster_url: str
) -> None:
    cluster = redis_cluster
    masters, replicas = cluster.masters(), cluster.replicas()
    assert (len(masters), len(replicas), len(cluster.ports)) == (3, 3, 6)
    assert all(port + BUS_OFFSET < 65536 for port in cluster.ports)
    assert sorted(s for port, _ in masters for s in cluster.slots_of(port)) == list(range(SLOTS))
    assert all(cluster.node_id(port) == node_id for port, node_id in masters + replicas)
    assert all(len(cluster.replicas_of(port)) == 1 for port, _ in masters)
    owners = {cluster.master_of_slot(key_slot(tag.encode())) for tag in TAGS}
    assert owners == {port for port, _ in masters}

    with RedisCluster.from_url(redis_cluster_url, decode_responses=True) as client:
        for tag in TAGS:
            client.set(f"{tag}:key", tag)
        assert [client.get(f"{tag}:key") for tag in TAGS] == TAGS


def test_a_killed_master_fails_over_keeps_its_keys_and_rejoins_as_replica(
    private_redis_cluster: LocalRedisCluster,
) -> None:
    cluster = private_redis_cluster
    slot = key_slot(b"{a}")
    victim = cluster.master_of_slot(slot)
    [replica] = cluster.replicas_of(victim)
    # the writes and WAIT on one connection: WAIT counts replicas that have this
    # connection's writes, so an acknowledged key is on the replica before the kill
    with redis.Redis(port=victim) as node:
        pipe = node.pipeline(transaction=False)
        for i in range(100):
            pipe.set(f"{{a}}:{i}", i)
        pipe.wait(1, 5000)
        assert pipe.execute()[-1] == 1

    cluster.kill(victim)
    assert cluster.down() == [victim]
    seconds = cluster.wait_failover(victim)

    assert 0 < seconds < 30
    assert cluster.master_of_slot(slot) == replica
    assert sorted(port for port, _ in cluster.masters()) == sorted(
        {cluster.master_of_slot(key_slot(tag.encode())) for tag in TAGS}
    )
    with RedisCluster.from_url(cluster.url, decode_responses=True) as client:
        assert client.mget_nonatomic([f"{{a}}:{i}" for i in range(100)]) == [
            str(i) for i in range(100)
        ]

    cluster.restart(victim)
    cluster.wait_healthy()
    assert cluster.down() == []
    assert cluster.replicas_of(replica) == [victim]
    assert victim in {port for port, _ in cluster.replicas()}
    with redis.Redis(port=victim) as node:
        assert node.dbsize() == 100  # resynced from the promoted replica


def test_reshard_moves_slots_with_their_keys(private_redis_cluster: LocalRedisCluster) -> None:
    cluster = private_redis_cluster
    keys = {f"key:{i}": str(i) for i in range(3000)}
    (source, _), (target, _) = cluster.masters()[:2]
    with RedisCluster.from_url(cluster.url, decode_responses=True) as client:
        client.mset_nonatomic(keys)

        moved = cluster.reshard(source, target, 200)

        assert len(moved) == 200 and set(moved) <= set(cluster.slots_of(target))
        assert cluster.master_of_slot(moved[0]) == target
        in_moved = [k for k in keys if key_slot(k.encode()) in set(moved)]
        assert in_moved  # ~37 of the 3000 keys hash into 200 of the 16384 slots
        with redis.Redis(port=target) as node:
            counts = [node.execute_command("CLUSTER", "COUNTKEYSINSLOT", s) for s in moved]
        assert sum(counts) == len(in_moved)
        # the client made before the reshard follows the MOVED redirections
        assert client.mget_nonatomic(list(keys)) == list(keys.values())
