"""Random `UserBatch`es and small configs for model tests (reusable by other tests)."""

from __future__ import annotations

from typing import Any

import torch

from model_export.batch import UserBatch
from model_export.model.config import ModelConfig, default_config

T0 = 1_700_000_000  # unix seconds around late 2023


def tiny_config(**overrides: Any) -> ModelConfig:
    """Small dims that keep tests fast; overrides as in `default_config`."""
    base: dict[str, Any] = {
        "item_buckets": 97,
        "category_buckets": 11,
        "action_buckets": 5,
        "d_model": 16,
        "heads": 2,
        "d_head": 4,
        "mlp_hidden": (16,),
        "last_n": 8,
        "top_k": 5,
        "dropout": 0.0,
        "cat_slots": 5,
    }
    base.update(overrides)
    if "decay_per_day" not in base:
        base["decay_per_day"] = (0.0,) * int(base["heads"])
    return default_config(**base)


def random_events(
    n: int, cfg: ModelConfig, seed: int = 0, t0: int = T0, span_s: int = 400 * 86_400
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(item, cat, action, ts) bucket ids and non-decreasing unix seconds, (N,) long each."""
    g = torch.Generator().manual_seed(seed)
    item = torch.randint(0, cfg.item_buckets, (n,), generator=g)
    cat = torch.randint(0, cfg.category_buckets, (n,), generator=g)
    action = torch.randint(0, cfg.action_buckets, (n,), generator=g)
    ts = t0 + torch.sort(torch.randint(0, span_s, (n,), generator=g)).values
    return item, cat, action, ts


def random_batch(
    cfg: ModelConfig,
    n_events: int = 60,
    n_requests: int = 5,
    n_cands: int = 7,
    seed: int = 0,
    min_prefix: int = 0,
) -> UserBatch:
    """One user with `n_events` events and `n_requests` requests of up to `n_cands` candidates.

    Prefixes are sorted (repeats allowed), the first is `min_prefix` (0 = a request with
    no history); each request pads a random tail of its set.
    """
    g = torch.Generator().manual_seed(seed + 1)
    item, cat, action, ts = random_events(n_events, cfg, seed)
    inner = torch.randint(min_prefix, n_events + 1, (max(n_requests - 1, 0),), generator=g)
    prefix = torch.sort(torch.cat([torch.tensor([min_prefix]), inner])).values[:n_requests]
    r, m = n_requests, n_cands
    cand_item = torch.randint(0, cfg.item_buckets, (r, m), generator=g)
    cand_cat = torch.randint(0, cfg.category_buckets, (r, m), generator=g)
    sizes = torch.randint(max(1, m // 2), m + 1, (r,), generator=g)
    cand_mask = torch.arange(m).unsqueeze(0) < sizes.unsqueeze(1)  # (R, M)
    label = (torch.rand(r, m, generator=g) < 0.3).float() * cand_mask
    label[:, 0] = 1.0  # every set has a positive
    exposed = cand_mask.clone()
    return UserBatch(
        ev_item=item,
        ev_cat=cat,
        ev_action=action,
        ev_ts=ts,
        req_prefix=prefix.long(),
        cand_item=cand_item,
        cand_cat=cand_cat,
        cand_mask=cand_mask,
        label=label,
        exposed=exposed,
    )
