"""The item side-feature table: item id -> category.

A log may show one item under several categories (re-categorised catalogues, noisy
joins). Serving needs exactly one category per item (the artifact's `items.npz`), so
an item's category is the one it appears with most often over all rows of the log,
ties going to the smallest category id: a rule that is deterministic and does not
depend on row order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def item_table(item: np.ndarray, category: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item_id sorted ascending int64, category int64) from parallel row arrays."""
    item = np.asarray(item, dtype=np.int64)
    category = np.asarray(category, dtype=np.int64)
    if item.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Count (item, category) pairs by hashing (O(rows)); only the few unique pairs get sorted.
    pairs = pd.DataFrame({"i": item, "c": category}).groupby(["i", "c"], sort=False).size()
    p_item = pairs.index.get_level_values("i").to_numpy(dtype=np.int64)
    p_cat = pairs.index.get_level_values("c").to_numpy(dtype=np.int64)
    counts = pairs.to_numpy(dtype=np.int64)
    # Per item: highest count first, then the smallest category.
    best = np.lexsort((p_cat, -counts, p_item))
    p_item, p_cat = p_item[best], p_cat[best]
    first = np.ones(p_item.size, dtype=bool)
    first[1:] = p_item[1:] != p_item[:-1]
    return p_item[first], p_cat[first]


def lookup_category(
    items: np.ndarray, table_items: np.ndarray, table_categories: np.ndarray
) -> np.ndarray:
    """Categories of `items` from a sorted table; -1 (unknown) for items not in it."""
    items = np.asarray(items, dtype=np.int64)
    if table_items.size == 0:
        return np.full(items.shape, -1, dtype=np.int64)
    pos = np.clip(np.searchsorted(table_items, items), 0, table_items.size - 1)
    found = table_items[pos] == items
    return np.where(found, table_categories[pos], -1).astype(np.int64)
