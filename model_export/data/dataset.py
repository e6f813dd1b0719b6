"""A loaded log as per-user training/evaluation units (`UserBatch`).

One `UserBatch` per user holds the user's whole time-sorted behaviour sequence (trimmed
after the last request it needs) and the user's requests in one split; request r sees
`ev[:req_prefix[r]]`, every behaviour strictly before it whatever split that behaviour's
request belongs to (history is history; only the *requests* are split).

Candidate sets, as served (docs/design.md §2):

* the request's logged rows (exposed=True, their labels), then implicit negatives:
  distinct unexposed items drawn uniformly from the item table (exposed=False, label 0)
  up to `set_size`;
* training (split "train"): negatives are drawn afresh each epoch, seeded by
  (seed, epoch, user) so an epoch is reproducible and independent of shuffle order; a
  request with more than `set_size` logged rows keeps a random `set_size` of them
  (also per epoch), so every training set has exactly the served size;
* evaluation (valid/test): negatives are fixed by (seed, split, user): identical across
  calls, epochs and models, so every model is scored on the same sets; every logged row
  is kept, M = max(set_size, largest logged set of the user) and shorter sets are padded
  with cand_mask False.

Ids are bucketed with `ifa_common.hashing`, the functions serving uses. Categories of
sampled negatives come from the item table (an item's most frequent category).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ifa_common.hashing import action_bucket, category_bucket, item_bucket
from model_export.batch import UserBatch
from model_export.data.items import lookup_category
from model_export.data.logs import SPLITS, LogData
from model_export.data.sampling import sample_negatives
from model_export.model.config import ModelConfig

_TRAIN_TAG, _EVAL_TAG = 0, 1  # keep training and evaluation random streams apart


@dataclass
class Dataset:
    log: LogData
    item_buckets: int
    category_buckets: int
    action_buckets: int
    set_size: int
    seed: int
    data_id: str  # short hash of the file's content and the dataset parameters
    max_users: int = 0  # 0 = all; >0 keeps the first users by sorted user id (smoke runs)
    _split_users: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        log = self.log
        req_user = np.repeat(np.arange(log.num_users), np.diff(log.req_offsets))
        keep = req_user < self.max_users if self.max_users > 0 else np.ones(req_user.size, bool)
        for code, split in enumerate(SPLITS):
            self._split_users[split] = np.unique(req_user[keep & (log.req_split == code)])

    # ----------------------------------------------------------------- tables
    def item_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(item_id sorted int64, category int64): raw ids, for the artifact's items.npz."""
        return self.log.item_ids, self.log.item_category

    def users(self, split: str) -> np.ndarray:
        """Indices of users with at least one request in `split`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._split_users[split]

    def num_users(self, split: str) -> int:
        return int(self.users(split).shape[0])

    # ---------------------------------------------------------------- batches
    def batches(
        self,
        split: str,
        *,
        shuffle: bool = False,
        epoch: int = 0,
        fixed_padding: bool | None = None,
    ) -> Iterator[UserBatch]:
        """One UserBatch per user with requests in `split` (only those requests).

        shuffle permutes the users with (seed, epoch). fixed_padding defaults to
        "split is not train" (see the module docstring); pass True to score the train
        split the way evaluation does.
        """
        for u in self.user_order(split, shuffle=shuffle, epoch=epoch):
            yield self.user_batch(int(u), split, epoch=epoch, fixed_padding=fixed_padding)

    users_for = batches  # the name docs/CONTRACTS.md uses

    def user_order(self, split: str, *, shuffle: bool = False, epoch: int = 0) -> np.ndarray:
        """The user indices `batches` visits, in its order: a permutation seeded by
        (seed, epoch) when shuffling, the same in every process (distributed training
        shards this order by rank)."""
        users = self.users(split)
        if shuffle:
            users = np.random.default_rng([self.seed, epoch, 2]).permutation(users)
        return users

    def user_batch(
        self, u: int, split: str, *, epoch: int = 0, fixed_padding: bool | None = None
    ) -> UserBatch:
        """The UserBatch of user index u for `split`."""
        log = self.log
        code = SPLITS.index(split)
        fixed = split != "train" if fixed_padding is None else fixed_padding
        r0, r1 = int(log.req_offsets[u]), int(log.req_offsets[u + 1])
        reqs = r0 + np.flatnonzero(log.req_split[r0:r1] == code)
        if reqs.size == 0:
            raise ValueError(f"user {u} has no {split} requests")
        if fixed:
            rng = np.random.default_rng([self.seed, _EVAL_TAG, code, u])
        else:
            rng = np.random.default_rng([self.seed, _TRAIN_TAG, epoch, u])

        sets = [self._candidate_set(int(r), rng, truncate=not fixed) for r in reqs]
        width = max(self.set_size, max(len(s[0]) for s in sets))
        n_req = len(sets)
        item = np.zeros((n_req, width), np.int64)
        cat = np.full((n_req, width), -1, np.int64)
        mask = np.zeros((n_req, width), bool)
        label = np.zeros((n_req, width), np.float32)
        exposed = np.zeros((n_req, width), bool)
        for i, (it, ct, lb, ex) in enumerate(sets):
            m = it.size
            item[i, :m], cat[i, :m], label[i, :m], exposed[i, :m] = it, ct, lb, ex
            mask[i, :m] = True
        negative = mask & ~exposed  # their category: the item table's, one lookup per user
        cat[negative] = lookup_category(item[negative], log.item_ids, log.item_category)

        prefix = log.req_prefix[reqs]
        e0 = int(log.ev_offsets[u])
        e1 = e0 + int(prefix.max())  # later behaviours are never read by these requests
        return UserBatch(
            ev_item=_long(item_bucket(log.ev_item[e0:e1], self.item_buckets)),
            ev_cat=_long(category_bucket(log.ev_category[e0:e1], self.category_buckets)),
            ev_action=_long(action_bucket(log.ev_action[e0:e1], self.action_buckets)),
            ev_ts=_long(log.ev_ts[e0:e1]),
            req_prefix=_long(prefix),
            cand_item=_long(np.where(mask, item_bucket(item, self.item_buckets), 0)),
            cand_cat=_long(np.where(mask, category_bucket(cat, self.category_buckets), 0)),
            cand_mask=torch.from_numpy(mask),
            label=torch.from_numpy(label),
            exposed=torch.from_numpy(exposed),
        )

    def logged_rows(self, u: int, split: str) -> list[tuple[int, int]]:
        """Request r of user u's `split` batch (in batch order) -> its logged candidates
        `cand_*[c0:c1]`, which are the first c1 - c0 columns of that batch row whenever
        the batch keeps every logged row (evaluation splits, fixed padding)."""
        log = self.log
        r0, r1 = int(log.req_offsets[u]), int(log.req_offsets[u + 1])
        reqs = r0 + np.flatnonzero(log.req_split[r0:r1] == SPLITS.index(split))
        return [(int(log.cand_offsets[r]), int(log.cand_offsets[r + 1])) for r in reqs]

    def _candidate_set(
        self, r: int, rng: np.random.Generator, *, truncate: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(item, category, label, exposed) of request r: logged rows, then negatives."""
        log = self.log
        c0, c1 = int(log.cand_offsets[r]), int(log.cand_offsets[r + 1])
        items, cats = log.cand_item[c0:c1], log.cand_category[c0:c1]
        labels = log.cand_label[c0:c1].astype(np.float32)
        if truncate and items.size > self.set_size:
            keep = np.sort(rng.choice(items.size, size=self.set_size, replace=False))
            items, cats, labels = items[keep], cats[keep], labels[keep]
        neg = sample_negatives(rng, log.item_ids, log.cand_item[c0:c1], self.set_size - items.size)
        exposed = np.concatenate([np.ones(items.size, bool), np.zeros(neg.size, bool)])
        return (
            np.concatenate([items, neg]),
            np.concatenate([cats, np.full(neg.size, -1, np.int64)]),  # filled by the caller
            np.concatenate([labels, np.zeros(neg.size, np.float32)]),
            exposed,
        )

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Sizes worth printing before a run (and storing next to its metrics)."""
        log = self.log
        n_per_user = np.diff(log.ev_offsets)
        set_sizes = np.diff(log.cand_offsets)
        return {
            "data_id": self.data_id,
            "source": log.source,
            "rows": log.num_rows,
            "ignored_rows": log.ignored_rows,
            "users": log.num_users,
            "events": log.num_events,
            "items": int(log.item_ids.size),
            "categories": int(np.unique(log.item_category).size),
            "requests": {s: int((log.req_split == i).sum()) for i, s in enumerate(SPLITS)},
            "users_with_requests": {s: self.num_users(s) for s in SPLITS},
            "logged_candidates": int(log.cand_item.size),
            "positive_rate": float(log.cand_label.mean()) if log.cand_label.size else 0.0,
            "mean_set": float(set_sizes.mean()) if set_sizes.size else 0.0,
            "max_set": int(set_sizes.max()) if set_sizes.size else 0,
            "mean_n": float(n_per_user.mean()) if n_per_user.size else 0.0,
            "max_n": int(n_per_user.max()) if n_per_user.size else 0,
            "set_size": self.set_size,
            "max_users": self.max_users,
        }


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def data_id(log: LogData, set_size: int, seed: int, max_users: int = 0) -> str:
    """12 hex chars identifying (file content, set size, seed, users): the manifest's data id."""
    key = f"{log.content_sha256}|set_size={set_size}|seed={seed}|max_users={max_users}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def build_dataset(
    log: LogData, cfg: ModelConfig, set_size: int, seed: int, max_users: int = 0
) -> Dataset:
    """Wrap a validated log for training/evaluation with cfg's bucket counts.

    max_users > 0 keeps only the first max_users users (sorted user id order): a cheap,
    deterministic subset for smoke runs and tests.
    """
    if set_size < 1:
        raise ValueError(f"set_size must be >= 1, got {set_size}")
    if max_users < 0:
        raise ValueError(f"max_users must be >= 0, got {max_users}")
    return Dataset(
        log=log,
        item_buckets=cfg.item_buckets,
        category_buckets=cfg.category_buckets,
        action_buckets=cfg.action_buckets,
        set_size=set_size,
        seed=seed,
        data_id=data_id(log, set_size, seed, max_users),
        max_users=max_users,
    )
