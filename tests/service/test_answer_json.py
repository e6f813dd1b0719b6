"""The /rank answer's items are written straight from the arrays (service.http.protocol
.items_json): byte for byte what orjson writes for the list of dicts, for any ids and
probabilities the scorer can produce."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.http.protocol import ID_MAX, items_json
from service.usecases.rank import order_scores


def reference(ids: np.ndarray, scores: np.ndarray) -> bytes:
    return orjson.dumps(
        [{"item_id": i, "score": s} for i, s in zip(ids.tolist(), scores.tolist(), strict=True)]
    )


@pytest.mark.parametrize("seed", range(40))
def test_items_json_is_byte_for_byte_the_list_of_dicts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 2_001))
    ids = rng.integers(0, ID_MAX, m, dtype=np.int64, endpoint=True)
    logits = rng.normal(0, float(rng.choice([0.1, 3.0, 40.0])), m)
    scores = 0.5 * (1.0 + np.tanh(0.5 * logits))  # what order_scores gives: 0 and 1 too
    assert items_json(ids, scores) == reference(ids, scores)


def test_items_json_edge_values() -> None:
    ids = np.array([0, 1, ID_MAX, 7, 7], np.int64)
    scores = np.array([0.0, 1.0, 5e-324, 0.1, 1 / 3])  # a subnormal; repeats of an id
    assert items_json(ids, scores) == reference(ids, scores)
    assert orjson.loads(items_json(ids[:1], scores[:1])) == [{"item_id": 0, "score": 0.0}]
    view = np.arange(10, dtype=np.int64)[::-2]  # a strided view, as slicing can give
    assert items_json(view, np.linspace(0, 1, 5)) == reference(view, np.linspace(0, 1, 5))


def test_items_json_of_no_items_and_of_mismatched_arrays() -> None:
    empty = np.zeros(0, np.int64)
    assert items_json(empty, np.zeros(0)) == reference(empty, np.zeros(0)) == b"[]"
    with pytest.raises(ValueError, match="3 item ids but 2 scores"):
        items_json(np.arange(3), np.array([0.1, 0.2]))


@pytest.mark.parametrize("seed", range(12))
def test_order_scores_gives_the_sigmoid_bit_for_bit_best_first_ties_in_request_order(
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 2_001))
    # saturated logits (probability exactly 1.0 or 0.0) tie, and repeats of a logit tie
    logits = rng.choice([-80.0, -3.0, 0.0, 0.25, 2.0, 45.0, 90.0], m).astype(np.float32)
    logits[: m // 2] = rng.normal(0, 5, m // 2)
    given = logits.copy()
    k = int(rng.integers(1, m + 1))
    order, probs = order_scores(logits, k)
    expected = 0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))
    assert np.array_equal(logits, given)  # the scorer's output is left as it was
    assert order.shape == (k,) and probs.dtype == np.float64
    assert probs.tobytes() == expected[order].tobytes()
    ranked = sorted(range(m), key=lambda i: (-expected[i], i))  # best first, then request order
    assert order.tolist() == ranked[:k]
