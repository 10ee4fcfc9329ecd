"""What every loss shares: input checks, ignored-pixel masking, option checks and the base class.

Ignored pixels: their logits are replaced by 0 before anything else and they are left out of every
sum and count, so they contribute nothing and receive exactly zero gradient (even if their logits are
inf or NaN). MONAI 1.6 has an ``ignore_index`` of its own, but its FocalLoss mean divides by
``N*C*pixels`` without ignored pixels and by ``pixels`` with them, and partial labels need per-case class
masks anyway, so the masking is done here and MONAI is given already-masked tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medxfer.data.base import IGNORE_INDEX
from medxfer.errors import ConfigError, DataError
from medxfer.training.losses.partial_label import PARTIAL_PREFIX, Annotated, annotated_mask, marginal_logits


@dataclass
class LossInputs:
    """Checked, masked loss inputs; built once per call and shared by the terms of a combined loss."""

    logits: Tensor  # (N, C, *S) float32; marginal logits for partial losses; 0 at ignored pixels
    target: Tensor  # (N, *S) int64; ignored pixels set to 0 (they are masked by ``valid``)
    valid: Tensor  # (N, *S) bool; False at ignore_index pixels
    class_annotated: Tensor  # (N, C) bool; column 0 (background) always True
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[1])

    def valid_channel_mask(self) -> Tensor:
        return self.valid.unsqueeze(1).to(self.logits.dtype)

    @property
    def probabilities(self) -> Tensor:
        """Softmax probabilities, zero at ignored pixels."""
        if "probabilities" not in self._cache:
            self._cache["probabilities"] = torch.softmax(self.logits, dim=1) * self.valid_channel_mask()
        return self._cache["probabilities"]

    @property
    def one_hot(self) -> Tensor:
        """One-hot target ``(N, C, *S)`` float, zero at ignored pixels."""
        if "one_hot" not in self._cache:
            encoded = F.one_hot(self.target, self.n_classes).movedim(-1, 1).to(self.logits.dtype)
            self._cache["one_hot"] = encoded * self.valid_channel_mask()
        return self._cache["one_hot"]


def prepare_loss_inputs(
    logits: Tensor,
    target: Tensor,
    annotated: Annotated = None,
    *,
    ignore_index: Optional[int] = IGNORE_INDEX,
    partial: bool = False,
    loss_name: str = "loss",
) -> LossInputs:
    """Check shapes and label values, mask ignored pixels, and merge unannotated classes if ``partial``."""
    if not isinstance(logits, Tensor) or logits.ndim not in (4, 5) or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise DataError(f"{loss_name}: logits must be float (N, C, H, W) or (N, C, D, H, W), got {shape}")
    n_cases, n_classes = int(logits.shape[0]), int(logits.shape[1])
    if n_classes < 2:
        raise DataError(f"{loss_name}: logits need C >= 2 channels (background + classes), got {n_classes}")
    if not isinstance(target, Tensor):
        target = torch.as_tensor(np.asarray(target), device=logits.device)
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    expected = (n_cases,) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise DataError(
            f"{loss_name}: target shape {tuple(target.shape)} does not match logits (expected {expected})"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise DataError(f"{loss_name}: target must hold integer labels, got {target.dtype}")
    target = target.to(device=logits.device, dtype=torch.long)

    if ignore_index is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    else:
        valid = target != ignore_index
    out_of_range = valid & ((target < 0) | (target >= n_classes))
    if bool(out_of_range.any()):
        values = torch.unique(target[out_of_range])[:5].tolist()
        raise DataError(
            f"{loss_name}: label values {values} outside 0..{n_classes - 1} (ignore_index is {ignore_index})"
        )
    target = torch.where(valid, target, torch.zeros_like(target))

    class_annotated = annotated_mask(annotated, n_cases, n_classes, device=logits.device)
    if not partial and not bool(class_annotated.all()):
        raise ConfigError(
            f"loss {loss_name!r} was given cases with unannotated classes; use "
            f"'{PARTIAL_PREFIX}{loss_name}' so that missing annotations are not counted as background"
        )

    # Ignored pixels never reach the softmax: exactly zero gradient whatever their logits hold.
    logits = torch.where(valid.unsqueeze(1), logits.float(), 0.0)
    if partial:
        labelled = class_annotated.gather(1, target.flatten(1)).view_as(target)
        contradicting = valid & ~labelled
        if bool(contradicting.any()):
            index = contradicting.nonzero()[0]
            case, label = int(index[0]), int(target[tuple(index)])
            raise DataError(
                f"{loss_name}: case {case} has pixels labelled {label}, but class {label} is not among "
                f"its annotated classes"
            )
        logits = marginal_logits(logits, class_annotated)
    return LossInputs(logits=logits, target=target, valid=valid, class_annotated=class_annotated)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a graph) when nothing is selected."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


def _weighted_pixel_mean(per_pixel: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * loss) / sum(w)``; 0 when every pixel is ignored (torch's mean would be NaN)."""
    return (weights * per_pixel).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)

# --------------------------------------------------------------------------------------------------
# Option checks (ConfigError, naming the loss and the option)
# --------------------------------------------------------------------------------------------------


def _check_number(loss: str, option: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"loss {loss!r}: option {option} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        raise ConfigError(f"loss {loss!r}: option {option} must be {bound} {minimum:g}, got {value:g}")
    return value


def _check_class_weights(loss: str, weights: Any) -> Optional[Tensor]:
    if weights is None:
        return None
    try:
        tensor = torch.as_tensor(weights, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"loss {loss!r}: class_weights must be a list of numbers, got {weights!r}") from None
    well_formed = tensor.ndim == 1 and tensor.numel() >= 2
    if not well_formed or not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ConfigError(
            f"loss {loss!r}: class_weights must be one non-negative number per class (incl. background), "
            f"got {weights!r}"
        )
    return tensor


class SegmentationLoss(nn.Module):
    """Base class: ``forward(logits, target, annotated=None)`` prepares the inputs, ``compute`` the value."""

    base_name = "loss"

    def __init__(self, *, ignore_index: Optional[int] = IGNORE_INDEX, partial: bool = False):
        super().__init__()
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ConfigError(
                f"loss {self.base_name!r}: ignore_index must be an integer or null, got {ignore_index!r}"
            )
        self.ignore_index = ignore_index
        self.partial = bool(partial)

    @property
    def name(self) -> str:
        return (PARTIAL_PREFIX if self.partial else "") + self.base_name

    def forward(self, logits: Tensor, target: Tensor, annotated: Annotated = None) -> Tensor:
        inputs = prepare_loss_inputs(
            logits, target, annotated, ignore_index=self.ignore_index, partial=self.partial, loss_name=self.name
        )
        return self.compute(inputs)

    def compute(self, inputs: LossInputs) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, ignore_index={self.ignore_index}"
