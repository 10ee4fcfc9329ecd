"""Colin27 brain MRI with AAL structures, as 2D axial slices: the real target of ``medxfer demo``.

Source: the Debian package ``mricron-data`` (``apt-get install mricron-data``; BSD-3, the AAL atlas keeps its
own terms: cite Tzourio-Mazoyer et al. 2002), which installs ``/usr/share/mricron/templates/ch2.nii.gz``
(Colin27: one subject's T1, 27 averaged scans, 1 mm) and ``aal.nii.gz`` (116 hand-drawn regions on the same
grid; names in ``aal.nii.txt``). Nothing is downloaded.

Task: segment three deep grey-matter structures, left and right merged: caudate, putamen, thalamus
(4 classes with background). Each image is one axial slice, cropped to the 96 x 96 mm square around the
structures and resampled to 64 x 64 (1.5 mm pixels; anterior up, patient left on the left).

Splits interleave held-out slices with the training slices and keep them apart: the slices z = 55..101 run in
periods of 5 (train, train, gap, held out, gap), so every held-out slice lies between two training pairs, 2 mm
from the nearest (never a neighbour), and no test slice asks for extrapolation beyond the training range. The
range reaches 3-4 mm past the structures at both ends, so some slices hold no structure and others only one or
two: a model is tested (and selected) on predicting nothing where nothing is. Held-out slices are test, test,
validation, test, test, validation, test, validation, test from bottom to top (the validation slices show caudate
+ putamen, all three, and caudate alone): 20 training, 3 validation and 6 test slices (2 of the test slices and 4
of the training slices are empty).

Two intensity domains of the same anatomy and labels (``options.domain``):
- ``t1``: the real T1 image.
- ``t2like``: a fixed, stated transform of it that mimics a T2-weighted contrast: inside the head (voxels
  above 10% of the maximum, holes filled), intensities
  scaled to [0, 1] by the 99th percentile are inverted (``1 - x``: CSF bright, white matter dark), raised to the
  power 1.5, multiplied by a smooth bias field ``exp(0.25 cos(2 pi i / 181) cos(2 pi j / 217))`` (i, j: voxel
  indices), plus Gaussian noise (sd 0.02, fixed seed). The head mask and the percentile come from the slices
  used (with an 8-slice margin). The geometry and labels are untouched.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medxfer.data.base import Case, SegmentationData
from medxfer.errors import DataError

TEMPLATES = Path("/usr/share/mricron/templates")
IMAGE_FILE = "ch2.nii.gz"
ATLAS_FILE = "aal.nii.gz"
NAMES_FILE = "aal.nii.txt"
INSTALL_HINT = "install the Debian package mricron-data (apt-get install mricron-data)"

STRUCTURES: dict[str, tuple[str, str]] = {
    "caudate": ("Caudate_L", "Caudate_R"),
    "putamen": ("Putamen_L", "Putamen_R"),
    "thalamus": ("Thalamus_L", "Thalamus_R"),
}
DOMAINS = ("t1", "t2like")
CROP_X = (43, 139)  # voxel ranges of the 96 x 96 mm crop (x: left-right, y: posterior-anterior)
CROP_Y = (76, 172)
SIZE = 64  # pixels per side after resampling (1.5 mm)
Z_RANGE = (55, 102)  # axial slices used (z = 55..101)
PERIOD = ("train", "train", None, "held", None)  # role by (z - Z_RANGE[0]) % 5; None = a gap slice
# Role of each held-out slice, bottom to top (z = 58, 63, ..., 98)
HELD_OUT_ROLES = ("test", "test", "val", "test", "test", "val", "test", "val", "test")
_NOISE_SEED = 27  # fixes the t2like noise; not a run seed
_SLAB_MARGIN = 8  # slices around Z_RANGE that the t2like head mask and percentile see


def _root(root: Optional[os.PathLike]) -> Path:
    folder = Path(root) if root is not None else TEMPLATES
    missing = [name for name in (IMAGE_FILE, ATLAS_FILE, NAMES_FILE) if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder / missing[0]}: Colin27/AAL file not found; {INSTALL_HINT}")
    return folder


def read_region_names(path: Path) -> dict[str, int]:
    """``aal.nii.txt`` ("<value> <name> <code>" per line) -> name -> label value in ``aal.nii.gz``."""
    names: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable region names ({type(exc).__name__}: {exc})") from None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise DataError(f"{path}: line {number}: expected '<value> <name> ...', got {line.strip()!r}")
        names[parts[1]] = int(parts[0])
    return names


def _read_volume(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: unreadable NIfTI file ({type(exc).__name__}: {exc})") from None


@lru_cache(maxsize=2)
def _volumes(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The T1 volume (float32) and the structure label volume (int64, 0..3), both 181 x 217 x 181."""
    t1 = _read_volume(folder / IMAGE_FILE).astype(np.float32)
    atlas = _read_volume(folder / ATLAS_FILE)
    if t1.shape != atlas.shape:
        raise DataError(f"{folder / ATLAS_FILE}: shape {atlas.shape} differs from {IMAGE_FILE} {t1.shape}")
    return t1, structure_labels(folder, atlas, STRUCTURES, np.int64)


def structure_labels(folder: Path, atlas: np.ndarray, structures: dict[str, tuple[str, str]],
                     dtype: type) -> np.ndarray:
    """Label k for the AAL regions of the k-th structure (0 elsewhere); an unlisted region is a DataError."""
    names = read_region_names(folder / NAMES_FILE)
    labels = np.zeros(atlas.shape, dtype=dtype)
    for k, regions in enumerate(structures.values(), 1):
        for region in regions:
            if region not in names:
                raise DataError(f"{folder / NAMES_FILE}: region {region!r} not listed")
            labels[atlas == names[region]] = k
    return labels


def t2like(t1: np.ndarray) -> np.ndarray:
    """The stated T1 -> "T2-like" transform (see the module docstring) of a volume or slab; deterministic."""
    from scipy.ndimage import binary_fill_holes

    head = binary_fill_holes(t1 > 0.1 * float(t1.max()))
    scale = float(np.percentile(t1[head], 99))
    x = np.clip(t1 / scale, 0.0, 1.0)
    inverted = np.where(head, (1.0 - x) ** 1.5, 0.0)
    i = np.arange(t1.shape[0], dtype=np.float32)[:, None, None]
    j = np.arange(t1.shape[1], dtype=np.float32)[None, :, None]
    bias = np.exp(0.25 * np.cos(2 * np.pi * i / t1.shape[0]) * np.cos(2 * np.pi * j / t1.shape[1]))
    noise = np.random.default_rng(_NOISE_SEED).normal(0.0, 0.02, size=t1.shape)
    return np.clip(inverted * bias + noise, 0.0, None).astype(np.float32)


def split_of_slice(z: int) -> Optional[str]:
    """"train", "val", "test", or None for a gap slice or a slice outside ``Z_RANGE``."""
    if not Z_RANGE[0] <= z < Z_RANGE[1]:
        return None
    period, position = divmod(z - Z_RANGE[0], len(PERIOD))
    role = PERIOD[position]
    return HELD_OUT_ROLES[period] if role == "held" else role


def _slice_2d(volume: np.ndarray, z: int, order: int) -> np.ndarray:
    from skimage.transform import resize

    crop = volume[CROP_X[0]:CROP_X[1], CROP_Y[0]:CROP_Y[1], z]
    crop = np.flipud(crop.T)  # rows: anterior at the top; columns: patient left -> right
    if order == 0:
        return resize(crop, (SIZE, SIZE), order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)
    return resize(crop, (SIZE, SIZE), order=1, preserve_range=True, anti_aliasing=True).astype(np.float32)


@lru_cache(maxsize=4)
def _cases(folder: Path, domain: str) -> tuple[tuple[str, Case], ...]:
    t1, labels = _volumes(folder)
    z0 = max(0, Z_RANGE[0] - _SLAB_MARGIN)
    slab = t1[:, :, z0:Z_RANGE[1] + _SLAB_MARGIN]
    image = np.zeros_like(t1)
    image[:, :, z0:z0 + slab.shape[2]] = slab if domain == "t1" else t2like(slab)
    spacing = (96.0 / SIZE, 96.0 / SIZE)
    out = []
    for z in range(*Z_RANGE):
        split = split_of_slice(z)
        if split is None:
            continue
        out.append((split, Case(image=_slice_2d(image, z, 1)[None], label=_slice_2d(labels, z, 0),
                                case_id=f"colin27-{domain}-z{z:03d}", spacing=spacing,
                                meta={"domain": domain, "z": z})))
    return tuple(out)


def axial_slices(structures: dict[str, tuple[str, ...]], z_values: Sequence[int],
                 root: Optional[os.PathLike] = None) -> list[Case]:
    """T1 axial slices ``z_values`` (the demo's crop and 64 x 64 resampling) labelled k = 1, 2, ... with the AAL
    regions of the k-th entry of ``structures`` (name -> AAL region names, e.g. ``{"amygdala": ("Amygdala_L",
    "Amygdala_R")}``); for tasks on other structures than the demo's (the loss benchmark's amygdala)."""
    folder = _root(root).resolve()
    t1 = _read_volume(folder / IMAGE_FILE).astype(np.float32)
    atlas = _read_volume(folder / ATLAS_FILE)
    if t1.shape != atlas.shape:
        raise DataError(f"{folder / ATLAS_FILE}: shape {atlas.shape} differs from {IMAGE_FILE} {t1.shape}")
    outside = [int(z) for z in z_values if not 0 <= int(z) < t1.shape[2]]
    if outside:
        raise DataError(f"{folder / IMAGE_FILE}: axial slice z={outside[0]} outside 0..{t1.shape[2] - 1}")
    labels = structure_labels(folder, atlas, structures, np.int64)
    return [Case(image=_slice_2d(t1, int(z), 1)[None], label=_slice_2d(labels, int(z), 0),
                 case_id=f"colin27-t1-z{int(z):03d}", spacing=(96.0 / SIZE, 96.0 / SIZE),
                 meta={"domain": "t1", "z": int(z), "structures": list(structures)}) for z in z_values]


def load_colin27(options: dict[str, Any] | None = None, root: Optional[os.PathLike] = None) -> SegmentationData:
    """The slices of one domain (``options={"domain": "t1"|"t2like"}``, default "t1")."""
    options = dict(options or {})
    domain = str(options.pop("domain", "t1"))
    if options:
        raise DataError(f"colin27 data: unknown option(s) {sorted(options)}; it takes only 'domain'")
    if domain not in DOMAINS:
        raise DataError(f"colin27 data: domain must be one of {DOMAINS}, got {domain!r}")
    folder = _root(root).resolve()
    split: dict[str, list[Case]] = {"train": [], "val": [], "test": []}
    for role, case in _cases(folder, domain):
        split[role].append(Case(image=case.image.copy(), label=case.label.copy(), case_id=case.case_id,
                                spacing=case.spacing, meta=dict(case.meta)))
    return SegmentationData(
        name=f"colin27-{domain}", train=split["train"], val=split["val"], test=split["test"],
        n_classes=len(STRUCTURES) + 1, class_names=["background", *STRUCTURES], in_channels=1, spatial_dims=2,
        meta={"domain": domain, "source": f"{folder / IMAGE_FILE} + {folder / ATLAS_FILE} (mricron-data)",
              "slice_orientation": "axial"},
    )


def load_colin27_config(config) -> SegmentationData:
    """Loader entry point for ``data.name: colin27`` (a :class:`medxfer.config.DataConfig`)."""
    if config.val_fraction is not None:
        raise DataError("colin27 data: val_fraction is not supported (the validation slices are fixed blocks)")
    return load_colin27(config.options, config.root)
