"""Segmentation losses with ignored pixels and partial labels, and automatic loss selection.

Every loss is called as ``loss(logits, target, annotated=None)``:

- ``logits``: float ``(N, C, H, W)`` or ``(N, C, D, H, W)``, ``C >= 2`` classes including background;
  class probabilities are ``softmax(logits, dim=1)``. Losses are computed in float32.
- ``target``: integer labels ``(N, H, W)`` / ``(N, D, H, W)`` (a ``(N, 1, ...)`` channel is accepted too),
  0 = background, ``ignore_index`` (255) = unannotated pixel.
- ``annotated``: which foreground classes are annotated in each case; only the ``partial_*`` losses use it.
  ``None`` = every class in every case; a bool ``(N, C)`` tensor/array (column 0, background, is always
  treated as annotated); or a sequence of ``N`` entries, each ``None`` (all classes) or a tuple of the
  annotated foreground class indices (as in :attr:`medxfer.data.base.Case.annotated`).
  A non-partial loss given ``annotated`` with a missing class raises :class:`ConfigError` instead of
  silently counting the unannotated class as background.

Ignored pixels: their logits are replaced by 0 before anything else and they are left out of every
sum and count, so they contribute nothing and receive exactly zero gradient (even if their logits are
inf or NaN). MONAI 1.6 has an ``ignore_index`` of its own, but its FocalLoss mean divides by
``N*C*pixels`` without ignored pixels and by ``pixels`` with them, and partial labels need per-case class
masks anyway, so the masking is done here and MONAI is given already-masked tensors.

Losses (names for :func:`build_loss`; options in brackets, defaults shown):

- ``dice`` [include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True]: soft Dice per class,
  ``1 - (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` via :class:`monai.losses.DiceLoss`,
  averaged over classes. The smooth terms are tiny: they only matter when a class is absent from both
  prediction and target (then Dice = 1, loss 0) and they keep the ratio finite. ``batch=True`` sums over
  the whole batch before dividing (one Dice per class, as nnU-Net's batch Dice): more stable with small
  batches and patches that miss a class; ``batch=False`` averages per-case Dice values (MONAI's default).
- ``tversky`` [alpha=0.3, beta=0.7, include_background, smooth_nr, smooth_dr, batch]:
  ``1 - (TP + s) / (TP + alpha * FP + beta * FN + s)`` via :class:`monai.losses.TverskyLoss`;
  ``beta > alpha`` penalises false negatives more, i.e. favours recall (Salehi et al. 2017).
- ``ce`` [class_weights=None]: cross-entropy; with class weights ``w`` it is
  ``sum(w[y] * nll) / sum(w[y])`` over non-ignored pixels, exactly as ``torch.nn.functional.cross_entropy``.
- ``focal`` [gamma=2.0, class_weights=None]: softmax focal loss ``-(1 - p_y)^gamma * log(p_y)``
  (:class:`monai.losses.FocalLoss`), summed over classes and averaged over pixels with the same weighting
  as ``ce``, so ``focal`` with ``gamma=0`` equals ``ce``.
- ``dice_ce`` [lambda_dice=1, lambda_ce=1, + dice and ce options] = lambda_dice * dice + lambda_ce * ce.
- ``dice_focal`` [lambda_dice=1, lambda_focal=1, + dice and focal options].

Every loss also takes ``ignore_index`` (255; ``None`` = no ignored label).

Partial labels: the name ``partial_<base>`` (e.g. ``partial_dice_ce``) gives the marginal version of any
loss above (Shi G., Xiao L., Chen Y., Zhou S. K., "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation", Medical Image Analysis 70, 2021). In a case where class ``k`` is not
annotated, a background pixel may really be class ``k``, so the probabilities of the unannotated classes
are merged into background: the marginal background logit is ``logsumexp`` over background and the
unannotated classes, and the unannotated classes get probability 0. Cross-entropy and focal then use
``-log(p_0 + sum_unannotated p_k)`` at background pixels (marginal CE), and Dice/Tversky are computed on
the merged probabilities with the unannotated classes of a case left out of its class average (batch
Dice: a class counts only over the cases that annotate it). The loss therefore depends on the background
and unannotated logits only through their ``logsumexp``: the gradient along the background-vs-unannotated
split is zero. A pixel labelled with a class its case does not annotate is a :class:`DataError`. The
option is the name prefix (not a ``partial=True`` option) so that one string, e.g. ``train.loss`` or the
result of :func:`select_loss`, says everything.

Automatic selection: :func:`label_statistics` summarises training label maps and :func:`select_loss` maps
the statistics to a loss with the thresholds documented there.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss
from monai.losses import TverskyLoss as MonaiTverskyLoss
from torch import Tensor, nn

from medxfer.data.base import IGNORE_INDEX
from medxfer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LOSS_NAMES: tuple[str, ...] = ("dice", "ce", "dice_ce", "focal", "dice_focal", "tversky")
PARTIAL_PREFIX = "partial_"

# Unannotated classes get a logit this far below the largest logit: exp(-1e4) is exactly 0 in float32,
# so they carry no probability, while staying finite (focal's ``log p * 0`` would be NaN at -inf).
_ABSENT_LOGIT_GAP = 1e4

Annotated = Union[None, Tensor, np.ndarray, Sequence[Optional[Sequence[int]]]]


# --------------------------------------------------------------------------------------------------
# Input preparation shared by every loss
# --------------------------------------------------------------------------------------------------


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


def annotated_mask(annotated: Annotated, n_cases: int, n_classes: int, device=None) -> Tensor:
    """``annotated`` in any accepted form -> bool ``(n_cases, n_classes)``, background column True."""
    if annotated is None:
        return torch.ones(n_cases, n_classes, dtype=torch.bool, device=device)
    if isinstance(annotated, (Tensor, np.ndarray)):
        mask = torch.as_tensor(annotated, device=device)
        if tuple(mask.shape) != (n_cases, n_classes):
            raise DataError(
                f"annotated classes: expected a bool array of shape ({n_cases}, {n_classes}) "
                f"(cases, classes incl. background), got shape {tuple(mask.shape)}"
            )
        mask = mask.to(torch.bool).clone()
        mask[:, 0] = True
        return mask
    if isinstance(annotated, (str, bytes)):
        raise DataError(f"annotated classes: expected a sequence of class tuples, got {annotated!r}")
    entries = list(annotated)
    if len(entries) != n_cases:
        raise DataError(f"annotated classes: {len(entries)} entries for {n_cases} cases")
    rows = []
    for case, entry in enumerate(entries):
        row = [True] * n_classes
        if entry is not None:
            if isinstance(entry, (Tensor, np.ndarray)) and entry.dtype in (torch.bool, np.bool_):
                raise DataError(
                    "annotated classes: per-case bool rows must be stacked into one (N, C) array"
                )
            row = [False] * n_classes
            row[0] = True
            for value in entry:
                k = int(value)
                if not 0 <= k < n_classes:
                    raise DataError(
                        f"annotated classes: case {case} lists class {k}, outside 0..{n_classes - 1}"
                    )
                row[k] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool, device=device)


def marginal_logits(logits: Tensor, class_annotated: Tensor) -> Tensor:
    """Logits of the marginal distribution: unannotated classes merged into background (Shi et al. 2021).

    Channel 0 becomes ``logsumexp`` over background and the case's unannotated classes; the unannotated
    channels get a logit ``1e4`` below the largest one (probability exactly 0 in float32) with no gradient.
    ``softmax`` of the result is ``p_0 + sum_unannotated p_k`` for background and ``p_k`` for annotated
    classes, and depends on the merged logits only through their ``logsumexp``.
    """
    shape = tuple(class_annotated.shape) + (1,) * (logits.ndim - 2)
    unannotated = (~class_annotated).view(shape)
    merged = unannotated.clone()
    merged[:, 0] = True
    background = torch.logsumexp(logits.masked_fill(~merged, float("-inf")), dim=1, keepdim=True)
    absent = logits.detach().amax(dim=1, keepdim=True) - _ABSENT_LOGIT_GAP
    rest = torch.where(unannotated[:, 1:], absent, logits[:, 1:])
    return torch.cat([background, rest], dim=1)


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


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


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
        if self.batch:
            # Unannotated cases add nothing to a class's batch sums (their merged probability and
            # target are 0 there); a class no case annotates is left out of the average.
            values, counts = per_class.reshape(n_classes), inputs.class_annotated.any(dim=0)
        else:
            values, counts = per_class.reshape(n_cases, n_classes), inputs.class_annotated.clone()
        if not self.include_background:
            counts[..., 0] = False
        return _masked_mean(values, counts)


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


class WeightedSumLoss(SegmentationLoss):
    """``sum(weight * term)`` over named terms computed on the same prepared inputs.

    ``last_components`` holds the detached value of each term from the latest call (for logging).
    """

    def __init__(self, base_name: str, terms: Mapping[str, tuple[float, SegmentationLoss]], **kwargs: Any):
        self.base_name = base_name
        super().__init__(**kwargs)
        self.terms = nn.ModuleDict({key: loss for key, (_, loss) in terms.items()})
        self.term_weights = {key: _check_number(base_name, f"lambda_{key}", w) for key, (w, _) in terms.items()}
        self.last_components: dict[str, Tensor] = {}

    def compute(self, inputs: LossInputs) -> Tensor:
        total: Optional[Tensor] = None
        components: dict[str, Tensor] = {}
        for key, loss in self.terms.items():
            value = loss.compute(inputs)
            components[key] = value.detach()
            weighted = self.term_weights[key] * value
            total = weighted if total is None else total + weighted
        self.last_components = components
        assert total is not None
        return total


# --------------------------------------------------------------------------------------------------
# build_loss
# --------------------------------------------------------------------------------------------------


def _build_dice(*, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True,
                ignore_index=IGNORE_INDEX, partial=False) -> SegmentationLoss:
    return DiceLoss(include_background=include_background, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                    batch=batch, ignore_index=ignore_index, partial=partial)


def _build_tversky(*, alpha=0.3, beta=0.7, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5,
                   batch=True, ignore_index=IGNORE_INDEX, partial=False) -> SegmentationLoss:
    return TverskyLoss(alpha=alpha, beta=beta, include_background=include_background, smooth_nr=smooth_nr,
                       smooth_dr=smooth_dr, batch=batch, ignore_index=ignore_index, partial=partial)


def _build_ce(*, class_weights=None, ignore_index=IGNORE_INDEX, partial=False) -> SegmentationLoss:
    return CrossEntropyLoss(class_weights=class_weights, ignore_index=ignore_index, partial=partial)


def _build_focal(*, gamma=2.0, class_weights=None, ignore_index=IGNORE_INDEX, partial=False) -> SegmentationLoss:
    return FocalLoss(gamma=gamma, class_weights=class_weights, ignore_index=ignore_index, partial=partial)


def _build_dice_ce(*, lambda_dice=1.0, lambda_ce=1.0, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5,
                   batch=True, class_weights=None, ignore_index=IGNORE_INDEX, partial=False) -> SegmentationLoss:
    common = dict(ignore_index=ignore_index, partial=partial)
    dice = DiceLoss(include_background=include_background, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                    batch=batch, **common)
    ce = CrossEntropyLoss(class_weights=class_weights, **common)
    return WeightedSumLoss("dice_ce", {"dice": (lambda_dice, dice), "ce": (lambda_ce, ce)}, **common)


def _build_dice_focal(*, lambda_dice=1.0, lambda_focal=1.0, gamma=2.0, include_background=False, smooth_nr=1e-5,
                      smooth_dr=1e-5, batch=True, class_weights=None, ignore_index=IGNORE_INDEX,
                      partial=False) -> SegmentationLoss:
    common = dict(ignore_index=ignore_index, partial=partial)
    dice = DiceLoss(include_background=include_background, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                    batch=batch, **common)
    focal = FocalLoss(gamma=gamma, class_weights=class_weights, **common)
    return WeightedSumLoss("dice_focal", {"dice": (lambda_dice, dice), "focal": (lambda_focal, focal)}, **common)


_FACTORIES: dict[str, Callable[..., SegmentationLoss]] = {
    "dice": _build_dice,
    "ce": _build_ce,
    "dice_ce": _build_dice_ce,
    "focal": _build_focal,
    "dice_focal": _build_dice_focal,
    "tversky": _build_tversky,
}


def available_losses() -> list[str]:
    """Every name :func:`build_loss` accepts, partial variants included."""
    return list(LOSS_NAMES) + [PARTIAL_PREFIX + name for name in LOSS_NAMES]


def loss_options(name: str) -> dict[str, Any]:
    """The options of loss ``name`` and their defaults (for ``--help`` listings and docs)."""
    factory = _FACTORIES[_split_name(name)[0]]
    return {
        key: param.default
        for key, param in inspect.signature(factory).parameters.items()
        if key != "partial"
    }


def _split_name(name: Any) -> tuple[str, bool]:
    if not isinstance(name, str):
        raise ConfigError(f"loss name must be a string, got {name!r}")
    key = name.strip().lower()
    partial = key.startswith(PARTIAL_PREFIX)
    base = key[len(PARTIAL_PREFIX):] if partial else key
    if base not in _FACTORIES:
        hint = " ('auto' is resolved by select_loss before building)" if base == "auto" else ""
        raise ConfigError(
            f"unknown loss {name!r}{hint}; known: {', '.join(LOSS_NAMES)}, each also as "
            f"{PARTIAL_PREFIX}<name> for sparse annotations (e.g. {PARTIAL_PREFIX}dice_ce)"
        )
    return base, partial


def build_loss(name: str, **options: Any) -> SegmentationLoss:
    """The loss called ``name`` (see the module docstring), e.g. ``build_loss("dice_focal", gamma=3)``.

    ``partial_<name>`` builds the marginal (partial-label) version. Unknown names or options, and bad
    option values, raise :class:`ConfigError`.
    """
    base, partial = _split_name(name)
    accepted = list(loss_options(base))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        hint = f" (use the name {PARTIAL_PREFIX}{base} for partial labels)" if "partial" in unknown else ""
        raise ConfigError(
            f"loss {name!r}: unknown option(s) {', '.join(unknown)}{hint}; accepted: {', '.join(accepted)}"
        )
    return _FACTORIES[base](partial=partial, **options)


# --------------------------------------------------------------------------------------------------
# Label statistics and automatic loss selection
# --------------------------------------------------------------------------------------------------

# Thresholds of select_loss, applied in this order to the smallest foreground fraction
# (share of labelled pixels, over the cases that annotate the class) and the imbalance ratio.
TINY_FOREGROUND_FRACTION = 0.005  # below: tversky, recall-weighted (structures are missed entirely)
SMALL_FOREGROUND_FRACTION = 0.05  # below: dice_focal (Dice for overlap, focal for hard pixels)
BALANCED_IMBALANCE_RATIO = 3.0  # largest / smallest class fraction at most this: ce; above: dice_ce
TVERSKY_RECALL_OPTIONS = {"alpha": 0.3, "beta": 0.7}
FOCAL_OPTIONS = {"gamma": 2.0}


def _annotated_rows(annotated: Any, n_classes: int) -> Optional[list[np.ndarray]]:
    if annotated is None:
        return None
    if isinstance(annotated, (Tensor, np.ndarray)):
        array = np.asarray(annotated.cpu() if isinstance(annotated, Tensor) else annotated).astype(bool)
        return [row.numpy() for row in annotated_mask(array, len(array) if array.ndim else 0, n_classes)]
    entries = list(annotated)
    return [row.numpy() for row in annotated_mask(entries, len(entries), n_classes)]


def label_statistics(
    labels: Iterable[np.ndarray],
    n_classes: int,
    annotated: Annotated = None,
    *,
    ignore_index: Optional[int] = IGNORE_INDEX,
) -> dict[str, Any]:
    """Statistics of training label maps (one array per case, 2D or 3D) for :func:`select_loss`.

    ``annotated`` as for the losses (one entry per case). Pixels equal to ``ignore_index`` are not
    counted. A class's fraction is its share of labelled pixels over the cases that annotate it (a
    background pixel of a case without class ``k`` may be ``k``); ``None`` if no case annotates it.
    Returns plain JSON-able values:

    - ``n_classes``, ``n_cases``, ``n_pixels`` (labelled), ``ignored_fraction``
    - ``class_fraction`` (per class incl. background), ``foreground_fraction`` (classes 1..C-1)
    - ``min_foreground_fraction`` and ``min_foreground_class`` (lowest index on ties)
    - ``imbalance_ratio``: largest / smallest class fraction (background included); a class with no
      pixels counts as one pixel, so the ratio stays finite
    - ``cases_with_class`` (cases where the class occurs), ``annotated_cases`` (cases annotating it)
    - ``sparse_cases`` (cases missing the annotation of some foreground class) and ``sparse``
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ConfigError(
            f"label_statistics: n_classes must be an integer >= 2 (incl. background), got {n_classes!r}"
        )
    n_classes = int(n_classes)
    rows = _annotated_rows(annotated, n_classes)
    class_pixels = np.zeros(n_classes, dtype=np.int64)
    class_denominator = np.zeros(n_classes, dtype=np.int64)
    cases_with_class = np.zeros(n_classes, dtype=np.int64)
    annotated_cases = np.zeros(n_classes, dtype=np.int64)
    n_cases = n_total = n_labelled = sparse_cases = 0
    for case, label in enumerate(labels):
        array = np.asarray(label.cpu() if isinstance(label, Tensor) else label)
        if array.dtype.kind not in "iu":
            raise DataError(f"label_statistics: label map {case} must hold integers, got {array.dtype}")
        values = array[array != ignore_index] if ignore_index is not None else array.ravel()
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            bad = sorted(set(values[(values < 0) | (values >= n_classes)].tolist()))[:5]
            raise DataError(f"label_statistics: label map {case} has values {bad} outside 0..{n_classes - 1}")
        if rows is not None and case >= len(rows):
            raise DataError(f"label_statistics: more label maps than annotated entries ({len(rows)})")
        row = rows[case] if rows is not None else np.ones(n_classes, dtype=bool)
        counts = np.bincount(values.astype(np.int64, copy=False).ravel(), minlength=n_classes)
        if counts[~row].any():
            k = int(np.flatnonzero(counts * ~row)[0])
            raise DataError(
                f"label_statistics: label map {case} has pixels of class {k}, which it does not annotate"
            )
        class_pixels += counts
        class_denominator += values.size * row
        cases_with_class += counts > 0
        annotated_cases += row
        sparse_cases += int(not row.all())
        n_cases += 1
        n_total += array.size
        n_labelled += values.size
    if rows is not None and n_cases != len(rows):
        raise DataError(f"label_statistics: {n_cases} label maps but {len(rows)} annotated entries")
    if n_labelled == 0:
        raise DataError("label_statistics: no labelled pixels (no label maps, or every pixel is ignored)")

    class_fraction: list[Optional[float]] = [
        float(class_pixels[k] / class_denominator[k]) if class_denominator[k] > 0 else None
        for k in range(n_classes)
    ]
    foreground = [(fraction, k) for k, fraction in enumerate(class_fraction) if k > 0 and fraction is not None]
    min_fraction, min_class = min(foreground) if foreground else (None, None)
    known = [fraction for fraction in class_fraction if fraction is not None]
    imbalance = max(known) / max(min(known), 1.0 / n_labelled)
    return {
        "n_classes": n_classes,
        "n_cases": n_cases,
        "n_pixels": int(n_labelled),
        "ignored_fraction": float(1.0 - n_labelled / n_total),
        "class_fraction": class_fraction,
        "foreground_fraction": class_fraction[1:],
        "min_foreground_fraction": min_fraction,
        "min_foreground_class": min_class,
        "imbalance_ratio": float(imbalance),
        "cases_with_class": cases_with_class.tolist(),
        "annotated_cases": annotated_cases.tolist(),
        "sparse_cases": int(sparse_cases),
        "sparse": sparse_cases > 0,
    }


def select_loss(label_stats: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    """Pick a loss from :func:`label_statistics` output; returns ``(name, options, reason)``.

    Deterministic rules, first match wins, on the smallest foreground fraction ``f`` (lowest class index
    on ties) and the imbalance ratio ``r``:

    1. ``f < 0.005`` (TINY_FOREGROUND_FRACTION): ``tversky`` with alpha=0.3, beta=0.7: tiny structures
       are mostly missed outright, so false negatives are weighted more (recall; Salehi et al. 2017).
    2. ``f < 0.05`` (SMALL_FOREGROUND_FRACTION): ``dice_focal`` (gamma=2): Dice is insensitive to the
       background majority, focal keeps a per-pixel signal focused on hard pixels.
    3. ``r > 3`` (BALANCED_IMBALANCE_RATIO): ``dice_ce``: moderate imbalance.
    4. otherwise: ``ce``: balanced classes, plain cross-entropy is well calibrated.

    If any case misses the annotation of some foreground class (``sparse_cases > 0`` or ``sparse``),
    the name gets the ``partial_`` prefix (marginal loss). Needed keys: ``foreground_fraction`` and
    ``imbalance_ratio``; optional: ``sparse_cases``, ``sparse``, ``n_cases``. The reason is one line,
    e.g. ``"foreground fraction 0.021 (class 1) < 0.05: dice_focal"``, for the run record.
    """
    needed = ("foreground_fraction", "imbalance_ratio")
    if not isinstance(label_stats, Mapping) or any(key not in label_stats for key in needed):
        raise ConfigError(
            "select_loss: label statistics need 'foreground_fraction' and 'imbalance_ratio' (see label_statistics)"
        )
    foreground = [
        (float(fraction), k) for k, fraction in enumerate(label_stats["foreground_fraction"], start=1)
        if fraction is not None
    ]
    if not foreground:
        raise DataError("select_loss: no foreground class is annotated in any case; cannot choose a loss")
    fraction, k = min(foreground)
    ratio = float(label_stats["imbalance_ratio"])
    options: dict[str, Any]
    if fraction < TINY_FOREGROUND_FRACTION:
        name, options = "tversky", dict(TVERSKY_RECALL_OPTIONS)
        reason = (
            f"foreground fraction {fraction:.3g} (class {k}) < {TINY_FOREGROUND_FRACTION:g}: tversky "
            f"(alpha={options['alpha']:g}, beta={options['beta']:g}, weighting recall)"
        )
    elif fraction < SMALL_FOREGROUND_FRACTION:
        name, options = "dice_focal", dict(FOCAL_OPTIONS)
        reason = f"foreground fraction {fraction:.3g} (class {k}) < {SMALL_FOREGROUND_FRACTION:g}: dice_focal"
    elif ratio > BALANCED_IMBALANCE_RATIO:
        name, options = "dice_ce", {}
        reason = (
            f"foreground fraction {fraction:.3g} >= {SMALL_FOREGROUND_FRACTION:g} and imbalance ratio "
            f"{ratio:.3g} > {BALANCED_IMBALANCE_RATIO:g}: dice_ce"
        )
    else:
        name, options = "ce", {}
        reason = (
            f"foreground fraction {fraction:.3g} >= {SMALL_FOREGROUND_FRACTION:g} and imbalance ratio "
            f"{ratio:.3g} <= {BALANCED_IMBALANCE_RATIO:g}: ce"
        )
    sparse_cases = int(label_stats.get("sparse_cases", 0) or 0)
    if sparse_cases > 0 or bool(label_stats.get("sparse", False)):
        name = PARTIAL_PREFIX + name
        n_cases = label_stats.get("n_cases")
        share = f"{sparse_cases} of {n_cases} cases" if sparse_cases and n_cases else "some cases"
        reason += f"; {share} miss annotations of some classes: {name} (marginal loss)"
    log.info("loss selection: %s", reason)
    return name, options, reason


__all__ = [
    "LOSS_NAMES",
    "PARTIAL_PREFIX",
    "LossInputs",
    "SegmentationLoss",
    "DiceLoss",
    "TverskyLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "WeightedSumLoss",
    "annotated_mask",
    "marginal_logits",
    "prepare_loss_inputs",
    "available_losses",
    "loss_options",
    "build_loss",
    "label_statistics",
    "select_loss",
    "TINY_FOREGROUND_FRACTION",
    "SMALL_FOREGROUND_FRACTION",
    "BALANCED_IMBALANCE_RATIO",
]
