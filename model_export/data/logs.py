"""The generic log format: one table of rows -> users' behaviours and requests.

Columns (CSV or Parquet, picked by extension):

    user_id     string   who (integer ids in Parquet are accepted and read as text)
    item_id     int      >= 0
    category    int      >= 0, the item's side feature
    ts          int      unix seconds >= 0
    action      int      >= 0, optional (default 0): behaviour type (view, like, ...)
    label       0/1      1 = a behaviour (positive); 0 = an exposure without one
    request_id  string   rows sharing one form a request; empty = no request
    split       string   optional: train | valid | test, the same for all rows of a request

Semantics:

* Rows with label 1 are behaviours and enter the user's history, whether or not they
  belong to a request (a clicked candidate becomes history for later requests).
* Rows with an empty request_id are history-only behaviours (other surfaces). Such a
  row with label 0 says nothing (neither a behaviour nor a candidate): it is skipped
  and counted in `LogData.ignored_rows`.
* Rows sharing a non-empty request_id form one request: its logged candidate set with
  labels. The request's time is the minimum ts of its rows, and its history is every
  behaviour of that user with ts strictly before it. Equal timestamps keep file order.
* Without a split column, each user's requests in time order are split with
  k = max(1, round(0.1 * R)) (round half up): the last k are test when R >= 2, the k
  before them valid when R >= 3, the rest train. So a user with R >= 3 has one of each,
  R = 2 gives train + test, R = 1 train only; 10 requests give 8/1/1, 20 give 16/2/2.

A malformed file raises `LogFormatError` naming the column and 1-based data row, before
anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ifa_common.manifest import sha256_file
from model_export.data.columns import (
    SPLITS,
    LogFormatError,
    int_column,
    read_table,
    string_column,
)
from model_export.data.items import item_table

__all__ = ["SPLITS", "LogData", "LogFormatError", "default_splits", "load_log"]


@dataclass(frozen=True)
class LogData:
    """A validated log, as flat arrays grouped by user (CSR offsets).

    User u's behaviours are `ev_*[ev_offsets[u]:ev_offsets[u+1]]`, sorted by (ts, file
    row); its requests are `req_*[req_offsets[u]:req_offsets[u+1]]`, sorted by (ts, first
    file row); request r's logged candidates are `cand_*[cand_offsets[r]:cand_offsets[r+1]]`
    in file order. `req_prefix[r]` counts the user's behaviours with ts < req_ts[r], so
    the history of r is the first req_prefix[r] of the user's behaviours.
    """

    source: str
    content_sha256: str  # of the file's bytes: the data's identity
    num_rows: int
    ignored_rows: int  # label-0 rows without request_id (see module docstring)
    user_ids: np.ndarray  # (U,) object str, sorted
    ev_offsets: np.ndarray  # (U+1,) int64
    ev_item: np.ndarray  # (E,) int64
    ev_category: np.ndarray  # (E,) int64
    ev_action: np.ndarray  # (E,) int64
    ev_ts: np.ndarray  # (E,) int64
    req_offsets: np.ndarray  # (U+1,) int64
    req_id: np.ndarray  # (R,) object str
    req_ts: np.ndarray  # (R,) int64
    req_split: np.ndarray  # (R,) int8, index into SPLITS
    req_prefix: np.ndarray  # (R,) int64, within the user's behaviours
    cand_offsets: np.ndarray  # (R+1,) int64
    cand_item: np.ndarray  # (C,) int64
    cand_category: np.ndarray  # (C,) int64
    cand_label: np.ndarray  # (C,) int8
    cand_row: np.ndarray  # (C,) int64: 0-based data row of each logged candidate in the file
    item_ids: np.ndarray  # (I,) int64 sorted: every item seen in the log
    item_category: np.ndarray  # (I,) int64: its most frequent category (see items.py)

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_events(self) -> int:
        return int(self.ev_item.shape[0])

    @property
    def num_requests(self) -> int:
        return int(self.req_ts.shape[0])


def default_splits(rank: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test) of requests by their time rank in the user.

    rank: 0-based position among the user's requests in time order; count: the user's
    number of requests R. See the module docstring for the rule.
    """
    rank = np.asarray(rank, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    k = np.maximum(1, np.floor(0.1 * count + 0.5).astype(np.int64))
    n_test = np.where(count >= 2, k, 0)
    n_valid = np.where(count >= 3, k, 0)
    out = np.zeros(rank.shape, dtype=np.int8)
    out[rank >= count - n_test - n_valid] = 1
    out[rank >= count - n_test] = 2
    return out


def _offsets(group: np.ndarray, n_groups: int) -> np.ndarray:
    """CSR offsets of a group-sorted code array."""
    out = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(group, minlength=n_groups), out=out[1:])
    return out


def _sort_by_user_time(user: np.ndarray, ts: np.ndarray, n_users: int) -> np.ndarray:
    """Stable argsort by (user, ts): ties keep their (file) order.

    One stable sort of a combined key when it fits in int64: timsort is linear on the
    usual already-sorted logs, where a 3-key lexsort is not.
    """
    span = int(ts.max()) + 1 if ts.size else 1
    if n_users * span < 2**62:
        return np.argsort(user * span + ts, kind="stable")
    return np.lexsort((ts, user))  # lexsort is stable too


def load_log(path: str | Path) -> LogData:
    """Load and validate a generic-format log (.csv or .parquet); see the module docstring."""
    path = Path(path)
    df = read_table(path)
    name = path.name
    n = len(df)

    user_codes, user_ids = string_column(df, "user_id", name, allow_empty=False)
    n_users = int(user_ids.size)
    item = int_column(df, "item_id", name)
    category = int_column(df, "category", name)
    ts = int_column(df, "ts", name)
    action = int_column(df, "action", name) if "action" in df.columns else np.zeros(n, np.int64)
    label = int_column(df, "label", name)
    if (label > 1).any():
        r = int(np.flatnonzero(label > 1)[0])
        raise LogFormatError(f"{name}: column 'label', row {r + 1}: {label[r]} is not 0 or 1")
    rid_codes, rid_values = string_column(df, "request_id", name, allow_empty=True)
    has_request = rid_codes >= 0
    no_request = ~has_request
    if not has_request.any():
        raise LogFormatError(f"{name}: column 'request_id': no row has one, so no requests")

    split_code: np.ndarray | None = None
    if "split" in df.columns:
        s_codes, s_values = string_column(df, "split", name, allow_empty=True)
        known = np.array([SPLITS.index(v) if v in SPLITS else -1 for v in s_values] + [-1])
        split_code = known[s_codes].astype(np.int8)  # code -1 (empty) hits the trailing -1
        bad = has_request & (split_code < 0)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            shown = s_values[s_codes[r]] if s_codes[r] >= 0 else ""
            raise LogFormatError(
                f"{name}: column 'split', row {r + 1}: {shown!r} is not one of {SPLITS}"
            )

    # Behaviours: label 1, sorted by (user, ts, file row).
    ev_rows = np.flatnonzero(label == 1)
    ev_rows = ev_rows[_sort_by_user_time(user_codes[ev_rows], ts[ev_rows], n_users)]
    ev_offsets = _offsets(user_codes[ev_rows], n_users)

    # Requests: group rows by request_id (codes from string_column, in id order).
    rq_rows = np.flatnonzero(has_request)
    rcode = rid_codes[rq_rows]  # every code in [0, n_req) is used
    n_req = int(rid_values.size)
    grouped = np.argsort(rcode, kind="stable")  # rows by request, file order within
    g_rows = rq_rows[grouped]
    g_off = _offsets(rcode[grouped], n_req)
    first_row = g_rows[g_off[:-1]]
    req_user = user_codes[first_row]

    other_user = user_codes[g_rows] != np.repeat(req_user, np.diff(g_off))
    if other_user.any():
        g = int(np.flatnonzero(other_user)[0])
        r, first = int(g_rows[g]), int(first_row[rcode[grouped[g]]])
        raise LogFormatError(
            f"{name}: column 'request_id', row {r + 1}: request "
            f"{rid_values[rid_codes[r]]!r} spans two users ({user_ids[user_codes[first]]!r} "
            f"from row {first + 1} and {user_ids[user_codes[r]]!r})"
        )
    if split_code is not None:
        req_split = split_code[first_row]
        mixed = split_code[g_rows] != np.repeat(req_split, np.diff(g_off))
        if mixed.any():
            r = int(g_rows[np.flatnonzero(mixed)[0]])
            raise LogFormatError(
                f"{name}: column 'split', row {r + 1}: request {rid_values[rid_codes[r]]!r} has rows in "
                f"more than one split"
            )
    req_ts = np.minimum.reduceat(ts[g_rows], g_off[:-1])

    # Order requests by (user, ts, first file row) and regroup their rows to match.
    order = np.lexsort((first_row, req_ts, req_user))
    new_index = np.empty(n_req, dtype=np.int64)
    new_index[order] = np.arange(n_req)
    new_code = new_index[rcode]
    perm = np.argsort(new_code, kind="stable")
    cand_rows = rq_rows[perm]
    cand_offsets = _offsets(new_code[perm], n_req)
    req_user, req_ts = req_user[order], req_ts[order]
    req_offsets = _offsets(req_user, n_users)

    if split_code is None:
        count = np.diff(req_offsets)[req_user]
        rank = np.arange(n_req) - req_offsets[req_user]
        req_split = default_splits(rank, count)
    else:
        req_split = req_split[order]

    # History length of each request: behaviours strictly before it (one search per user).
    ev_ts = ts[ev_rows]
    req_prefix = np.zeros(n_req, dtype=np.int64)
    for u in np.flatnonzero(np.diff(req_offsets)):
        e0, e1 = ev_offsets[u], ev_offsets[u + 1]
        r0, r1 = req_offsets[u], req_offsets[u + 1]
        req_prefix[r0:r1] = np.searchsorted(ev_ts[e0:e1], req_ts[r0:r1], side="left")

    items, item_cats = item_table(item, category)
    return LogData(
        source=str(path),
        content_sha256=sha256_file(path),
        num_rows=n,
        ignored_rows=int((no_request & (label == 0)).sum()),
        user_ids=user_ids,
        ev_offsets=ev_offsets,
        ev_item=item[ev_rows],
        ev_category=category[ev_rows],
        ev_action=action[ev_rows],
        ev_ts=ev_ts,
        req_offsets=req_offsets,
        req_id=rid_values[order],
        req_ts=req_ts,
        req_split=req_split.astype(np.int8),
        req_prefix=req_prefix,
        cand_offsets=cand_offsets,
        cand_item=item[cand_rows],
        cand_category=category[cand_rows],
        cand_label=label[cand_rows].astype(np.int8),
        cand_row=cand_rows.astype(np.int64),
        item_ids=items,
        item_category=item_cats,
    )
