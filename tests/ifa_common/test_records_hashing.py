"""The event record format and the id bucketing that training, export and serving share."""

from __future__ import annotations

import numpy as np
import pytest

from ifa_common.hashing import action_bucket, category_bucket, item_bucket
from ifa_common.records import (
    EVENT_DTYPE,
    RECORD_SIZE,
    UNKNOWN_CATEGORY,
    make_events,
    pack,
    unpack,
)


def test_records_are_32_byte_little_endian_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    n = 257
    ev = make_events(
        rng.integers(0, 1 << 62, n),
        rng.integers(0, 1 << 40, n),
        rng.integers(0, 99, n),
        rng.integers(0, 4, n),
    )
    buf = pack(ev)
    assert RECORD_SIZE == 32 and len(buf) == 32 * n
    back = unpack(buf)
    assert back.dtype == EVENT_DTYPE and np.array_equal(back, ev)
    assert int.from_bytes(buf[:8], "little") == int(ev["item_id"][0])


def test_make_events_defaults_and_refusals() -> None:
    ev = make_events([5, 6], [10, 11])
    assert ev["category"].tolist() == [UNKNOWN_CATEGORY] * 2 and ev["action"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="multiple"):
        unpack(pack(ev)[:-1])  # a partial trailing record is an error, not data
    with pytest.raises(TypeError):
        pack(np.zeros(2, np.int64))


def test_buckets_stay_in_range_and_reserve_row_zero_for_unknown() -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1 << 62, 10_000)
    assert ((item_bucket(ids, 97) >= 0) & (item_bucket(ids, 97) < 97)).all()
    cats = np.concatenate([[-1], rng.integers(0, 1 << 62, 999)])
    cb = category_bucket(cats, 64)
    assert cb[0] == 0 and ((cb[1:] >= 1) & (cb[1:] < 64)).all()
    ab = action_bucket(np.array([-1, 0, 1, 15, 16]), 16)
    assert ab.tolist() == [0, 1, 2, 1, 2]
    assert np.array_equal(item_bucket(ids, 97), item_bucket(ids.copy(), 97))  # deterministic
