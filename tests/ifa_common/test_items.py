"""The item table: lookups (dense and sparse ids) and the items.npz reader's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ifa_common import hashing
from ifa_common.items import ItemTable, load_items, save_items
from ifa_common.manifest import ArtifactError


@pytest.mark.parametrize("sparse", [False, True])
def test_item_table_lookup(sparse: bool) -> None:
    rng = np.random.default_rng(11)
    ids = np.unique(rng.integers(0, 2**62 if sparse else 5000, 2000))
    cats = rng.integers(0, 100, ids.size)
    table = ItemTable(ids, cats)
    assert (table.dense is None) == sparse
    queries = np.concatenate(
        [rng.choice(ids, 500), rng.integers(0, 2**63 - 1, 500), [0, 2**63 - 1]]
    )
    known = dict(zip(ids.tolist(), cats.tolist(), strict=True))
    want = [known.get(int(q), -1) for q in queries]
    np.testing.assert_array_equal(table.lookup(queries), want)
    assert ItemTable(np.zeros(0, np.int64), np.zeros(0, np.int64)).lookup(queries).max() == -1
    edges = np.array([-1, -(2**63), int(ids[-1]), int(ids[-1]) + 1, int(ids[0])])
    for q in (queries, edges):  # the per-request fast path is the definition, bucketed
        for buckets in (7, 1024):
            want_b = hashing.category_bucket(table.lookup(q), buckets)
            np.testing.assert_array_equal(table.category_buckets(q, buckets), want_b)


def test_save_then_load_sorts_by_id(tmp_path: Path) -> None:
    path = tmp_path / "items.npz"
    save_items(path, np.array([5, 1, 3]), np.array([50, 10, 30]))
    ids, cats = load_items(path)
    assert ids.tolist() == [1, 3, 5] and cats.tolist() == [10, 30, 50]


@pytest.mark.parametrize(
    ("arrays", "names"),
    [
        ({"category": np.arange(3)}, "no item_id"),
        ({"item_id": np.arange(3)}, "no category"),
        ({"item_id": np.arange(3.0), "category": np.arange(3)}, "must be integers"),
        ({"item_id": np.arange(3), "category": np.arange(4)}, "1-D of one length"),
        ({"item_id": np.zeros((2, 2), np.int64), "category": np.zeros((2, 2), np.int64)}, "1-D"),
    ],
)
def test_a_malformed_table_is_an_artifact_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], names: str
) -> None:
    path = tmp_path / "items.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match=names):
        load_items(path)


def test_a_file_that_is_not_an_npz_is_an_artifact_error(tmp_path: Path) -> None:
    path = tmp_path / "items.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ArtifactError, match="not an item table"):
        load_items(path)
