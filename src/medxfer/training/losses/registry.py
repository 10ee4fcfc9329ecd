"""Loss names -> losses: the weighted sums (``dice_ce``, ``dice_focal``) and :func:`build_loss`."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from medxfer.data.base import IGNORE_INDEX
from medxfer.errors import ConfigError
from medxfer.training.losses.base import LossInputs, SegmentationLoss, _check_number
from medxfer.training.losses.overlap import DiceLoss, TverskyLoss
from medxfer.training.losses.partial_label import PARTIAL_PREFIX
from medxfer.training.losses.pixel import CrossEntropyLoss, FocalLoss

LOSS_NAMES: tuple[str, ...] = ("dice", "ce", "dice_ce", "focal", "dice_focal", "tversky")


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
