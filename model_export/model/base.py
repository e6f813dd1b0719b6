"""`RankModel`: what every model type shares (config, embeddings, head) and its seam."""

from __future__ import annotations

import torch
from torch import nn

from model_export.batch import UserBatch

from .config import ModelConfig
from .embeddings import Embeddings
from .head import ScoreHead


class RankModel(nn.Module):
    """forward(batch: UserBatch) -> logits (R, M), one row per request of the user."""

    def __init__(self, cfg: ModelConfig, mass_dim: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.head = ScoreHead(cfg, mass_dim)

    def forward(self, batch: UserBatch) -> torch.Tensor:
        raise NotImplementedError
