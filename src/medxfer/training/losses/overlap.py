"""Overlap losses: soft Dice and Tversky on masked probabilities (MONAI), averaged over the classes that count."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import TverskyLoss as MonaiTverskyLoss
from torch import Tensor

from medxfer.errors import ConfigError
from medxfer.training.losses.base import LossInputs, SegmentationLoss, _check_number, _masked_mean


class _OverlapLoss(SegmentationLoss):
    """Dice-like losses: a MONAI loss on masked probabilities, averaged over the classes that count."""

    def __init__(
        self,
        *,
        include_background: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.include_background = bool(include_background)
        self.smooth_nr = _check_number(self.base_name, "smooth_nr", smooth_nr)
        self.smooth_dr = _check_number(self.base_name, "smooth_dr", smooth_dr, strict=True)
        self.batch = bool(batch)

    overlap: torch.nn.Module  # the MONAI loss (reduction "none") each subclass sets up

    def _per_class(self, probabilities: Tensor, one_hot: Tensor) -> Tensor:
        return self.overlap(probabilities, one_hot)

    def compute(self, inputs: LossInputs) -> Tensor:
        n_cases, n_classes = inputs.class_annotated.shape
        per_class = self._per_class(inputs.probabilities, inputs.one_hot)
        present = class_present(inputs)
        if self.batch:
            # Unannotated cases add nothing to a class's batch sums (their merged probability and
            # target are 0 there); a class no case annotates is left out of the average.
            values = per_class.reshape(n_classes)
            counts = inputs.class_annotated.any(dim=0) & present.any(dim=0)
        else:
            values = per_class.reshape(n_cases, n_classes)
            counts = inputs.class_annotated & present
        if not self.include_background:
            counts[..., 0] = False
        return _masked_mean(values, counts)


def class_present(inputs: LossInputs) -> Tensor:
    """Bool ``(N, C)``: class ``k`` is in case ``n``'s target or in its hard prediction (argmax), at valid pixels.

    Left in, a class absent from both would have soft Dice ~0 (loss ~1) however small its probabilities,
    the same value as when it is predicted everywhere; the overlap losses leave it out of the class average.
    """
    n_classes = inputs.n_classes
    predicted = inputs.logits.detach().argmax(dim=1)
    predicted = torch.where(inputs.valid, predicted, n_classes)  # ignored pixels: an extra, dropped class
    counts = torch.zeros(inputs.logits.shape[0], n_classes + 1, dtype=torch.long, device=predicted.device)
    counts.scatter_add_(1, predicted.flatten(1), torch.ones_like(predicted.flatten(1)))
    in_target = inputs.one_hot.detach().flatten(2).sum(dim=-1) > 0
    return in_target | (counts[:, :n_classes] > 0)


class DiceLoss(_OverlapLoss):
    """Soft Dice loss (see the module docstring for the formula, smooth terms and ``batch``)."""

    base_name = "dice"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.overlap = MonaiDiceLoss(
            include_background=True,
            to_onehot_y=False,
            softmax=False,
            reduction="none",
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            batch=self.batch,
        )


class TverskyLoss(_OverlapLoss):
    """Tversky loss; ``alpha`` weights false positives, ``beta`` false negatives (``beta > alpha``: recall)."""

    base_name = "tversky"

    def __init__(self, *, alpha: float = 0.3, beta: float = 0.7, **kwargs: Any):
        super().__init__(**kwargs)
        self.alpha = _check_number(self.base_name, "alpha", alpha)
        self.beta = _check_number(self.base_name, "beta", beta)
        if self.alpha + self.beta == 0:
            raise ConfigError(f"loss {self.base_name!r}: alpha and beta cannot both be 0")
        self.overlap = MonaiTverskyLoss(
            include_background=True,
            to_onehot_y=False,
            softmax=False,
            alpha=self.alpha,
            beta=self.beta,
            reduction="none",
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            batch=self.batch,
        )
