"""Id -> embedding-row bucketing, identical in training, export and serving.

Ids are integers in [0, 2^63). Buckets are plain modulo (dense id spaces such as
MovieLens get no collisions while ids < buckets; unseen ids still get a row).
Row 0 of the category and action tables is reserved for "unknown" (category -1).
"""

from __future__ import annotations

import numpy as np


def item_bucket(item_id: np.ndarray, buckets: int) -> np.ndarray:
    return np.asarray(item_id, dtype=np.int64) % buckets


def category_bucket(category: np.ndarray, buckets: int) -> np.ndarray:
    c = np.asarray(category, dtype=np.int64)
    return np.where(c < 0, 0, 1 + c % (buckets - 1)).astype(np.int64)


def action_bucket(action: np.ndarray, buckets: int) -> np.ndarray:
    a = np.asarray(action, dtype=np.int64)
    return np.where(a < 0, 0, 1 + a % (buckets - 1)).astype(np.int64)
