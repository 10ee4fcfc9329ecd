"""Automatic loss selection: :func:`label_statistics` summarises training label maps and
:func:`select_loss` maps the statistics to a loss with the thresholds documented there."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from torch import Tensor

from medxfer.data.base import IGNORE_INDEX
from medxfer.errors import ConfigError, DataError
from medxfer.training.losses.partial_label import PARTIAL_PREFIX, Annotated, annotated_mask

log = logging.getLogger(__name__)

# Thresholds of select_loss (see its docstring; benchmarks/bench_losses.py measures the rules).
SMALL_FOREGROUND_FRACTION = 0.05  # smallest class fraction at least this and ...
BALANCED_IMBALANCE_RATIO = 3.0  # ... largest / smallest class fraction at most this: balanced, plain ce
RARE_CASE_SHARE = 0.5  # a class in fewer than this share of the cases annotating it is rare across cases
CLASS_WEIGHT_CAP = 10.0  # largest cross-entropy class weight (sqrt of the fraction ratio, capped)


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


def rare_case_classes(label_stats: Mapping[str, Any]) -> list[int]:
    """Foreground classes present in fewer than ``RARE_CASE_SHARE`` of the cases that annotate them."""
    present, annotated = label_stats.get("cases_with_class"), label_stats.get("annotated_cases")
    if present is None or annotated is None:
        return []
    return [k for k in range(1, len(present)) if annotated[k] > 0 and present[k] < RARE_CASE_SHARE * annotated[k]]


def class_weights_from_fractions(class_fraction: Sequence[Optional[float]]) -> list[float]:
    """Cross-entropy weights ``min(CLASS_WEIGHT_CAP, sqrt(largest fraction / fraction))``: 1 for the largest
    class (usually background), more for rarer ones; 1 for a class no case annotates (it never counts)."""
    known = [f for f in class_fraction if f is not None]
    largest = max(known)
    weights = []
    for fraction in class_fraction:
        if fraction is None:
            weights.append(1.0)
        elif fraction <= 0:
            weights.append(CLASS_WEIGHT_CAP)
        else:
            weights.append(round(min(CLASS_WEIGHT_CAP, float(np.sqrt(largest / fraction))), 3))
    return weights


def select_loss(label_stats: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    """Pick a loss from :func:`label_statistics` output; returns ``(name, options, reason)``.

    Deterministic rules, first match wins, on the smallest foreground fraction ``f`` (lowest class index
    on ties), the imbalance ratio ``r`` and the cases each class occurs in. Whenever an overlap term is
    chosen, a voxel-wise term (cross-entropy) goes with it: an overlap loss alone gives a class absent from
    the target no gradient against its false positives, and learnt "that class everywhere" in training
    (issue 22). The rules and their measured effect are in docs/losses.md (loss-selection benchmark):

    1. ``f >= 0.05`` (SMALL_FOREGROUND_FRACTION) and ``r <= 3`` (BALANCED_IMBALANCE_RATIO): ``ce``:
       balanced classes; every loss reached the same Dice, and cross-entropy is the calibrated one.
    2. some foreground class occurs in fewer than half (RARE_CASE_SHARE) of the cases that annotate it:
       ``dice_ce`` with cross-entropy ``class_weights`` ``min(10, sqrt(largest fraction / fraction))`` per
       class (CLASS_WEIGHT_CAP): most batches miss that class, so its Dice term is mostly absent and the
       cross-entropy term must carry it (focal, which down-weights the easy background, let the rare class
       spread over the background instead).
    3. otherwise (imbalanced, every class in most cases): ``dice_ce`` with equal weights, as nnU-Net:
       Dice is insensitive to the background majority, cross-entropy keeps every voxel's gradient.

    If any case misses the annotation of some foreground class (``sparse_cases > 0`` or ``sparse``),
    the name gets the ``partial_`` prefix (marginal loss). Needed keys: ``foreground_fraction`` and
    ``imbalance_ratio``; rule 2 also needs ``cases_with_class``, ``annotated_cases`` and
    ``class_fraction`` (skipped without them); optional: ``sparse_cases``, ``sparse``, ``n_cases``. The
    reason is one line, e.g. ``"class 2 in 2 of 8 cases (< 0.5 of them): dice_ce, ce class weights
    [1, 1.7, 10]"``, for the run record.
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
    rare = rare_case_classes(label_stats) if label_stats.get("class_fraction") is not None else []
    options: dict[str, Any]
    if fraction >= SMALL_FOREGROUND_FRACTION and ratio <= BALANCED_IMBALANCE_RATIO:
        name, options = "ce", {}
        reason = (
            f"foreground fraction {fraction:.3g} >= {SMALL_FOREGROUND_FRACTION:g} and imbalance ratio "
            f"{ratio:.3g} <= {BALANCED_IMBALANCE_RATIO:g}: ce"
        )
    elif rare:
        weights = class_weights_from_fractions(label_stats["class_fraction"])
        name, options = "dice_ce", {"class_weights": weights}
        present, annotated = label_stats["cases_with_class"], label_stats["annotated_cases"]
        which = ", ".join(f"class {c} in {present[c]} of {annotated[c]} cases" for c in rare)
        reason = (
            f"{which} (< {RARE_CASE_SHARE:g} of them): dice_ce, ce class weights "
            f"[{', '.join(f'{w:.3g}' for w in weights)}] (sqrt of the fraction ratio, at most {CLASS_WEIGHT_CAP:g})"
        )
    else:
        name, options = "dice_ce", {}
        reason = (
            f"foreground fraction {fraction:.3g} (class {k}), imbalance ratio {ratio:.3g}, every class in at "
            f"least {RARE_CASE_SHARE:g} of its cases: dice_ce"
        )
    sparse_cases = int(label_stats.get("sparse_cases", 0) or 0)
    if sparse_cases > 0 or bool(label_stats.get("sparse", False)):
        name = PARTIAL_PREFIX + name
        n_cases = label_stats.get("n_cases")
        share = f"{sparse_cases} of {n_cases} cases" if sparse_cases and n_cases else "some cases"
        reason += f"; {share} miss annotations of some classes: {name} (marginal loss)"
    log.info("loss selection: %s", reason)
    return name, options, reason
