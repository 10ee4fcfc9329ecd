"""The types every dataset loader yields, and the deterministic splits and subsets built on them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medxfer.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255  # label value of unannotated pixels/voxels
# Largest image a file may hold, checked from its header before decoding: a 17 KB 1-bit PNG can claim
# 12000 x 12000 pixels and take 20 GB once decoded and segmented. 2D: 8192 x 8192 (config.MAX_SIDE squared;
# IDRiD, the largest layout, is 12 Mpx); volumes: 1024^3 voxels (4 GiB as float32).
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_VOLUME_VOXELS = 1024**3


def check_pixel_count(path: Any, spatial_shape: Sequence[int]) -> None:
    """Refuse, with one line naming ``path``, an image whose header claims more pixels/voxels than medxfer
    reads safely (``spatial_shape``: the spatial axes only, channels left out)."""
    count = int(np.prod([int(s) for s in spatial_shape], dtype=object))
    limit = MAX_IMAGE_PIXELS if len(spatial_shape) <= 2 else MAX_VOLUME_VOXELS
    if count > limit:
        kind = "pixels" if len(spatial_shape) <= 2 else "voxels"
        raise DataError(f"{path}: image of {' x '.join(str(int(s)) for s in spatial_shape)} = {count:,} {kind} "
                        f"exceeds the limit of {limit:,} {kind}; downsample it first")


@dataclass
class Case:
    """One image (2D slice or 3D volume) with its label map.

    image: float32 ``(C, H, W)`` or ``(C, D, H, W)``; label: int64 ``(H, W)`` / ``(D, H, W)`` with
    0 = background and ``IGNORE_INDEX`` for unannotated pixels, or ``None`` for unlabelled cases.
    spacing: physical size of a pixel/voxel along each spatial axis (mm), ``None`` if unknown.
    annotated: the foreground classes annotated in this case (sparse labels); ``None`` = all of them.
    """

    image: np.ndarray
    label: Optional[np.ndarray]
    case_id: str
    spacing: Optional[tuple[float, ...]] = None
    annotated: Optional[tuple[int, ...]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


@dataclass
class SegmentationData:
    """A dataset as medxfer sees it: train/val/test cases plus what the model needs to know."""

    name: str
    train: list[Case]
    val: list[Case]
    test: list[Case]
    n_classes: int  # including background
    class_names: list[str]
    in_channels: int
    spatial_dims: int
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "n_classes": self.n_classes,
            "class_names": self.class_names,
            "in_channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
        }


def seeded_order(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(n, seed)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, n])).permutation(n)


def subset_size(n: int | float, total: int) -> int:
    """How many of ``total`` items ``n`` asks for: a count (int) or a fraction (float in (0, 1])."""
    if isinstance(n, float):
        if not 0.0 < n <= 1.0:
            raise DataError(f"train_images: fraction must be in (0, 1], got {n}")
        count = max(1, int(round(n * total)))
    else:
        count = int(n)
    if count < 1:
        raise DataError(f"train_images: need at least 1 image, got {n}")
    if count > total:
        raise DataError(f"train_images: asked for {count} images but the training split has {total}")
    return count


def select_subset(
    cases: Sequence[Case], n: int | float | None, seed: int, mode: str = "random"
) -> list[Case]:
    """The training subset: ``n`` images (int) or a fraction (float in (0, 1]); ``None`` = all.

    For one seed the subsets are nested (the 5 images are among the 10, ...), so a data-scarcity
    curve compares like with like. ``mode="first"`` takes the first ``n`` in dataset order.
    """
    cases = list(cases)
    if n is None:
        return cases
    count = subset_size(n, len(cases))
    if mode == "first":
        return cases[:count]
    order = seeded_order(len(cases), seed)
    return [cases[i] for i in order[:count]]


def split_train_val(
    cases: Sequence[Case], val_fraction: float, seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """Split a labelled pool into train/val deterministically. The split seed is fixed per dataset
    (not per run), so that every run of a study validates on the same images."""
    cases = list(cases)
    if val_fraction <= 0 or len(cases) < 2:
        return cases, []
    n_val = max(1, int(round(val_fraction * len(cases))))
    order = seeded_order(len(cases), seed)
    val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val


def split_train_val_grouped(
    cases: Sequence[Case],
    val_fraction: float,
    seed: int = 0,
    group: Optional[Callable[[Case], str]] = None,
) -> tuple[list[Case], list[Case]]:
    """Like :func:`split_train_val`, but whole groups go to one side, so that the slices of one
    patient (or volume) are never in both splits. ``group(case)`` gives the key; default
    ``case.meta["group"]``, else ``case.case_id``. ``val_fraction`` is a share of the groups."""
    cases = list(cases)
    key = group or (lambda c: str(c.meta.get("group", c.case_id)))
    keys = list(dict.fromkeys(key(c) for c in cases))  # first-appearance order: deterministic
    if val_fraction <= 0 or len(keys) < 2:
        return cases, []
    val_keys = split_keys(keys, val_fraction, seed)
    train = [c for c in cases if key(c) not in val_keys]
    val = [c for c in cases if key(c) in val_keys]
    return train, val


def split_keys(keys: Sequence[str], val_fraction: float, seed: int = 0) -> set[str]:
    """The keys (in first-appearance order, no repeats) that :func:`split_train_val_grouped` puts on the
    validation side: a share ``val_fraction`` of them, at least one and never all."""
    keys = list(keys)
    if val_fraction <= 0 or len(keys) < 2:
        return set()
    n_val = min(len(keys) - 1, max(1, int(round(val_fraction * len(keys)))))
    order = seeded_order(len(keys), seed)
    return {keys[i] for i in order[:n_val].tolist()}


def check_case(
    case: Case, source: str, n_classes: Optional[int] = None, label_source: Optional[str] = None
) -> None:
    """Raise a one-line ``DataError`` naming ``source`` for any defect a loader must not pass on.

    ``label_source`` (default ``source``) names the mask file in messages about the label map.
    """
    image, label = case.image, case.label
    if image.ndim not in (3, 4):
        raise DataError(f"{source}: image must be (C, H, W) or (C, D, H, W), got shape {image.shape}")
    if image.size == 0:
        raise DataError(f"{source}: image is empty, shape {image.shape}")
    if not np.isfinite(image).all():
        raise DataError(f"{source}: image contains NaN or inf values")
    if case.spacing is not None:
        spacing = tuple(case.spacing)
        if len(spacing) != image.ndim - 1 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise DataError(
                f"{source}: spacing {spacing} must be {image.ndim - 1} positive numbers (one per spatial axis)"
            )
    if label is None:
        return
    if tuple(label.shape) != tuple(image.shape[1:]):
        if label_source is None or label_source == source:
            raise DataError(
                f"{source}: image/mask shape mismatch: image {tuple(image.shape[1:])} vs mask {tuple(label.shape)}"
            )
        raise DataError(
            f"{label_source}: image/mask shape mismatch: mask {tuple(label.shape)} vs image "
            f"{tuple(image.shape[1:])} ({source})"
        )
    label_source = label_source or source
    values = None
    if n_classes is not None:
        values = np.unique(label)
        bad = [int(v) for v in values if (v < 0 or v >= n_classes) and v != IGNORE_INDEX]
        if bad:
            raise DataError(
                f"{label_source}: label values {bad[:5]} outside the declared classes 0..{n_classes - 1}"
            )
    if case.annotated is not None:
        annotated = {int(c) for c in case.annotated}
        if n_classes is not None:
            wrong = sorted(c for c in annotated if not 0 < c < n_classes)
            if wrong:
                raise DataError(
                    f"{label_source}: annotated classes {wrong} are not foreground classes 1..{n_classes - 1}"
                )
        values = np.unique(label) if values is None else values
        extra = sorted(int(v) for v in values if v != 0 and v != IGNORE_INDEX and int(v) not in annotated)
        if extra:
            raise DataError(
                f"{label_source}: mask contains classes {extra} that are not in its annotated classes "
                f"{sorted(annotated)}"
            )


def size_mismatch(cases: Sequence[Case], what: str = "training images") -> Optional[str]:
    """None when all ``cases`` have one spatial shape; else one line naming the images of another shape
    than most (whole-image training batches them together, so it needs ``data.patch_size`` or ``resize``)."""
    from collections import Counter

    shapes = Counter(c.spatial_shape for c in cases)
    if len(shapes) <= 1:
        return None
    common, n_common = shapes.most_common(1)[0]
    odd = [c for c in cases if c.spatial_shape != common]
    named = ", ".join(f"{c.meta.get('image_path') or c.case_id} is {' x '.join(map(str, c.spatial_shape))}"
                      for c in odd[:3])
    more = f" (and {len(odd) - 3} more)" if len(odd) > 3 else ""
    return (f"{what} differ in size: {n_common} are {' x '.join(map(str, common))}, but {named}{more}; "
            "set data.patch_size or data.resize")


def spacing_summary(cases: Sequence[Case]) -> Optional[dict[str, list[float]]]:
    """Median, min and max pixel/voxel spacing (mm, per spatial axis) of ``cases``; None when the dataset
    does not know it. Fine-tuning records it for its training cases, and ``predict`` checks inputs against it."""
    spacings = [tuple(c.spacing) for c in cases if c.spacing is not None]
    if not spacings or len({len(s) for s in spacings}) != 1:
        return None
    array = np.asarray(spacings, dtype=np.float64)
    return {"median": np.median(array, axis=0).tolist(), "min": array.min(axis=0).tolist(),
            "max": array.max(axis=0).tolist()}


def content_fingerprint(data: SegmentationData) -> str:
    """What a dataset *is*, from its images: 12 hex digits of sha1 over every case's split, id, shape and
    pixel sum (float64, 6 significant digits), in split order. Two folders that share a name and their file
    names (coronal and axial slices of one brain) differ; the same files in another folder do not. The
    label set is not part of it: records name label sets apart on their own (``records``)."""
    import hashlib

    digest = hashlib.sha1()
    for split, cases in (("train", data.train), ("val", data.val), ("test", data.test)):
        for case in cases:
            total = float(np.asarray(case.image, dtype=np.float64).sum())
            digest.update(f"{split}|{case.case_id}|{tuple(case.image.shape)}|{total:.6g}\n".encode())
    return digest.hexdigest()[:12]
