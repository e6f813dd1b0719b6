"""Item / category / action embedding tables shared by every model.

Inputs are bucket indices (ifa_common.hashing), so unseen ids still get a row.
An event is item + category + action; a candidate is item + category (same tables).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.item = nn.Embedding(cfg.item_buckets, cfg.d_model)
        self.category = nn.Embedding(cfg.category_buckets, cfg.d_model)
        self.action = nn.Embedding(cfg.action_buckets, cfg.d_model)
        for table in (self.item, self.category, self.action):
            nn.init.normal_(table.weight, std=cfg.embed_std)

    def events(self, item: torch.Tensor, cat: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """(N,) x 3 -> (N, C)."""
        return self.item(item) + self.category(cat) + self.action(action)

    def candidates(self, item: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """(B, M) x 2 -> (B, M, C)."""
        return self.item(item) + self.category(cat)
