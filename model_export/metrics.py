"""Ranking metrics over candidate sets: AUC, GAUC, NDCG@10, logloss (numpy only).

Every headline metric is over the *logged* rows only (the candidates the log says were
exposed, with their logged labels): the standard offline definitions. The unexposed
items drawn to pad a set to the serving size are a training device; the one figure
that counts them is named for it, `auc_vs_sampled`.

Definitions (what the README's tables mean):
* AUC: pooled over every logged row of every request; ties count one half
  (Mann-Whitney U with average ranks).
* GAUC: per-user AUC, averaged with each user weighted by their number of logged rows
  (impressions); users whose rows are all one class are skipped.
* NDCG@10: per request over its logged rows, binary gains, averaged over requests with
  a positive.
* logloss: mean binary cross entropy of sigmoid(logit), pooled over logged rows.
* auc_vs_sampled: AUC pooled over logged rows *and* sampled negatives (label 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    users = np.asarray(users).ravel()
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    order = np.argsort(users, kind="mergesort")
    u, lab, sc = users[order], labels[order], scores[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    num = den = 0.0
    for a, b in zip(starts, ends, strict=True):
        value = auc(lab[a:b], sc[a:b])
        if not np.isnan(value):
            num += (b - a) * value
            den += b - a
    return float(num / den) if den else float("nan")


def ndcg_at_k(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over sets (rows) that have at least one positive. (R, M) inputs."""
    labels = np.where(mask, labels, 0.0)
    scores = np.where(mask, scores, -np.inf)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (R, k)
    gains = np.take_along_axis(labels, top, axis=1)
    dcg = (gains * discounts[: gains.shape[1]]).sum(axis=1)
    ideal = -np.sort(-labels, axis=1)[:, :k]
    idcg = (ideal * discounts[: ideal.shape[1]]).sum(axis=1)
    has_pos = idcg > 0
    if not has_pos.any():
        return float("nan")
    return float((dcg[has_pos] / idcg[has_pos]).mean())


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel()
    x = np.asarray(logits, dtype=np.float64).ravel()
    # log(1 + e^-|x|) form: stable for large |x|
    loss = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    return float(loss.mean()) if len(loss) else float("nan")


@dataclass
class MetricAccumulator:
    """Collects (user, request set) predictions; `compute()` gives all metrics."""

    users: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    sampled_logits: list[np.ndarray] = field(default_factory=list)
    ndcg_sum: float = 0.0
    ndcg_sets: int = 0

    def add(
        self,
        user: int,
        logits: np.ndarray,
        labels: np.ndarray,
        mask: np.ndarray,
        exposed: np.ndarray | None = None,
    ) -> None:
        """One user's requests: (R, M) logits, labels, mask (a real candidate) and exposed
        (a logged row; None = every masked candidate is logged)."""
        valid = mask.astype(bool)
        logged = valid if exposed is None else valid & exposed.astype(bool)
        self.users.append(np.full(int(logged.sum()), user, dtype=np.int64))
        self.labels.append(labels[logged].astype(np.float64))
        self.logits.append(logits[logged].astype(np.float64))
        self.sampled_logits.append(logits[valid & ~logged].astype(np.float64))
        has_pos = (np.where(logged, labels, 0) > 0).any(axis=1)
        if has_pos.any():
            value = ndcg_at_k(labels[has_pos], logits[has_pos], logged[has_pos])
            self.ndcg_sum += value * int(has_pos.sum())
            self.ndcg_sets += int(has_pos.sum())

    def compute(self) -> dict[str, float]:
        if not self.labels:
            nan = float("nan")
            return {"auc": nan, "gauc": nan, "ndcg@10": nan, "logloss": nan, "logged_rows": 0}
        y = np.concatenate(self.labels)
        s = np.concatenate(self.logits)
        u = np.concatenate(self.users)
        sampled = np.concatenate(self.sampled_logits)
        out = {
            "auc": auc(y, s),
            "gauc": gauc(u, y, s),
            "ndcg@10": self.ndcg_sum / self.ndcg_sets if self.ndcg_sets else float("nan"),
            "logloss": logloss(y, s),
            "logged_rows": len(y),
        }
        if sampled.size:
            both_y = np.concatenate([y, np.zeros(sampled.size)])
            out["auc_vs_sampled"] = auc(both_y, np.concatenate([s, sampled]))
            out["sampled_rows"] = int(sampled.size)
        return out
