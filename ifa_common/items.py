"""The item side-feature table of an artifact (`items.npz`: item_id, category), written by
the exporter and read by the runtime through the same two functions; numpy only."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np

from ifa_common import hashing
from ifa_common.manifest import ArtifactError

ID_KEY: Final = "item_id"
CATEGORY_KEY: Final = "category"


def save_items(path: Path, ids: np.ndarray, categories: np.ndarray) -> None:
    """Write the table `load_items` reads (keys ID_KEY and CATEGORY_KEY)."""
    np.savez(
        path,
        item_id=np.asarray(ids, dtype=np.int64),
        category=np.asarray(categories, dtype=np.int64),
    )


class ItemTable:
    """item id -> category. Dense ids (the usual case: MovieLens, the synthetic set, any
    catalogue numbered from 0) get a direct-index array, much faster than a binary
    search (docs/performance.md); sparse ids use np.searchsorted."""

    MAX_DENSE: Final = 1 << 22  # entries (32 MiB of int64) at most

    def __init__(self, ids: np.ndarray, categories: np.ndarray) -> None:
        self.ids, self.categories = ids, categories  # ids sorted ascending
        self.dense: np.ndarray | None = None
        self._bucket_tables: dict[int, np.ndarray] = {}
        if ids.size and ids[0] >= 0 and ids[-1] < min(self.MAX_DENSE, 8 * ids.size + 1024):
            self.dense = np.full(int(ids[-1]) + 1, -1, np.int64)
            self.dense[ids] = categories

    def category_buckets(self, items: np.ndarray, buckets: int) -> np.ndarray:
        """Raw item ids -> category bucket (0 where unknown): `category_bucket(lookup(.))`,
        with one add and one clipping take for dense ids (the per-request path: a few us
        for 500 candidates instead of ~100 us of masks and modulos)."""
        if self.dense is None:
            return hashing.category_bucket(self.lookup(items), buckets)
        table = self._bucket_tables.get(buckets)
        if table is None:
            # the dense table's buckets between two sentinels (unknown), shifted by one:
            # `take(mode="clip")` puts every id outside [0, len) on one of them (negative
            # ids on the first, large ones on the last; 2^63 - 1 + 1 wraps to the first)
            table = np.concatenate(([0], hashing.category_bucket(self.dense, buckets), [0]))
            self._bucket_tables[buckets] = table
        return table.take(np.asarray(items, dtype=np.int64) + 1, mode="clip")

    def lookup(self, items: np.ndarray) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)
        if self.dense is not None:
            inside = (items >= 0) & (items < self.dense.size)
            return np.where(inside, self.dense[np.where(inside, items, 0)], -1)
        ids = self.ids
        if ids.size == 0:
            return np.full(items.shape, -1, np.int64)
        idx = np.searchsorted(ids, items)
        np.minimum(idx, ids.size - 1, out=idx)
        return np.where(ids[idx] == items, self.categories[idx], -1)


def load_items(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted ascending, their categories); ArtifactError names what is wrong with a
    file that is not such a table (missing key, wrong shape or type, not an npz)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in (ID_KEY, CATEGORY_KEY) if k not in npz.files]
            if missing:
                raise ArtifactError(f"{path.name}: no {', '.join(missing)} array")
            ids, cats = npz[ID_KEY], npz[CATEGORY_KEY]
    except ArtifactError:
        raise
    except Exception as e:  # a zip np.load cannot read, pickled objects, a truncated file
        raise ArtifactError(f"{path.name}: not an item table ({e})") from e
    if not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(cats.dtype, np.integer)):
        raise ArtifactError(f"{path.name}: {ID_KEY} and {CATEGORY_KEY} must be integers")
    ids, cats = ids.astype(np.int64, copy=False), cats.astype(np.int64, copy=False)
    if ids.shape != cats.shape or ids.ndim != 1:
        raise ArtifactError(f"{path.name}: {ID_KEY} and {CATEGORY_KEY} must be 1-D of one length")
    if ids.size > 1 and np.any(ids[1:] < ids[:-1]):
        order = np.argsort(ids, kind="stable")
        ids, cats = ids[order], cats[order]
    return ids, cats
