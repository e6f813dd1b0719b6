"""`ifa-rank logs export`: what the service served, labelled by what the users did next,
as a generic-format training log (docs/data.md), so `ifa-rank train` learns from it.

The impression log (`service.store.impressions`) is read through one consumer group per
stream shard, so an export resumes where the last one stopped: entries are acknowledged
only once the Parquet file is written, and an interrupted export reads them again (its
consumer's pending entries first). An impression is exported once its label window has
passed (`window_s` after it was served); a younger one stays pending for a later run.

Rows, per exported impression: one per returned item (its rank is its position),
`label = 1` when the user acted on that item within the window, by a click that names
the impression's request id (`/events` with `request_id`), else by any event of that item
in the user's sequence in [served, served + window]. The users' sequences before their
last exported impression also go in, as history rows (`request_id` empty, `label = 1`),
minus the events already counted as a label, so that the file trains on its own.
A category comes from the users' events, else the model's item table (`--items`), else 0
(counted).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from ifa_common.records import unpack
from service.store.impressions import stream_key
from service.store.redis_store import seq_key

log = logging.getLogger(__name__)

GROUP: Final = "ifa-export"
CONSUMER: Final = "exporter"
READ_COUNT: Final = 1000


@dataclass
class ExportResult:
    impressions: int = 0  # exported now
    rows: int = 0
    positives: int = 0
    clicked_by_request_id: int = 0
    history_rows: int = 0
    users: int = 0
    pending: int = 0  # impressions younger than the window: left for a later run
    unknown_category: int = 0
    out: str | None = None

    def textfile(self) -> str:
        """Prometheus text format (node_exporter's textfile collector)."""
        lines = []
        for name, value in (
            ("ifa_impressions_exported", self.impressions),
            ("ifa_impressions_export_rows", self.rows),
            ("ifa_impressions_export_positives", self.positives),
            ("ifa_impressions_pending", self.pending),
        ):
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


@dataclass
class _Entries:
    impressions: list[tuple[str, bytes, dict[bytes, bytes]]] = field(default_factory=list)
    clicks: list[tuple[str, bytes, dict[bytes, bytes]]] = field(default_factory=list)
    skipped: list[tuple[str, bytes, dict[bytes, bytes]]] = field(default_factory=list)


def _read_group(client: Any, key: str) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """This consumer's pending entries (an earlier run read but did not export), then
    the new ones."""
    try:
        client.xgroup_create(key, GROUP, id="0", mkstream=True)
    except Exception as e:  # BUSYGROUP: it exists (redis-py raises ResponseError)
        if "BUSYGROUP" not in str(e):
            raise
    last = b"0"
    while True:  # pending first, paged by the last id seen
        reply = client.xreadgroup(GROUP, CONSUMER, {key: last}, count=READ_COUNT)
        entries = reply[0][1] if reply else []
        if not entries:
            break
        yield from entries
        last = entries[-1][0]
    while True:
        reply = client.xreadgroup(GROUP, CONSUMER, {key: ">"}, count=READ_COUNT)
        entries = reply[0][1] if reply else []
        if not entries:
            break
        yield from entries


def _text(fields: dict[bytes, bytes], name: str) -> str:
    return fields[name.encode()].decode()


def export_served(
    client: Any,
    out: Path,
    *,
    shards: int,
    window_s: float,
    now_s: float,
    items_categories: dict[int, int] | None = None,
) -> ExportResult:
    """Write `out` (Parquet) from the log in `client` (a sync Redis or RedisCluster)."""
    entries = _Entries()
    for shard in range(max(1, shards)):
        key = stream_key(shard)
        for entry_id, fields in _read_group(client, key):
            kind = fields.get(b"type")
            if kind == b"imp":
                entries.impressions.append((key, entry_id, fields))
            elif kind == b"click":
                entries.clicks.append((key, entry_id, fields))
            else:  # a rollout's shadow scores (never served): not training data
                entries.skipped.append((key, entry_id, fields))

    result = ExportResult()
    horizon_ms = (now_s - window_s) * 1000.0
    ready = [e for e in entries.impressions if int(e[2][b"ts"]) <= horizon_ms]
    result.pending = len(entries.impressions) - len(ready)
    clicks: dict[tuple[str, int], tuple[int, int]] = {}
    for _, _, f in entries.clicks:
        k = (_text(f, "rid"), int(f[b"item"]))
        ts, action = int(f[b"ts"]), int(f[b"action"])
        if k not in clicks or ts < clicks[k][0]:
            clicks[k] = (ts, action)

    by_user: dict[str, list[dict[bytes, bytes]]] = defaultdict(list)
    for _, _, f in ready:
        by_user[_text(f, "uid")].append(f)
    rows: list[tuple[str, int, int, int, int, str]] = []  # user, item, ts, action, label, rid
    categories: dict[int, int] = dict(items_categories or {})
    for user, imps in sorted(by_user.items()):
        events = unpack(client.get(seq_key(user)) or b"")
        for e in events[events["category"] >= 0]:
            categories[int(e["item_id"])] = int(e["category"])
        used = np.zeros(events.shape[0], bool)
        last_served = 0
        for f in sorted(imps, key=lambda f: int(f[b"ts"])):
            rid, served = _text(f, "rid"), int(f[b"ts"]) // 1000
            last_served = max(last_served, served)
            for item in np.frombuffer(f[b"items"], "<i8").tolist():
                label, action = 0, 0
                if (rid, item) in clicks:
                    label, action = 1, clicks[rid, item][1]
                    result.clicked_by_request_id += 1
                else:
                    hit = np.flatnonzero(
                        (events["item_id"] == item)
                        & (events["ts"] >= served)
                        & (events["ts"] <= served + window_s)
                        & ~used
                    )
                    if hit.size:
                        used[hit[0]] = True
                        label, action = 1, int(events["action"][hit[0]])
                rows.append((user, item, served, action, label, rid))
        history = np.flatnonzero(~used & (events["ts"] < last_served))
        for i in history.tolist():
            e = events[i]
            rows.append((user, int(e["item_id"]), int(e["ts"]), int(e["action"]), 1, ""))
        result.history_rows += int(history.size)
    result.impressions = len(ready)
    result.users = len(by_user)
    result.rows = len(rows)
    if rows:
        df = pd.DataFrame(
            rows, columns=["user_id", "item_id", "ts", "action", "label", "request_id"]
        )
        cats = df["item_id"].map(categories)
        result.unknown_category = int(cats.isna().sum())
        df.insert(2, "category", cats.fillna(0).astype("int64"))
        result.positives = int(df["label"].sum() - result.history_rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, out)  # whole or absent
        result.out = str(out)
    # Only now, with the file in place: acknowledge what it holds, and clicks too old to
    # label anything still to come (younger ones stay pending for the next run).
    old_click_ms = (now_s - 2 * window_s) * 1000.0
    done: dict[str, list[bytes]] = defaultdict(list)
    for key, entry_id, _ in ready + entries.skipped:
        done[key].append(entry_id)
    for key, entry_id, f in entries.clicks:
        if int(f[b"ts"]) * 1000 <= old_click_ms:
            done[key].append(entry_id)
    for key, ids in done.items():
        for i in range(0, len(ids), READ_COUNT):
            client.xack(key, GROUP, *ids[i : i + READ_COUNT])
    return result


def main(args: Any) -> int:
    """Handler of `ifa-rank logs export`."""
    import time

    from loadtest.seed import connect, env_cluster

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    url = args.redis_url or os.environ.get("IFA_REDIS_URL")
    if not url:
        raise SystemExit("logs export: pass --redis-url or set IFA_REDIS_URL")
    cluster = args.cluster or env_cluster()
    shards = args.shards or int(os.environ.get("IFA_IMPRESSION_SHARDS", "1"))
    table: dict[int, int] | None = None
    if args.items:
        from ifa_common.items import load_items

        ids, cats = load_items(Path(args.items))
        table = dict(zip(ids.tolist(), cats.tolist(), strict=True))
    client = connect(url, cluster)
    try:
        result = export_served(
            client,
            Path(args.out),
            shards=shards,
            window_s=args.window_s,
            now_s=time.time(),
            items_categories=table,
        )
    finally:
        client.close()
    if args.metrics_textfile:
        Path(args.metrics_textfile).write_text(result.textfile())
    print(json.dumps(asdict(result)))
    return 0
