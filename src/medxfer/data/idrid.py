"""IDRiD (Indian Diabetic Retinopathy Image Dataset), lesion segmentation part, read as distributed.

Layout (``data.name: idrid``; ``ROOT`` holds ``Segmentation/A. Segmentation``, ``A. Segmentation``,
or is that folder)::

    A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg          (b. Testing Set: test)
    A. Segmentation/2. All Segmentation Groundtruths/a. Training Set/
        1. Microaneurysms/IDRiD_01_MA.tif   2. Haemorrhages/..._HE.tif   3. Hard Exudates/..._EX.tif
        4. Soft Exudates/..._SE.tif         5. Optic Disc/..._OD.tif

Images are 2848 x 4288 RGB -> float32 ``(3, H, W)``; at full size one image with its labels takes
about 250 MB, so set ``data.resize: [H, W]`` (bilinear for images, nearest for masks) or train on
patches. ``options.lesions``: the lesion codes to segment, default ``["EX"]`` (one binary task);
several give a multi-class label map whose class k is the k-th listed lesion. Where lesions overlap,
the pixel gets the class of the smaller kind of structure, by the fixed precedence
MA > HE > EX > SE > OD (a lesion lying on the optic disc stays a lesion); the overlapping pixel count
is kept in ``Case.meta["overlap_pixels"]``. Multi-label targets are not produced. A missing mask file
means "no lesion of that class" in that image (IDRiD ships soft-exudate masks only for some images);
a missing lesion folder is an error. Masks (tif, also tiff/png) may be 0/1, 0/255 or RGB with the
lesion in one channel: a pixel is foreground if any channel is > 0. Splits: "b. Testing Set" is the
test set; validation is ``data.val_fraction`` (default 0.2) of the training images, fixed seed.
Spacing unknown (``None``).
"""

from __future__ import annotations

import logging
from pathlib import Path
import numpy as np

from medxfer.data.base import Case, SegmentationData, check_case, split_train_val
from medxfer.data.folders import (
    read_image_2d,
    read_raster,
    require_2d,
    require_dir,
    require_root,
    resize_case_arrays,
    take_options,
)
from medxfer.errors import DataError

log = logging.getLogger(__name__)

SEGMENTATION = "A. Segmentation"
IMAGES = "1. Original Images"
GROUNDTRUTHS = "2. All Segmentation Groundtruths"
SPLITS = {"train": "a. Training Set", "test": "b. Testing Set"}
LESION_FOLDERS = {
    "MA": "1. Microaneurysms",
    "HE": "2. Haemorrhages",
    "EX": "3. Hard Exudates",
    "SE": "4. Soft Exudates",
    "OD": "5. Optic Disc",
}
LESION_NAMES = {
    "MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard_exudates", "SE": "soft_exudates", "OD": "optic_disc"
}
PRECEDENCE = ("MA", "HE", "EX", "SE", "OD")  # first wins where masks overlap
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIXES = (".tif", ".tiff", ".png")
DEFAULT_VAL_FRACTION = 0.2
_SPLIT_SEED = 0  # fixes the validation images; not a run seed


def _segmentation_dir(root: Path) -> Path:
    for candidate in (root / "Segmentation" / SEGMENTATION, root / SEGMENTATION, root):
        if (candidate / IMAGES).is_dir():
            return candidate
    raise DataError(f"{root}: no '{SEGMENTATION}/{IMAGES}' folder (IDRiD segmentation layout)")


def read_lesion_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A binary ``(H, W)`` bool mask: foreground where any channel is > 0."""
    array, mode = read_raster(path)
    if array.ndim == 3:
        if mode in ("RGBA", "LA"):
            array = array[..., :-1]
        axis = -1 if (mode or array.shape[-1] <= 4) else 0
        array = (array > 0).any(axis=axis)
    if array.shape != shape:
        raise DataError(f"{path}: mask shape {array.shape} does not match the image {shape}")
    return np.asarray(array) > 0


def _mask_files(folder: Path, code: str) -> dict[str, Path]:
    """``image stem -> mask path`` for ``<stem>_<code>.<ext>`` files."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in MASK_SUFFIXES:
            continue
        suffix = f"_{code}"
        if not path.stem.upper().endswith(suffix):
            raise DataError(f"{path}: expected a mask named <image>_{code}{path.suffix}")
        found[path.stem[: -len(suffix)]] = path
    return found


def _split_cases(seg_dir: Path, split: str, lesions: list[str], resize) -> list[Case]:
    images_dir = require_dir(seg_dir / IMAGES / SPLITS[split])
    truth_dir = require_dir(seg_dir / GROUNDTRUTHS / SPLITS[split])
    images = {
        p.stem: p
        for p in sorted(images_dir.iterdir())
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    }
    masks = {code: _mask_files(require_dir(truth_dir / LESION_FOLDERS[code]), code) for code in lesions}
    for code, files in masks.items():
        for stem, path in files.items():
            if stem not in images:
                raise DataError(f"{path}: no image {stem}.jpg in {images_dir}")
    cases = []
    for stem, image_path in images.items():
        image = read_image_2d(image_path)
        shape = tuple(image.shape[1:])
        label = np.zeros(shape, dtype=np.uint8)
        painted = np.zeros(shape, dtype=bool)
        overlap = 0
        present, label_paths = [], []
        for code in PRECEDENCE:  # paint in precedence order; painted pixels are kept
            if code not in lesions or stem not in masks[code]:
                continue
            path = masks[code][stem]
            mask = read_lesion_mask(path, shape)
            overlap += int(np.count_nonzero(mask & painted))
            label[mask & ~painted] = lesions.index(code) + 1
            painted |= mask
            present.append(code)
            label_paths.append(str(path))
        label64 = label.astype(np.int64)
        spacing = None
        if resize is not None:
            image, label64, spacing = resize_case_arrays(image, label64, resize, spacing)
        case = Case(
            image=image,
            label=label64,
            case_id=stem,
            spacing=spacing,
            meta={
                "image_path": str(image_path),
                "label_path": label_paths[0] if label_paths else None,
                "mask_paths": label_paths,
                "lesions_with_mask": present,
                "overlap_pixels": overlap,
                "group": stem,
            },
        )
        check_case(case, str(image_path), len(lesions) + 1)
        cases.append(case)
    if not cases:
        raise DataError(f"{images_dir}: empty dataset: no images ({', '.join(IMAGE_SUFFIXES)})")
    return cases


def load_idrid(config) -> SegmentationData:
    """Loader entry point for ``data.name: idrid`` (a :class:`medxfer.config.DataConfig`)."""
    require_2d(config, "idrid")
    opts = take_options(config.options, {"lesions": ["EX"]}, "idrid")
    lesions = [opts["lesions"]] if isinstance(opts["lesions"], str) else list(opts["lesions"])
    lesions = [str(x).upper() for x in lesions]
    if not lesions or any(x not in LESION_FOLDERS for x in lesions) or len(set(lesions)) != len(lesions):
        raise DataError(
            f"dataset 'idrid': options.lesions must be distinct codes from {list(LESION_FOLDERS)}, got {lesions}"
        )
    seg_dir = _segmentation_dir(require_root(config, "idrid"))
    if config.resize is None:
        log.warning("idrid: reading full-size images (about 250 MB each in memory); consider data.resize")
    pool = _split_cases(seg_dir, "train", lesions, config.resize)
    test = _split_cases(seg_dir, "test", lesions, config.resize)
    overlaps = sum(c.meta["overlap_pixels"] for c in pool + test)
    if overlaps:
        log.info("idrid: %d pixels lie in more than one selected lesion mask (precedence %s)", overlaps, PRECEDENCE)
    val_fraction = DEFAULT_VAL_FRACTION if config.val_fraction is None else config.val_fraction
    train, val = split_train_val(pool, val_fraction, seed=_SPLIT_SEED)
    return SegmentationData(
        name="idrid-" + "-".join(lesions),
        train=train,
        val=val,
        test=test,
        n_classes=len(lesions) + 1,
        class_names=["background"] + [LESION_NAMES[x] for x in lesions],
        in_channels=train[0].image.shape[0] if train else pool[0].image.shape[0],
        spatial_dims=2,
        meta={"root": str(seg_dir), "lesions": lesions, "precedence": list(PRECEDENCE), "overlap_pixels": overlaps},
    )


def mask_variants(config) -> list[dict]:
    """Options that make the loader read every lesion folder on disk (``medxfer data check`` validates
    them all, whatever ``options.lesions`` says): one variant with every lesion present in both splits."""
    seg_dir = _segmentation_dir(require_root(config, "idrid"))
    present = [code for code in PRECEDENCE
               if all((seg_dir / GROUNDTRUTHS / SPLITS[split] / LESION_FOLDERS[code]).is_dir() for split in SPLITS)]
    return [{"lesions": present}] if present else []
