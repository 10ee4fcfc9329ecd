"""Voxel-wise losses: cross-entropy and focal, averaged with class weights over non-ignored pixels."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.nn.functional as F
from monai.losses import FocalLoss as MonaiFocalLoss
from torch import Tensor

from medxfer.errors import ConfigError
from medxfer.training.losses.base import (
    LossInputs,
    SegmentationLoss,
    _check_class_weights,
    _check_number,
    _weighted_pixel_mean,
)


class _PixelLoss(SegmentationLoss):
    """Per-pixel losses averaged with class weights over non-ignored pixels."""

    def __init__(self, *, class_weights: Optional[Sequence[float]] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.register_buffer("class_weights", _check_class_weights(self.base_name, class_weights))

    def pixel_weights(self, inputs: LossInputs) -> Tensor:
        weights = inputs.valid.to(inputs.logits.dtype)
        if self.class_weights is None:
            return weights
        if self.class_weights.numel() != inputs.n_classes:
            raise ConfigError(
                f"loss {self.name!r}: class_weights has {self.class_weights.numel()} entries but the "
                f"model predicts {inputs.n_classes} classes (incl. background)"
            )
        return weights * self.class_weights.to(inputs.logits)[inputs.target]

    def per_pixel(self, inputs: LossInputs) -> Tensor:
        raise NotImplementedError

    def compute(self, inputs: LossInputs) -> Tensor:
        return _weighted_pixel_mean(self.per_pixel(inputs), self.pixel_weights(inputs))


class CrossEntropyLoss(_PixelLoss):
    """Cross-entropy with ignored pixels and optional class weights (torch's weighted-mean convention)."""

    base_name = "ce"

    def per_pixel(self, inputs: LossInputs) -> Tensor:
        return F.cross_entropy(inputs.logits, inputs.target, reduction="none")


class FocalLoss(_PixelLoss):
    """Softmax focal loss ``-(1 - p_y)^gamma log p_y`` (Lin et al. 2017); ``gamma=0`` is cross-entropy."""

    base_name = "focal"

    def __init__(self, *, gamma: float = 2.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.gamma = _check_number(self.base_name, "gamma", gamma)
        self.focal = MonaiFocalLoss(
            include_background=True, to_onehot_y=False, gamma=self.gamma, use_softmax=True, reduction="none"
        )

    def per_pixel(self, inputs: LossInputs) -> Tensor:
        # Only the target channel is non-zero, so the channel sum is the pixel's focal term.
        return self.focal(inputs.logits, inputs.one_hot).sum(dim=1)
