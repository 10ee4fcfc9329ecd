"""ACDC (Automated Cardiac Diagnosis Challenge) cine-MRI, read as distributed.

Layout (``data.name: acdc``; ``ROOT`` holds ``training/`` and ``testing/``, or ``database/`` with them)::

    ROOT/training/patient001/Info.cfg                    ED: 1 / ES: 12 / Group: DCM / Height / NbFrame / Weight
    ROOT/training/patient001/patient001_frame01.nii.gz   (.nii also read)
    ROOT/training/patient001/patient001_frame01_gt.nii.gz
    ROOT/training/patient001/patient001_4d.nii.gz        ignored
    ROOT/testing/patient101/...                          same; without _gt files the test cases are unlabelled

Classes: 0 background, 1 RV, 2 myocardium, 3 LV. ``options.frames``: which phases, default
``["ED", "ES"]`` (the frames with ground truth). 3D (``data.spatial_dims: 3``): one case per frame,
``(1, D, H, W)`` with D the slice axis; 2D: one case per slice of those frames, ``(1, H, W)``.
Axes follow :mod:`medxfer.data.msd`: NIfTI ``[i, j, k]`` -> ``(D, H, W) = (k, j, i)``, spacing
``(sz, sy, sx)`` from the header zooms (2D slices keep the in-plane ``(sy, sx)``).
Splits: ``testing/`` is the test set; validation is ``data.val_fraction`` (default 0.2) of the
training patients (fixed seed), so the slices/frames of one patient are never in two splits.
``Case.meta``: patient, phase, frame, pathology (Info.cfg Group), height, weight, nb_frames.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

from medxfer.data.base import Case, SegmentationData, check_case, split_train_val_grouped
from medxfer.data.folders import require_dir, require_root, take_options
from medxfer.data.msd import find_nifti, read_nifti, volume_cases
from medxfer.errors import DataError

log = logging.getLogger(__name__)

CLASS_NAMES = ["background", "RV", "myocardium", "LV"]
PHASES = ("ED", "ES")
DEFAULT_VAL_FRACTION = 0.2
_SPLIT_SEED = 0  # fixes which patients are validation; not a run seed
_PATIENT = re.compile(r"^patient\d+$")


def read_info(path: Path) -> dict[str, Any]:
    """``Info.cfg`` as a dict; ED and ES must be frame numbers."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (every ACDC patient folder has an Info.cfg)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    info: dict[str, Any] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    for phase in PHASES:
        try:
            info[phase] = int(float(info[phase]))
        except (KeyError, ValueError):
            raise DataError(f"{path}: needs a line '{phase}: <frame number>'") from None
    return info


def _patient_cases(folder: Path, frames: list[str], spatial_dims: int, resize, labelled: bool) -> list[Case]:
    patient = folder.name
    info = read_info(folder / "Info.cfg")
    cases: list[Case] = []
    for phase in frames:
        frame = info[phase]
        stem = f"{patient}_frame{frame:02d}"
        image_path = find_nifti(folder, stem)
        if image_path is None:
            raise DataError(f"{folder / (stem + '.nii.gz')}: file not found ({phase} frame of Info.cfg)")
        label_path = find_nifti(folder, stem + "_gt")
        if label_path is None and labelled:
            raise DataError(f"{folder / (stem + '_gt.nii.gz')}: file not found (ground truth of the {phase} frame)")
        image, spacing = read_nifti(image_path)
        label = None
        if label_path is not None:
            label, _ = read_nifti(label_path, label=True)
        meta = {
            "patient": patient,
            "phase": phase,
            "frame": frame,
            "pathology": info.get("Group"),
            "height": _number(info.get("Height")),
            "weight": _number(info.get("Weight")),
            "nb_frames": _number(info.get("NbFrame")),
            "image_path": str(image_path),
            "label_path": str(label_path) if label_path else None,
        }
        for case in volume_cases(image, label, spacing, f"{patient}_{phase}", meta, spatial_dims, resize):
            case.meta["group"] = patient  # split by patient, not by frame
            check_case(case, str(image_path), len(CLASS_NAMES), label_source=str(label_path) if label_path else None)
            cases.append(case)
    return cases


def _number(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _patients(folder: Path) -> list[Path]:
    return [p for p in sorted(require_dir(folder).iterdir()) if p.is_dir() and _PATIENT.match(p.name)]


def load_acdc(config) -> SegmentationData:
    """Loader entry point for ``data.name: acdc`` (a :class:`medxfer.config.DataConfig`)."""
    opts = take_options(config.options, {"frames": list(PHASES)}, "acdc")
    frames = [opts["frames"]] if isinstance(opts["frames"], str) else list(opts["frames"])
    if not frames or any(f not in PHASES for f in frames) or len(set(frames)) != len(frames):
        raise DataError(f"dataset 'acdc': options.frames must be a non-empty subset of {list(PHASES)}, got {frames}")
    root = require_root(config, "acdc")
    if not (root / "training").is_dir() and (root / "database" / "training").is_dir():
        root = root / "database"  # the 2023 re-release nests the folders one level deeper
    train_patients = _patients(root / "training")
    if not train_patients:
        raise DataError(f"{root / 'training'}: empty dataset: no patientNNN folders")
    test_patients = _patients(root / "testing")

    pool = [c for p in train_patients for c in _patient_cases(p, frames, config.spatial_dims, config.resize, True)]
    test = [c for p in test_patients for c in _patient_cases(p, frames, config.spatial_dims, config.resize, False)]
    unlabelled = sum(c.label is None for c in test)
    if unlabelled:
        log.warning("%s: %d test case(s) have no _gt file and are unlabelled", root / "testing", unlabelled)
    val_fraction = DEFAULT_VAL_FRACTION if config.val_fraction is None else config.val_fraction
    train, val = split_train_val_grouped(pool, val_fraction, seed=_SPLIT_SEED)
    return SegmentationData(
        name="acdc",
        train=train,
        val=val,
        test=test,
        n_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        in_channels=1,
        spatial_dims=config.spatial_dims,
        meta={
            "root": str(root),
            "frames": frames,
            "axes": "(D, H, W) = NIfTI (k, j, i); spacing (sz, sy, sx)",
            "val_patients": sorted({c.meta["patient"] for c in val}),
        },
    )


def mask_variants(config) -> list[dict]:
    """Options that make the loader read every ground-truth file (``medxfer data check``): both phases,
    when ``options.frames`` leaves one out (the default reads both)."""
    frames = config.options.get("frames", list(PHASES))
    frames = [frames] if isinstance(frames, str) else list(frames)
    return [] if set(frames) >= set(PHASES) else [{"frames": list(PHASES)}]
