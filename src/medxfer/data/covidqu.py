"""COVID-QU chest X-rays with infection or lung masks, as numpy arrays.

Layout (``data.name: covidqu``)::

    ROOT/Inf_segm/data_arrays/<category>/train_and_val/imgs.npy     N x 256 x 256 (or N x H x W x 1)
    ROOT/Inf_segm/data_arrays/<category>/train_and_val/inf_masks.npy
    ROOT/Inf_segm/data_arrays/<category>/test/{imgs.npy, inf_masks.npy}
    ROOT/Lung_segm/data_arrays/<category>/{train_and_val,test}/{imgs.npy, lung_masks.npy}

``options.masks``: ``"infection"`` (default; ``Inf_segm``, mask file ``inf_masks.npy`` or
``masks.npy``) or ``"lung"`` (``Lung_segm``, mask file ``lung_masks.npy``, ``masks.npy`` or
``inf_masks.npy``; if there is no ``Lung_segm`` folder, ``Inf_segm/.../lung_masks.npy``). The file read
is logged and kept in ``SegmentationData.meta["mask_files"]``. ``options.category``: ``"COVID-19"``
(default), another sibling folder (``"Non-COVID"``, ``"Normal"``) or a list of them.
A ``train`` (+ ``val``) pair of folders is accepted instead of ``train_and_val``; ``val`` is then the
official validation set. Otherwise validation is ``data.val_fraction`` (default 0.2) of the pool,
fixed seed. Masks may be 0/1 or 0/255 (-> 0/1); any other value is an error. Arrays are opened with
``np.load(mmap_mode="r", allow_pickle=False)``; each case is copied out as float32/int64.
Classes: 0 background, 1 infection (or lung). Spacing unknown (``None``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medxfer.data.base import Case, SegmentationData, check_case, split_train_val
from medxfer.data.folders import require_2d, require_dir, require_root, resize_case_arrays, take_options
from medxfer.errors import DataError

log = logging.getLogger(__name__)

TASK_FOLDERS = {"infection": "Inf_segm", "lung": "Lung_segm"}
MASK_FILES = {"infection": ("inf_masks.npy", "masks.npy"), "lung": ("lung_masks.npy", "masks.npy", "inf_masks.npy")}
DEFAULT_VAL_FRACTION = 0.2
_SPLIT_SEED = 0  # fixes the validation images; not a run seed


def _open_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # truncated, pickled objects, not an npy file
        raise DataError(f"{path}: cannot read npy file: {exc}") from None


def _as_nhw(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, 1, H, W)`` -> ``(N, H, W)``; images may also be ``(N, H, W, 3)``."""
    if array.ndim == 4 and array.shape[-1] == 1:
        return array[..., 0]
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim == 3 or (what == "images" and array.ndim == 4 and array.shape[-1] == 3):
        return array
    raise DataError(f"{path}: expected {what} of shape (N, H, W), got {array.shape}")


def _mask_scale(masks: np.ndarray, path: Path) -> int:
    """255 if the masks are 0/255, 1 if 0/1; anything else is an error."""
    values = np.unique(masks)
    as_set = {float(v) for v in values}
    if as_set <= {0.0, 1.0}:
        return 1
    if as_set <= {0.0, 255.0}:
        return 255
    odd = [v for v in values.tolist() if v not in (0, 1, 255)][:5]
    raise DataError(f"{path}: mask values must be 0/1 or 0/255, found {odd}")


def _find_masks(split_dir: Path, candidates: tuple[str, ...]) -> Optional[Path]:
    for name in candidates:
        if (split_dir / name).is_file():
            return split_dir / name
    return None


def _split_cases(split_dir: Path, masks_name: str, category: str, split: str, resize) -> tuple[list[Case], str]:
    images_path = split_dir / "imgs.npy"
    masks_path = split_dir / masks_name
    images = _as_nhw(_open_npy(images_path), images_path, "images")
    masks = _as_nhw(_open_npy(masks_path), masks_path, "masks")
    if masks.shape[:3] != images.shape[:3]:
        raise DataError(f"{masks_path}: masks {masks.shape} do not match the images {images_path.name} {images.shape}")
    scale = _mask_scale(masks, masks_path)
    cases = []
    for i in range(images.shape[0]):
        image = np.array(images[i], dtype=np.float32)
        image = image[None] if image.ndim == 2 else np.ascontiguousarray(np.moveaxis(image, -1, 0))
        label = (np.asarray(masks[i]) > 0).astype(np.int64) if scale == 255 else np.asarray(masks[i]).astype(np.int64)
        spacing = None
        if resize is not None:
            image, label, spacing = resize_case_arrays(image, label, resize, spacing)
        case_id = f"{category}_{split}_{i:05d}"
        case = Case(
            image=image,
            label=label,
            case_id=case_id,
            spacing=spacing,
            meta={"image_path": f"{images_path}[{i}]", "label_path": f"{masks_path}[{i}]", "group": case_id,
                  "category": category},
        )
        check_case(case, f"{images_path}[{i}]", 2, label_source=f"{masks_path}[{i}]")
        cases.append(case)
    return cases, f"0/{scale}"


def load_covidqu(config) -> SegmentationData:
    """Loader entry point for ``data.name: covidqu`` (a :class:`medxfer.config.DataConfig`)."""
    require_2d(config, "covidqu")
    opts = take_options(config.options, {"masks": "infection", "category": "COVID-19"}, "covidqu")
    task = opts["masks"]
    if task not in TASK_FOLDERS:
        raise DataError(f"dataset 'covidqu': options.masks must be 'infection' or 'lung', got {task!r}")
    categories = [opts["category"]] if isinstance(opts["category"], str) else list(opts["category"])
    root = require_root(config, "covidqu")
    task_dir, candidates = root / TASK_FOLDERS[task], MASK_FILES[task]
    if task == "lung" and not task_dir.is_dir() and (root / "Inf_segm").is_dir():
        task_dir, candidates = root / "Inf_segm", ("lung_masks.npy",)  # lung masks shipped with the infection set
    require_dir(task_dir)

    splits: dict[str, list[Case]] = {"train": [], "val": [], "test": []}
    mask_files: dict[str, Any] = {}
    official_val = False
    for category in categories:
        category_dir = require_dir(task_dir / "data_arrays" / category)
        if (category_dir / "train_and_val").is_dir():
            parts = {"train": "train_and_val", "test": "test"}
        else:
            parts = {"train": "train", "test": "test"}
            if (category_dir / "val").is_dir():
                parts["val"] = "val"
                official_val = True
        for split, folder in parts.items():
            split_dir = require_dir(category_dir / folder)
            masks_path = _find_masks(split_dir, candidates)
            if masks_path is None:
                raise DataError(f"{split_dir}: no mask file ({' or '.join(candidates)})")
            log.info("covidqu: %s masks read from %s", task, masks_path)
            cases, values = _split_cases(split_dir, masks_path.name, category, folder, config.resize)
            mask_files[str(masks_path)] = values
            splits[split].extend(cases)
    if not splits["train"]:
        raise DataError(f"{task_dir}: empty dataset: no training images")

    if official_val and config.val_fraction is None:
        train, val = splits["train"], splits["val"]
    else:
        pool = splits["train"] + splits["val"]
        val_fraction = DEFAULT_VAL_FRACTION if config.val_fraction is None else config.val_fraction
        train, val = split_train_val(pool, val_fraction, seed=_SPLIT_SEED)
    channels = {c.image.shape[0] for c in train}
    if len(channels) != 1:
        raise DataError(f"{task_dir}: categories differ in channel count {sorted(channels)}")
    return SegmentationData(
        name=f"covidqu-{task}",
        train=train,
        val=val,
        test=splits["test"],
        n_classes=2,
        class_names=["background", task],
        in_channels=channels.pop(),
        spatial_dims=2,
        meta={"root": str(root), "categories": categories, "mask_files": mask_files, "official_val": official_val},
    )


def mask_variants(config) -> list[dict]:
    """Options that make the loader read every mask set on disk (``medxfer data check`` validates them
    all): each task folder present (infection, lung) with every category folder it holds."""
    root = require_root(config, "covidqu")
    variants = []
    for task, folder in TASK_FOLDERS.items():
        task_dir = root / folder
        if task == "lung" and not task_dir.is_dir():
            task_dir = root / "Inf_segm"  # lung masks shipped with the infection set
            if not any(task_dir.glob("data_arrays/*/*/lung_masks.npy")):
                continue
        arrays = task_dir / "data_arrays"
        categories = sorted(p.name for p in arrays.iterdir() if p.is_dir()) if arrays.is_dir() else []
        if categories:
            variants.append({"masks": task, "category": categories})
    return variants
