"""The unit of training and evaluation: one user's history and that user's requests.

All of a user's requests share one time-sorted event sequence; request r sees the
prefix `ev[:req_prefix[r]]` (events strictly before the request time). Models encode
the sequence once per user and answer every request from it, which is what keeps
lifelong histories trainable on a CPU.

Ids are already bucketed with `ifa_common.hashing` (the same functions the serving
runtime uses), so tensors index embedding tables directly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class UserBatch:
    ev_item: torch.Tensor  # (N,) long, item bucket
    ev_cat: torch.Tensor  # (N,) long, category bucket
    ev_action: torch.Tensor  # (N,) long, action bucket
    ev_ts: torch.Tensor  # (N,) long, unix seconds, non-decreasing
    req_prefix: torch.Tensor  # (R,) long, history length of each request, non-decreasing
    cand_item: torch.Tensor  # (R, M) long, item bucket
    cand_cat: torch.Tensor  # (R, M) long, category bucket
    cand_mask: torch.Tensor  # (R, M) bool, False for padding beyond the set
    label: torch.Tensor  # (R, M) float, 1/0 (sampled implicit negatives are 0)
    exposed: torch.Tensor  # (R, M) bool, True for logged rows, False for sampled negatives

    @property
    def num_events(self) -> int:
        return int(self.ev_item.shape[0])

    @property
    def num_requests(self) -> int:
        return int(self.cand_item.shape[0])

    def to(self, device: torch.device | str) -> UserBatch:
        return UserBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
