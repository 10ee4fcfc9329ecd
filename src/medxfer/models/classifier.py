"""Classification model for encoder pretraining: encoder + global average pooling + linear head."""

from __future__ import annotations

import torch
from torch import nn

from medxfer.errors import ConfigError
from medxfer.models.encoders import Encoder


class Classifier(nn.Module):
    """``forward(x) -> logits (N, n_classes)`` from the pooled deepest encoder level."""

    def __init__(self, encoder: Encoder, n_classes: int, dropout: float = 0.0):
        super().__init__()
        if n_classes < 1:
            raise ConfigError(f"a classifier needs n_classes >= 1, got {n_classes}")
        self.encoder = encoder
        self.n_classes = int(n_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(encoder.channels[-1], n_classes)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) global average of the deepest level (2D or 3D)."""
        deepest = self.encoder(x)[-1]
        return deepest.flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled_features(x)))


def build_classifier(encoder: Encoder, n_classes: int, dropout: float = 0.0) -> Classifier:
    """Wrap ``encoder`` (shared, not copied) with a pooled linear head for classification pretraining."""
    if not isinstance(encoder, Encoder):
        raise ConfigError(f"build_classifier needs a medxfer Encoder, got {type(encoder).__name__}")
    return Classifier(encoder, n_classes, dropout=dropout)
