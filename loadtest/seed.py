"""`ifa-rank seed`: load users' histories into Redis, fast, through the store's layout.

Two paths:

* direct (default): pipelined `APPEND`s of packed 32-byte records
  (`ifa_common.records.pack`) to the store's own keys (`service.store.redis_store.seq_key`), many
  users per pipeline (about 8 MiB per round trip). This is the same command the
  service's `/events` runs without an idempotency key. 10,000 users x 1,000 events or
  10 users x 100,000 events take seconds.
* `--via-http URL`: POST the events to the service's `/events` in batches, each with an
  idempotency key derived from its content, so rerunning the seed appends nothing twice
  (what `make run` uses: the same code path as any client).

Synthetic users: item ids uniform over `--items`, category = item_id % `--categories`,
action uniform over 4 types, timestamps increasing with exponential gaps (mean 10
minutes) from 2020-09-13 onwards, all from `--seed`. `--length-dist loguniform` draws each
user's length log-uniformly from [`--min-length`, `--length`] (the shape of docs/design.md
section 2's lifelong users). MovieLens: each user's behaviours (rating >= 4) from the
generic-format Parquet that `ifa-rank data movielens` writes, in time order.

Unless `--append`, a direct seed first deletes the users' sequences and cached states,
so every user holds exactly the seeded records afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import redis
from tqdm import tqdm

from ifa_common.records import EVENT_DTYPE, RECORD_SIZE, pack

log = logging.getLogger(__name__)

PIPELINE_BYTES: Final = 8 << 20  # payload per pipelined round trip
TS0: Final = 1_600_000_000
MEAN_GAP_S: Final = 600.0
ACTIONS: Final = 4
MOVIELENS_DEFAULT: Final = Path("data/ml-100k/ml100k.parquet")


def seq_key(user: str) -> str:
    """The store's key of a user's sequence (imported lazily: the store owns the layout)."""
    from service.store.redis_store import seq_key as store_seq_key

    return store_seq_key(user)


def state_pattern(user: str) -> str:
    """Glob of every cached state of a user, all model versions."""
    from service.store.redis_store import state_key

    return state_key(user, "*")


@dataclass(frozen=True)
class SeedResult:
    users: int
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------------- generation
def user_lengths(
    users: int, length: int, dist: str = "fixed", min_length: int = 1000, seed: int = 0
) -> np.ndarray:
    """Events per user: all `length`, or log-uniform over [min_length, length]."""
    if users < 0 or length < 0:
        raise ValueError("users and length must be >= 0")
    if dist == "fixed":
        return np.full(users, length, dtype=np.int64)
    if dist != "loguniform":
        raise ValueError(f"unknown length distribution {dist!r}")
    lo = max(1, min(min_length, length))
    rng = np.random.default_rng([seed, 1])
    u = rng.uniform(np.log(lo), np.log(max(lo, length)), size=users)
    return np.clip(np.round(np.exp(u)), lo, length).astype(np.int64)


def synthetic_events(
    n: int, items: int, categories: int, rng: np.random.Generator, ts0: int = TS0
) -> np.ndarray:
    """One user's history (n,) EVENT_DTYPE in time order."""
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    item = rng.integers(0, max(1, items), size=n, dtype=np.int64)
    ev["item_id"] = item
    ev["category"] = item % max(1, categories)
    gaps = rng.exponential(MEAN_GAP_S, size=n).astype(np.int64) + 1
    ev["ts"] = ts0 + np.cumsum(gaps)
    ev["action"] = rng.integers(0, ACTIONS, size=n, dtype=np.int32)
    return ev


def synthetic_users(
    prefix: str,
    lengths: np.ndarray,
    items: int,
    categories: int,
    seed: int,
    first: int = 0,
) -> Iterator[tuple[str, np.ndarray]]:
    """(user_id, events) per user; user i's events depend only on (seed, i)."""
    for i, n in enumerate(lengths.tolist(), start=first):
        rng = np.random.default_rng([seed, i])
        yield f"{prefix}-{i}", synthetic_events(int(n), items, categories, rng)


def movielens_users(path: Path, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """Each MovieLens user's behaviours (label 1), in (ts, file row) order."""
    from model_export.data.logs import load_log  # pandas: only for this source

    data = load_log(path)
    off = data.ev_offsets
    for u, uid in enumerate(data.user_ids.tolist()):
        a, b = int(off[u]), int(off[u + 1])
        ev = np.zeros(b - a, dtype=EVENT_DTYPE)
        ev["item_id"] = data.ev_item[a:b]
        ev["category"] = data.ev_category[a:b]
        ev["ts"] = data.ev_ts[a:b]
        ev["action"] = data.ev_action[a:b]
        yield f"{prefix}-{uid}", ev


# ---------------------------------------------------------------------- writing
Client = redis.Redis | redis.RedisCluster


def connect(url: str, cluster: bool = False) -> Client:
    """A sync client for seeding: one Redis, or (cluster) redis-py's cluster client, whose
    pipelines split by node and whose SCAN visits every primary."""
    if cluster:
        return redis.RedisCluster.from_url(url, socket_timeout=60)
    return redis.Redis.from_url(url, socket_timeout=60)


def reset_users(client: Client, users: list[str]) -> None:
    """Delete the users' sequences and every cached state of theirs."""
    for start in range(0, len(users), 1000):
        batch = users[start : start + 1000]
        client.delete(*[seq_key(u) for u in batch])
    # States: one keyspace SCAN per distinct prefix pattern would miss nothing but cost
    # a pass per user; users from one seed share a prefix, so scan once for all of them.
    wanted = set(users)
    patterns = {state_pattern(u.rsplit("-", 1)[0] + "-*") for u in users}
    for pattern in patterns:
        doomed: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=10_000):
            user = _user_of(key)
            if user in wanted:
                doomed.append(key)
            if len(doomed) >= 1000:
                client.delete(*doomed)
                doomed.clear()
        if doomed:
            client.delete(*doomed)


def _user_of(key: bytes) -> str:
    text = key.decode()
    return text[text.index("{") + 1 : text.index("}")]


def write_direct(
    client: Client,
    users: Iterator[tuple[str, np.ndarray]],
    total_events: int | None = None,
    progress: bool = True,
) -> SeedResult:
    """Pipelined APPENDs, about PIPELINE_BYTES of records per round trip."""
    t0 = time.perf_counter()
    n_users = n_events = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    with tqdm(
        total=total_events,
        unit="ev",
        unit_scale=True,
        disable=not progress,
        desc="seed",
        file=sys.stderr,
    ) as bar:
        for user, events in users:
            n_users += 1
            if events.shape[0] == 0:
                continue
            pipe.append(seq_key(user), pack(events))
            pending += events.shape[0] * RECORD_SIZE
            n_events += int(events.shape[0])
            if pending >= PIPELINE_BYTES:
                pipe.execute()
                bar.update(pending // RECORD_SIZE)
                pending = 0
        if pending:
            pipe.execute()
            bar.update(pending // RECORD_SIZE)
    return SeedResult(n_users, n_events, time.perf_counter() - t0)


def event_batches(events: np.ndarray, batch: int) -> Iterator[list[dict[str, int]]]:
    for start in range(0, events.shape[0], batch):
        part = events[start : start + batch]
        yield [
            {
                "item_id": int(e["item_id"]),
                "ts": int(e["ts"]),
                "action": int(e["action"]),
                "category": int(e["category"]),
            }
            for e in part
        ]


def write_via_http(
    base_url: str,
    users: Iterator[tuple[str, np.ndarray]],
    batch: int = 1000,
    total_events: int | None = None,
    progress: bool = True,
) -> SeedResult:
    """POST /events in batches; idempotency keys make a rerun append nothing."""
    import httpx

    t0 = time.perf_counter()
    n_users = n_events = 0
    with (
        httpx.Client(base_url=base_url.rstrip("/"), timeout=30.0) as http,
        tqdm(
            total=total_events,
            unit="ev",
            unit_scale=True,
            disable=not progress,
            desc="seed /events",
            file=sys.stderr,
        ) as bar,
    ):
        for user, events in users:
            n_users += 1
            for part in event_batches(events, batch):
                digest = hashlib.blake2b(
                    json.dumps(part, separators=(",", ":")).encode(), digest_size=12
                ).hexdigest()
                body = {"user_id": user, "events": part, "idempotency_key": f"seed-{digest}"}
                r = http.post("/events", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"POST /events for {user}: {r.status_code} {r.text[:200]}")
                n_events += len(part)
                bar.update(len(part))
    return SeedResult(n_users, n_events, time.perf_counter() - t0)


def seed_synthetic(
    client: Client,
    users: int,
    length: int,
    *,
    items: int = 20_000,
    categories: int = 200,
    prefix: str = "bench",
    seed: int = 0,
    dist: str = "fixed",
    min_length: int = 1000,
    reset: bool = True,
    first: int = 0,
    progress: bool = True,
) -> SeedResult:
    """Seed `users` synthetic users `{prefix}-{first}..` directly into Redis."""
    lengths = user_lengths(users, length, dist, min_length, seed)
    names = [f"{prefix}-{i}" for i in range(first, first + users)]
    if reset and names:
        reset_users(client, names)
    gen = synthetic_users(prefix, lengths, items, categories, seed, first)
    return write_direct(client, gen, int(lengths.sum()), progress)


# ---------------------------------------------------------------------- CLI
def _redis_url(args: argparse.Namespace) -> str:
    url: str | None = args.redis_url or os.environ.get("IFA_REDIS_URL") or None
    if not url:
        raise SystemExit(
            "seed: no Redis to write to: pass --redis-url or set IFA_REDIS_URL "
            "(or --via-http URL to go through a running service)"
        )
    return url


def env_cluster(env: Mapping[str, str] | None = None) -> bool:
    """IFA_REDIS_CLUSTER, as the service reads it, from `env` (default: this process's)."""
    flag = (os.environ if env is None else env).get("IFA_REDIS_CLUSTER", "")
    return flag.strip().lower() in ("1", "true", "yes", "on")


def main(args: argparse.Namespace) -> int:
    """Handler of `ifa-rank seed`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per POST is noise
    dist = getattr(args, "length_dist", "fixed")
    min_length = getattr(args, "min_length", 1000)
    categories = getattr(args, "categories", 200)
    via_http: str | None = getattr(args, "via_http", None)
    reset = not getattr(args, "append", False)
    progress = not getattr(args, "no_progress", False)

    users_iter: Iterator[tuple[str, np.ndarray]]
    if args.source == "movielens":
        path = Path(getattr(args, "data", None) or MOVIELENS_DEFAULT)
        if not path.is_file():
            print(f"seed: {path} not found; run `ifa-rank data movielens` first", file=sys.stderr)
            return 2
        loaded = list(movielens_users(path, args.prefix))
        users_iter = iter(loaded)
        names = [u for u, _ in loaded]
        total = sum(int(ev.shape[0]) for _, ev in loaded)
    else:
        lengths = user_lengths(args.users, args.length, dist, min_length, args.seed)
        names = [f"{args.prefix}-{i}" for i in range(args.users)]
        users_iter = synthetic_users(args.prefix, lengths, args.items, categories, args.seed)
        total = int(lengths.sum())

    if via_http:
        result = write_via_http(via_http, users_iter, total_events=total, progress=progress)
    else:
        cluster = bool(getattr(args, "cluster", False)) or env_cluster()
        client = connect(_redis_url(args), cluster)
        try:
            if reset:
                reset_users(client, names)
            result = write_direct(client, users_iter, total, progress)
        finally:
            client.close()
    summary: dict[str, Any] = {
        "users": result.users,
        "events": result.events,
        "seconds": round(result.seconds, 3),
        "events_per_s": round(result.events_per_s),
        "first_user": names[0] if names else None,
        "last_user": names[-1] if names else None,
    }
    print(json.dumps(summary))
    return 0
