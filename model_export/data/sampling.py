"""Implicit negatives: unexposed items that pad a logged candidate set to the served size.

Serving scores whole sets of a fixed size, and the logged part of a request is usually
smaller; training and evaluation fill the rest with items the user was not shown,
labelled 0 (docs/design.md §2, training-inference consistency). They are drawn uniformly
from the item table, distinct, and never one of the request's logged items, so an
exposed item never appears again as a negative in the same set.
"""

from __future__ import annotations

import numpy as np


def sample_negatives(
    rng: np.random.Generator, pool: np.ndarray, exclude: np.ndarray, k: int
) -> np.ndarray:
    """Up to k distinct items of `pool` (sorted unique int64) that are not in `exclude`.

    Returns fewer than k only when the pool has fewer than k items left. Rejection
    sampling keeps the common case (a large catalogue) O(k); a small pool falls back to
    an exact draw without replacement.
    """
    if k <= 0 or pool.size == 0:
        return np.zeros(0, dtype=np.int64)
    ex = np.asarray(exclude, dtype=np.int64)
    pos = np.minimum(np.searchsorted(pool, ex), pool.size - 1)
    blocked = np.zeros(pool.size, dtype=bool)  # pool positions that may not be drawn
    blocked[pos[pool[pos] == ex]] = True
    available = pool.size - int(blocked.sum())
    if available <= 2 * k:
        free = pool[~blocked]
        return rng.choice(free, size=min(k, free.size), replace=False).astype(np.int64)
    picked: list[np.ndarray] = []
    need = k
    while need > 0:
        idx = rng.integers(0, pool.size, size=2 * need + 8)
        idx = idx[~blocked[idx]]
        _, first = np.unique(idx, return_index=True)
        idx = idx[np.sort(first)][:need]  # distinct, in draw order
        blocked[idx] = True
        picked.append(idx)
        need -= idx.size
    out: np.ndarray = pool[np.concatenate(picked)]
    return out
