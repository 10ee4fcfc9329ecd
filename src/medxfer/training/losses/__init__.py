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

Ignored pixels are left out of every sum and count and get exactly zero gradient (:mod:`.base`).

Losses (names for :func:`build_loss`; options in brackets, defaults shown):

- ``dice`` [include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True]: soft Dice per class,
  ``1 - (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` via :class:`monai.losses.DiceLoss`,
  averaged over classes. ``batch=True`` sums over the whole batch before dividing (one Dice per class, as
  nnU-Net's batch Dice): more stable with small batches and patches that miss a class; ``batch=False``
  averages per-case Dice values (MONAI's default). The smooth terms are tiny and only keep the ratio
  finite. Absent classes: a class absent from both the target and the hard prediction (argmax) of a case
  (``batch=False``), or of the whole batch (``batch=True``), is left out of the class average, so it adds
  0 (a perfect all-background prediction has loss 0). Left in, its soft Dice would be ~0 (loss ~1) however
  small its probabilities, the same as when it is predicted everywhere. A class absent from the target but
  predicted counts with loss ~1, yet gives no gradient against its false positives (Dice is 0 for any
  predicted volume): an overlap loss alone cannot undo "an absent class everywhere", which is why
  :func:`select_loss` always pairs it with a voxel-wise term (``ce`` or ``focal``).
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

Partial labels: ``partial_<base>`` (e.g. ``partial_dice_ce``) is the marginal version of any loss above
(Shi et al. 2021; :mod:`.partial_label`).

Automatic selection: :func:`label_statistics` summarises training label maps and :func:`select_loss` maps
the statistics to a loss (:mod:`.selection`).

Deep supervision (``model.options.deep_supervision``): :func:`deep_supervision_loss` sums any loss above over
the decoder's resolutions with nnU-Net's weights (:mod:`.deep_supervision`).

Modules, one way: ``partial_label`` -> ``base`` -> ``overlap``, ``pixel`` -> ``registry``; ``selection``
needs only ``partial_label``.
"""

from medxfer.training.losses.base import LossInputs, SegmentationLoss, prepare_loss_inputs
from medxfer.training.losses.deep_supervision import deep_supervision_loss, deep_supervision_weights
from medxfer.training.losses.overlap import DiceLoss, TverskyLoss
from medxfer.training.losses.partial_label import PARTIAL_PREFIX, annotated_mask, marginal_logits
from medxfer.training.losses.pixel import CrossEntropyLoss, FocalLoss
from medxfer.training.losses.registry import (
    LOSS_NAMES,
    WeightedSumLoss,
    available_losses,
    build_loss,
    loss_options,
)
from medxfer.training.losses.selection import (
    BALANCED_IMBALANCE_RATIO,
    CLASS_WEIGHT_CAP,
    RARE_CASE_SHARE,
    SMALL_FOREGROUND_FRACTION,
    class_weights_from_fractions,
    label_statistics,
    select_loss,
)

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
    "deep_supervision_loss",
    "deep_supervision_weights",
    "marginal_logits",
    "prepare_loss_inputs",
    "available_losses",
    "loss_options",
    "build_loss",
    "label_statistics",
    "select_loss",
    "class_weights_from_fractions",
    "SMALL_FOREGROUND_FRACTION",
    "BALANCED_IMBALANCE_RATIO",
    "RARE_CASE_SHARE",
    "CLASS_WEIGHT_CAP",
]
