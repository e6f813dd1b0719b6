"""Fixed-width binary event records: the format of a user's sequence in Redis.

One record is 32 bytes, little endian, so a sequence is a plain byte string that Redis
can `APPEND` to, count with `STRLEN` and slice with `GETRANGE`.

    offset  size  field
    0       8     item_id   int64   (>= 0)
    8       8     category  int64   (>= 0; -1 = unknown, looked up from the item table)
    16      8     ts        int64   unix seconds (>= 0)
    24      4     action    int32   (>= 0)
    28      4     reserved  int32   (0; room for a flag without a format change)
"""

from __future__ import annotations

from typing import Final

import numpy as np

RECORD_FORMAT_VERSION: Final = 1
EVENT_DTYPE: Final = np.dtype(
    [
        ("item_id", "<i8"),
        ("category", "<i8"),
        ("ts", "<i8"),
        ("action", "<i4"),
        ("reserved", "<i4"),
    ]
)
RECORD_SIZE: Final = EVENT_DTYPE.itemsize  # 32 bytes
UNKNOWN_CATEGORY: Final = -1


def make_events(
    item_id: np.ndarray | list[int],
    ts: np.ndarray | list[int],
    category: np.ndarray | list[int] | None = None,
    action: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Build a structured array of events (N,) with EVENT_DTYPE."""
    items = np.asarray(item_id, dtype=np.int64)
    out = np.zeros(items.shape[0], dtype=EVENT_DTYPE)
    out["item_id"] = items
    out["ts"] = np.asarray(ts, dtype=np.int64)
    out["category"] = UNKNOWN_CATEGORY if category is None else np.asarray(category, np.int64)
    out["action"] = 0 if action is None else np.asarray(action, dtype=np.int32)
    return out


def pack(events: np.ndarray) -> bytes:
    """Structured events (N,) -> N * RECORD_SIZE bytes."""
    if events.dtype != EVENT_DTYPE:
        raise TypeError(f"expected EVENT_DTYPE, got {events.dtype}")
    return events.tobytes()


def unpack(buf: bytes | bytearray | memoryview) -> np.ndarray:
    """Bytes -> structured events (N,). A trailing partial record is an error, not data."""
    if len(buf) % RECORD_SIZE:
        raise ValueError(
            f"sequence length {len(buf)} bytes is not a multiple of the {RECORD_SIZE}-byte record"
        )
    return np.frombuffer(buf, dtype=EVENT_DTYPE)
