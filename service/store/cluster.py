"""Redis Cluster (IFA_REDIS_CLUSTER=true): the client, the node a user lives on, and the
primaries the push channel watches.

Every key of one user carries the user id as its hash tag (`ifa:seq:{u}`,
`ifa:state:{u}:<version>`, `ifa:idem:{u}:<key>`), so a user lives in one slot: the two
Lua scripts touch one slot, the warm path stays one command, and a user's keys move
together in a reshard. Only `ifa-rank seed --reset` scans the keyspace, and redis-py's
cluster SCAN visits every primary.

redis-py's own cluster client routes each command by slot and follows MOVED and ASK
(a reshard under traffic costs a redirect, not a failed request). A dead primary costs a
refused connection; `call_cluster` then refreshes the slot map and tries once more, and
the request degrades while the replica takes over (`scope` keys the /rank cooldown by
node, so the users of the other primaries are not degraded with them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError


class _CommandTable(AsyncCommandsParser):
    """redis-py reloads the COMMAND table from the first primary on every slot-map
    refresh; while that primary is the one just lost, the refresh fails and redis-py then
    closes the connections to every node: the users of the healthy primaries fail with
    the lost one's (seen under traffic in tests/e2e/test_cluster.py). The table does not
    change with the topology: it is loaded once."""

    async def initialize(self, node: Any = None) -> None:
        if node is not None:
            self.node = node
        if not self.commands:
            await super().initialize(node)


T = TypeVar("T")

# what redis-py itself retries after a slot-map refresh (a refused or reset connection,
# a timeout, CLUSTERDOWN, a slot the map does not cover)
RETRIED: Final = RedisCluster.ERRORS_ALLOW_RETRY


def make_cluster_client(
    url: str, timeout_ms: float, max_connections: int, read_size: int
) -> RedisCluster:
    """A cluster client with the single-node client's timeouts, no backoff and no retry of
    its own: `call_cluster` retries. (redis-py's retry of a failed pipeline first closes
    every connection to every node, `RedisCluster.aclose`, failing the commands in flight
    on the healthy primaries: one writer of a lost primary's users degraded the answers of
    the others in tests/e2e/test_cluster.py.) `max_connections` is per node."""
    timeout = timeout_ms / 1000.0
    client = RedisCluster.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        socket_read_size=read_size,
        health_check_interval=0,
        retry=Retry(NoBackoff(), 0),
        # during a failover some slots have no live primary: still start, and serve the
        # users of the others
        require_full_coverage=False,
        # redis-py closes every connection to every node after each 5th MOVED by
        # default, failing the requests in flight on healthy nodes (a reshard makes
        # MOVEDs); 0: a MOVED only corrects that slot in the map
        reinitialize_steps=0,
    )
    client.commands_parser = _CommandTable()
    return client


async def call_cluster(client: RedisCluster, fn: Callable[[], Awaitable[T]]) -> T:
    """`fn` (commands or a pipeline of `client`), tried once more after a refreshed slot map
    when a node fails it: the retry that follows a finished failover to the promoted
    replica. The refresh asks a live node for the map and closes no connection."""
    # before the command: redis-py picks a command's node before it loads the slot map,
    # so a fresh client sends its first commands to an arbitrary node (a MOVED each)
    await client.initialize()
    try:
        return await fn()
    except RETRIED:
        # a failed command marks the map stale itself; a failed pipeline does not
        client._initialize = True
        await client.initialize()
        return await fn()


def node_of(client: RedisCluster, key: str) -> str:
    """The name (host:port) of the primary that serves `key`'s slot, as the client last
    learnt the slot map; "slot:<n>" before it knows."""
    slot = key_slot(key.encode())
    try:
        return str(client.nodes_manager.get_node_from_slot(slot).name)
    except (RedisError, LookupError, AttributeError):
        return f"slot:{slot}"


async def ping_any_node(client: RedisCluster) -> None:
    """PING the known nodes in turn until one answers (raises the last error if none
    does): readiness means "the cluster answers", and one lost node must not fail it."""
    error: Exception = ConnectionError("the cluster client knows no node")
    tried: set[str] = set()
    while True:
        # a failed PING marks the slot map stale, and its refresh replaces the node
        # objects: each next node is taken from the refreshed map, never a closed one
        await client.initialize()
        node = next((n for n in client.get_nodes() if n.name not in tried), None)
        if node is None:
            raise error
        tried.add(node.name)
        try:
            await client.ping(target_nodes=node)
            return
        except (RedisError, OSError) as e:
            error = e


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One Redis server to open dedicated (push channel) connections to."""

    name: str
    connect: Callable[[float | None], Any]  # read timeout -> an unconnected RESP2 Connection


def single_node(pool: Any) -> NodeAddress:
    def connect(read_timeout: float | None) -> Any:
        # RESP2: invalidations then arrive as plain pub/sub replies (a RESP3 connection
        # would hand them to redis-py's push handler instead)
        kwargs = {**pool.connection_kwargs, "socket_timeout": read_timeout, "protocol": 2}
        return pool.connection_class(**kwargs)

    return NodeAddress("redis", connect)


async def cluster_primaries(client: RedisCluster) -> list[NodeAddress]:
    """Every primary that serves slots now, asked of the cluster (not the client's cached
    map, which only changes when a command fails), in a stable order."""
    slots: dict[Any, Any] = await client.cluster_slots(target_nodes=RedisCluster.RANDOM)  # type: ignore[assignment]
    addresses = sorted(
        {(str(info["primary"][0]), int(info["primary"][1])) for info in slots.values()}
    )
    known = client.get_nodes()
    if not known:
        raise ConnectionError("the cluster client knows no node")
    template = known[0]
    out = []
    for host, port in addresses:

        def connect(read_timeout: float | None, host: str = host, port: int = port) -> Any:
            kwargs = {
                **template.connection_kwargs,
                "host": host,
                "port": port,
                "socket_timeout": read_timeout,
                "protocol": 2,
            }
            return template.connection_class(**kwargs)

        out.append(NodeAddress(f"{host}:{port}", connect))
    return out
