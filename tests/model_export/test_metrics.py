"""Metrics against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_export.metrics import MetricAccumulator, auc, gauc, logloss, ndcg_at_k


def test_auc_counts_ties_as_half() -> None:
    # pairs (pos, neg): (.5,.5)=0.5, (.5,.1)=1, (.9,.5)=1, (.9,.1)=1 -> 3.5 / 4
    assert auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.9, 0.1])) == pytest.approx(0.875)


def test_auc_perfect_reversed_and_one_class() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([1.0, 2, 3, 4])) == 1.0
    assert auc(y, np.array([4.0, 3, 2, 1])) == 0.0
    assert math.isnan(auc(np.ones(3), np.arange(3.0)))


def test_gauc_weights_users_by_candidates_and_skips_one_class_users() -> None:
    users = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.1, 0.9, 0.5, 0.5])
    # user 1: pairs (.9>.1),(.9>.8),(.2<.1? no: .2>.1),(.2<.8) -> 3/4; user 2: 0; user 3 skipped
    expected = (4 * 0.75 + 2 * 0.0) / 6
    assert gauc(users, labels, scores) == pytest.approx(expected)


def test_ndcg_at_10_hand_example() -> None:
    labels = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    mask = np.ones_like(labels, dtype=bool)
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    # the second set has no positive and does not count
    assert ndcg_at_k(labels, scores, mask) == pytest.approx(dcg / idcg)


def test_ndcg_ignores_masked_candidates() -> None:
    labels = np.array([[0.0, 1.0]])
    scores = np.array([[5.0, 1.0]])
    assert ndcg_at_k(labels, scores, np.array([[False, True]])) == pytest.approx(1.0)


def test_logloss_matches_definition_and_is_stable() -> None:
    y = np.array([1.0, 0.0])
    x = np.array([0.0, 2.0])
    expected = (math.log(2) + math.log1p(math.exp(2))) / 2
    assert logloss(y, x) == pytest.approx(expected)
    assert math.isfinite(logloss(np.array([0.0]), np.array([1000.0])))


def test_accumulator_combines_users() -> None:
    acc = MetricAccumulator()
    acc.add(0, np.array([[2.0, 1.0]]), np.array([[1.0, 0.0]]), np.array([[True, True]]))
    acc.add(
        1, np.array([[1.0, 2.0, 0.0]]), np.array([[1.0, 0.0, 0.0]]), np.array([[True, True, False]])
    )
    out = acc.compute()
    assert out["logged_rows"] == 4
    assert "auc_vs_sampled" not in out  # no sampled negatives were given
    assert out["auc"] == pytest.approx(0.5)  # pos {2, 1} vs neg {1, 2}: (1 + .5 + .5 + 0) / 4
    assert out["gauc"] == pytest.approx(0.5)  # (2*1 + 2*0) / 4
    assert out["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(3)) / 2)


def test_headline_metrics_ignore_sampled_negatives() -> None:
    """Sampled negatives (exposed False) never enter AUC/GAUC/NDCG/logloss."""
    logits = np.array([[2.0, 1.0, 0.5, -3.0, -4.0]])
    labels = np.array([[0.0, 1.0, 0.0, 0.0, 0.0]])
    mask = np.ones((1, 5), bool)
    exposed = np.array([[True, True, True, False, False]])
    acc = MetricAccumulator()
    acc.add(0, logits, labels, mask, exposed)
    out = acc.compute()
    assert out["logged_rows"] == 3 and out["sampled_rows"] == 2
    assert out["auc"] == pytest.approx(0.5)  # logged: pos 1.0 vs neg {2.0, 0.5}
    assert out["auc_vs_sampled"] == pytest.approx(0.75)  # + two easy negatives: 3 of 4
    assert out["ndcg@10"] == pytest.approx(1 / math.log2(3))  # second of the 3 logged rows
    expected_ll = logloss(labels[exposed], logits[exposed])
    assert out["logloss"] == pytest.approx(expected_ll)
