"""NIfTI datasets in the Medical Segmentation Decathlon (MSD) or nnU-Net layout, and the NIfTI reader
the ACDC loader shares.

Layout (``data.name: msd``; ``ROOT`` is the task folder, or its parent with ``options.task``)::

    ROOT/dataset.json
    ROOT/imagesTr/<case>.nii.gz          MSD: one file per case (multi-modal: 4D, channels last)
    ROOT/imagesTr/<case>_0000.nii.gz     nnU-Net: one file per channel (_0000, _0001, ...)
    ROOT/labelsTr/<case>.nii.gz
    ROOT/imagesTs/...                    unlabelled: for prediction only (see load_unlabelled)

``dataset.json``: ``"labels"`` as MSD ``{"0": "background", "1": "liver"}`` or nnU-Net v2
``{"background": 0, "liver": 1}`` (values 0..K-1; a v2 label named ``"ignore"`` marks unannotated
voxels and becomes ``IGNORE_INDEX``; region-based labels are not supported); channels from
``"modality"`` or ``"channel_names"``; cases from ``"training"`` (``[{"image": "./imagesTr/x.nii.gz",
"label": "./labelsTr/x.nii.gz"}]``; if the listed image is absent, ``x_0000.nii.gz``... are read) or,
without it, from the files in ``labelsTr``. ``.nii`` and ``.nii.gz`` are read; macOS ``._*`` files are
skipped. Sparse labels: ``"annotated_classes": {"case_id": [1, 3]}`` in dataset.json, or
``options.annotated_csv`` (columns ``case_id,classes``, classes like ``1;3``; path relative to ROOT;
it wins over dataset.json) give the foreground classes annotated in each listed case
(``Case.annotated``); others are fully annotated.

Splits: ``imagesTs`` has no labels, so a test split is held out from the labelled cases by case
(``options.test_fraction``, default 0.2, fixed seed), then ``data.val_fraction`` (default 0.2) of the
remaining cases is validation. 2D use (``data.spatial_dims: 2``) slices every volume along its first
axis (D); the slices of one case stay in one split.

Axis convention (ACDC too): a NIfTI voxel array indexed ``[i, j, k]`` becomes ``(D, H, W) =
(k, j, i)``, i.e. the axes reversed, as ITK/SimpleITK and nnU-Net do; no reorientation is applied, the
voxel order is the file's. ``Case.spacing`` is the header's ``zooms`` reversed the same way
(``(sz, sy, sx)``; a 2D slice keeps ``(sy, sx)``).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medxfer.data.base import (
    IGNORE_INDEX,
    Case,
    SegmentationData,
    check_case,
    check_pixel_count,
    split_keys,
    split_train_val_grouped,
)
from medxfer.data.folders import as_label_array, require_dir, require_root, resize_case_arrays, take_options
from medxfer.errors import DataError

log = logging.getLogger(__name__)

NIFTI_ENDINGS = (".nii.gz", ".nii")
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.2
_SPLIT_SEED = 0  # fixes the dataset's val split; not a run seed
_TEST_SEED = 1  # fixes the held-out test cases


# ----------------------------------------------------------------------------------------------
# NIfTI reading (shared with acdc.py)
# ----------------------------------------------------------------------------------------------


def nifti_stem(path: Path) -> str:
    name = Path(path).name
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def read_nifti(path: Path, label: bool = False) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI file as ``(array, spacing)`` in the (D, H, W) convention of this module.

    Images: float32 ``(C, D, H, W)`` (a 4D file is channels-last on disk); labels: int64 ``(D, H, W)``.
    Spacing: ``(sz, sy, sx)`` from the header zooms.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        check_pixel_count(path, [s for s in img.shape[:3]])  # the header's shape: nothing decoded yet
        data = np.asanyarray(img.dataobj)
        zooms = tuple(round(float(z), 6) for z in img.header.get_zooms())  # float32 header: 0.7 not 0.69999999
    except DataError:
        raise
    except Exception as exc:  # truncated gzip, bad header, not NIfTI: all "unreadable"
        why = str(exc).replace(str(path), path.name)
        raise DataError(f"{path}: cannot read NIfTI file: {type(exc).__name__}: {why}") from None
    if not all(np.isfinite(zooms)):
        raise DataError(f"{path}: NIfTI voxel sizes (header zooms) hold NaN or infinite values: {list(zooms)}")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:  # a single slice (i, j)
        data = data[:, :, None]
    if data.ndim not in (3, 4) or (label and data.ndim != 3):
        raise DataError(f"{path}: expected a 3D {'label ' if label else ''}volume, got shape {data.shape}")
    spacing = tuple(reversed((zooms + (1.0, 1.0, 1.0))[:3]))
    if label:
        return np.ascontiguousarray(as_label_array(data, path).transpose(2, 1, 0)), spacing
    if data.ndim == 3:
        volume = data.transpose(2, 1, 0)[None]
    else:  # (i, j, k, c) -> (c, k, j, i)
        volume = data.transpose(3, 2, 1, 0)
    if not (np.issubdtype(volume.dtype, np.number) or volume.dtype == bool):
        raise DataError(f"{path}: unsupported voxel type {volume.dtype}")
    return np.ascontiguousarray(volume, dtype=np.float32), spacing


def find_nifti(folder: Path, stem: str, endings: tuple[str, ...] = NIFTI_ENDINGS) -> Optional[Path]:
    for ending in endings:
        path = folder / f"{stem}{ending}"
        if path.is_file():
            return path
    return None


def volume_cases(
    image: np.ndarray,
    label: Optional[np.ndarray],
    spacing: tuple[float, ...],
    case_id: str,
    meta: dict[str, Any],
    spatial_dims: int,
    resize: Optional[list[int]] = None,
    annotated: Optional[tuple[int, ...]] = None,
) -> list[Case]:
    """One 3D case, or its slices along D (2D); ``meta`` is copied into each, with ``group=case_id``."""
    meta = {**meta, "group": case_id}
    if label is not None and label.shape != image.shape[1:]:  # before slicing hides it
        raise DataError(
            f"{meta.get('label_path') or case_id}: image/mask shape mismatch: mask {label.shape} vs image "
            f"{image.shape[1:]} ({meta.get('image_path', case_id)})"
        )
    if spatial_dims == 3:
        if resize is not None:
            image, label, spacing = resize_case_arrays(image, label, resize, spacing)
        return [Case(image=image, label=label, case_id=case_id, spacing=spacing, annotated=annotated, meta=meta)]
    cases = []
    for z in range(image.shape[1]):
        img = np.ascontiguousarray(image[:, z])
        lab = None if label is None else np.ascontiguousarray(label[z])
        sp: Optional[tuple[float, ...]] = tuple(spacing[1:])
        if resize is not None:
            img, lab, sp = resize_case_arrays(img, lab, resize, sp)
        cases.append(
            Case(image=img, label=lab, case_id=f"{case_id}_z{z:03d}", spacing=sp, annotated=annotated,
                 meta={**meta, "slice": z})
        )
    return cases


# ----------------------------------------------------------------------------------------------
# dataset.json
# ----------------------------------------------------------------------------------------------


def _task_root(config) -> Path:
    root = require_root(config, "msd")
    task = config.options.get("task")
    if task is None:
        return root
    exact = root / str(task)
    if exact.is_dir():
        return exact
    matches = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.startswith(f"{task}_")]
    if len(matches) != 1:
        raise DataError(f"{root}: options.task={task!r} matches {len(matches)} task folders, need exactly 1")
    return matches[0]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (an MSD / nnU-Net dataset folder has a dataset.json)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def parse_labels(labels: Any, source: Path) -> tuple[list[str], Optional[int]]:
    """Class names by value (0..K-1) and the nnU-Net "ignore" value (or None)."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{source}: 'labels' must be a non-empty mapping")
    by_value: dict[int, str] = {}
    ignore = None
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{source}: region-based label {key!r} is not supported")
        if isinstance(value, str) and str(key).lstrip("-").isdigit():  # MSD: {"1": "liver"}
            number, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"liver": 1}
            number, name = value, str(key)
        else:
            raise DataError(f"{source}: cannot read label entry {key!r}: {value!r}")
        if name == "ignore" and not isinstance(value, str):
            ignore = number
            continue
        if number in by_value:
            raise DataError(f"{source}: label value {number} is given twice")
        by_value[number] = name
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise DataError(f"{source}: label values must be 0..K-1 (K >= 2) with 0 = background, got {sorted(by_value)}")
    return [by_value[k] for k in range(len(by_value))], ignore


def _channel_count(meta: dict[str, Any], source: Path) -> Optional[int]:
    channels = meta.get("channel_names", meta.get("modality"))
    if channels is None:
        return None
    if not isinstance(channels, dict) or not channels:
        raise DataError(f"{source}: 'channel_names'/'modality' must be a non-empty mapping")
    return len(channels)


def _file_ending(meta: dict[str, Any], source: Path) -> tuple[str, ...]:
    ending = meta.get("file_ending")
    if ending is None:
        return NIFTI_ENDINGS
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{source}: file_ending {ending!r} is not supported (only NIfTI: .nii.gz, .nii)")
    return (ending,)


def _channel_files(folder: Path, case_id: str, n_channels: Optional[int], endings: tuple[str, ...]) -> list[Path]:
    """``case_0000``, ``case_0001``, ... (nnU-Net naming)."""
    files = []
    for c in range(n_channels if n_channels is not None else 10_000):
        path = find_nifti(folder, f"{case_id}_{c:04d}", endings)
        if path is None:
            if n_channels is not None or c == 0:
                raise DataError(f"{folder / f'{case_id}_{c:04d}{endings[0]}'}: file not found")
            break  # channel count unknown: read _0000, _0001, ... while they exist
        files.append(path)
    return files


def _training_entries(
    root: Path, meta: dict[str, Any], n_channels: Optional[int], source: Path
) -> list[tuple[str, list[Path], Path]]:
    """``(case_id, image files (one per channel, or one 4D file), label file)`` per labelled case."""
    endings = _file_ending(meta, source)
    entries = []
    if meta.get("training"):
        for item in meta["training"]:
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise DataError(f"{source}: each 'training' entry needs 'image' and 'label', got {item!r}")
            image_path = (root / item["image"]).resolve()
            label_path = (root / item["label"]).resolve()
            case_id = nifti_stem(label_path)
            if image_path.is_file():
                images = [image_path]
            else:  # nnU-Net v1 lists "x.nii.gz" but stores x_0000.nii.gz, ...
                images = _channel_files(image_path.parent, nifti_stem(image_path), n_channels, endings)
            entries.append((case_id, images, label_path))
    else:
        labels_dir = require_dir(root / "labelsTr")
        images_dir = require_dir(root / "imagesTr")
        for label_path in sorted(labels_dir.iterdir()):
            if label_path.name.startswith(".") or not label_path.name.endswith(endings):
                continue
            case_id = nifti_stem(label_path)
            entries.append((case_id, _channel_files(images_dir, case_id, n_channels, endings), label_path))
    ids = [e[0] for e in entries]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{source}: case {dup!r} is listed twice")
    if meta.get("numTraining") not in (None, len(entries)):
        log.warning("%s: numTraining is %s but %d labelled cases were found", source, meta["numTraining"], len(entries))
    return entries


def read_annotated(root: Path, meta: dict[str, Any], csv_option: Optional[str], n_classes: int,
                   case_ids: set[str], source: Path) -> dict[str, tuple[int, ...]]:
    """Per-case annotated foreground classes from dataset.json and/or a CSV (the CSV wins)."""
    table: dict[str, Any] = {}
    where = source
    if meta.get("annotated_classes") is not None:
        if not isinstance(meta["annotated_classes"], dict):
            raise DataError(f"{source}: 'annotated_classes' must map case ids to class lists")
        table = dict(meta["annotated_classes"])
    if csv_option is not None:
        path = Path(csv_option)
        path = path if path.is_absolute() else root / path
        if table:
            log.warning("%s: annotated classes from %s replace those in dataset.json", root, path.name)
        where, table = path, {}
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: cannot read annotated-classes CSV: {exc}") from None
        if rows and not {"case_id", "classes"} <= set(rows[0]):
            raise DataError(f"{path}: needs the columns case_id and classes, got {sorted(rows[0])}")
        for row in rows:
            text = (row.get("classes") or "").strip()
            try:
                table[row["case_id"].strip()] = [int(x) for x in text.replace(",", ";").split(";") if x.strip()]
            except ValueError:
                raise DataError(
                    f"{path}: case {row['case_id']!r}: classes must be integers like 1;3, got {text!r}"
                ) from None
    out: dict[str, tuple[int, ...]] = {}
    for case_id, classes in table.items():
        if case_id not in case_ids:
            raise DataError(f"{where}: annotated classes given for unknown case {case_id!r}")
        if not isinstance(classes, (list, tuple)) or not all(type(c) is int for c in classes):
            raise DataError(f"{where}: case {case_id!r}: annotated classes must be a list of integers")
        wrong = sorted(c for c in classes if not 0 <= c < n_classes)
        if wrong:
            raise DataError(
                f"{where}: case {case_id!r}: annotated classes {wrong} are not in the labels 0..{n_classes - 1}"
            )
        out[case_id] = tuple(sorted({int(c) for c in classes if c != 0}))
    return out


def _read_case(
    images: list[Path], label_path: Optional[Path]
) -> tuple[np.ndarray, Optional[np.ndarray], tuple[float, ...]]:
    volumes, spacing = [], None
    for path in images:
        volume, sp = read_nifti(path)
        if volumes and volume.shape[1:] != volumes[0].shape[1:]:
            raise DataError(
                f"{path}: channel shape {volume.shape[1:]} differs from {images[0].name} {volumes[0].shape[1:]}"
            )
        spacing = spacing or sp
        volumes.append(volume)
    image = volumes[0] if len(volumes) == 1 else np.concatenate(volumes, axis=0)
    label = None
    if label_path is not None:
        label, label_spacing = read_nifti(label_path, label=True)
        if not np.allclose(label_spacing, spacing, rtol=1e-3, atol=1e-4):
            log.warning("%s: label spacing %s differs from the image's %s", label_path, label_spacing, spacing)
    return image, label, spacing


# ----------------------------------------------------------------------------------------------
# Loader entry points
# ----------------------------------------------------------------------------------------------

_OPTIONS = {"task": None, "test_fraction": DEFAULT_TEST_FRACTION, "annotated_csv": None}


@dataclass
class MsdSource:
    """What the ``msd`` layout says before any volume is read: the cases (id, image files, label file),
    their labels and channels. ``scan_msd`` builds it; ``load_msd`` and the preprocessing step
    (``medxfer.data.preprocess``, one case at a time) read the cases through it."""

    root: Path
    meta: dict[str, Any]
    class_names: list[str]
    ignore_value: Optional[int]
    n_channels: Optional[int]
    entries: list[tuple[str, list[Path], Path]]
    annotated: dict[str, tuple[int, ...]]
    test_fraction: float

    @property
    def channel_names(self) -> list[str]:
        """The channel names of dataset.json in channel order ("CT", "T2", ...), [] when it lists none."""
        channels = self.meta.get("channel_names", self.meta.get("modality")) or {}
        return [str(channels[k]) for k in sorted(channels, key=lambda k: int(k) if str(k).isdigit() else 0)]


def scan_msd(config) -> MsdSource:
    """Read dataset.json and list the labelled cases; no volume is read."""
    opts = take_options(config.options, _OPTIONS, "msd")
    root = _task_root(config)
    source = root / "dataset.json"
    meta = _read_json(source)
    class_names, ignore_value = parse_labels(meta.get("labels"), source)
    n_channels = _channel_count(meta, source)
    entries = _training_entries(root, meta, n_channels, source)
    if not entries:
        raise DataError(f"{root}: empty dataset: no labelled cases in dataset.json or labelsTr")
    annotated = read_annotated(root, meta, opts["annotated_csv"], len(class_names), {e[0] for e in entries}, source)
    test_fraction = float(opts["test_fraction"])
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"dataset 'msd': options.test_fraction must be in [0, 1), got {test_fraction}")
    return MsdSource(root, meta, class_names, ignore_value, n_channels, entries, annotated, test_fraction)


def read_training_case(scan: MsdSource, entry: tuple[str, list[Path], Path], channels: Optional[int] = None
                       ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One labelled case of ``scan`` as ``(image (C, D, H, W), label (D, H, W), spacing)``; ``channels``:
    the channel count the other cases have (checked)."""
    case_id, images, label_path = entry
    image, label, spacing = _read_case(images, label_path)
    if scan.ignore_value is not None:
        label[label == scan.ignore_value] = IGNORE_INDEX
    expected = channels if channels is not None else scan.n_channels
    if expected is not None and image.shape[0] != expected:
        where = "dataset.json declares" if channels is None else "other cases have"
        raise DataError(f"{images[0]}: {image.shape[0]} channel(s), but {where} {expected}")
    return image, label, spacing


def test_and_val_ids(case_ids: list[str], test_fraction: float, val_fraction: Optional[float]
                     ) -> tuple[set[str], set[str]]:
    """The held-out test cases and the validation cases of the msd layout, by case id (whole volumes)."""
    test = split_keys(case_ids, test_fraction, _TEST_SEED)
    pool = [c for c in case_ids if c not in test]
    val = split_keys(pool, DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, _SPLIT_SEED)
    return test, val


def load_msd(config) -> SegmentationData:
    """Loader entry point for ``data.name: msd`` (a :class:`medxfer.config.DataConfig`)."""
    scan = scan_msd(config)
    n_classes = len(scan.class_names)
    cases: list[Case] = []
    channels = None
    for entry in scan.entries:
        case_id, images, label_path = entry
        image, label, spacing = read_training_case(scan, entry, channels)
        channels = image.shape[0]
        case_meta = {"image_path": str(images[0]), "label_path": str(label_path), "volume_shape": image.shape[1:]}
        for case in volume_cases(image, label, spacing, case_id, case_meta, config.spatial_dims,
                                 config.resize, scan.annotated.get(case_id)):
            check_case(case, str(images[0]), n_classes, label_source=str(label_path))
            cases.append(case)

    pool, test = split_train_val_grouped(cases, scan.test_fraction, seed=_TEST_SEED)
    val_fraction = DEFAULT_VAL_FRACTION if config.val_fraction is None else config.val_fraction
    train, val = split_train_val_grouped(pool, val_fraction, seed=_SPLIT_SEED)
    return SegmentationData(
        name=str(scan.meta.get("name") or scan.root.name),
        train=train,
        val=val,
        test=test,
        n_classes=n_classes,
        class_names=scan.class_names,
        in_channels=int(channels),
        spatial_dims=config.spatial_dims,
        meta={
            "root": str(scan.root),
            "unlabelled_images": [str(p) for p in _unlabelled_entries(scan.root, scan.meta, scan.n_channels)],
            "annotated_cases": len(scan.annotated),
            "ignore_label": scan.ignore_value,
            "channel_names": scan.channel_names,
        },
    )


def _unlabelled_entries(root: Path, meta: dict[str, Any], n_channels: Optional[int]) -> list[Path]:
    """The first image file of every imagesTs case (cheap: nothing is read)."""
    folder = root / "imagesTs"
    if not folder.is_dir():
        return []
    endings = _file_ending(meta, root / "dataset.json")
    if meta.get("test"):
        listed = [(root / (t["image"] if isinstance(t, dict) else t)).resolve() for t in meta["test"]]
        return [p if p.is_file() else folder / f"{nifti_stem(p)}_0000{endings[0]}" for p in listed]
    files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.name.endswith(endings)]
    if n_channels is not None and all(nifti_stem(p)[-5:-4] == "_" and nifti_stem(p)[-4:].isdigit() for p in files):
        return [p for p in files if nifti_stem(p).endswith("_0000")]
    return files


def load_unlabelled(config) -> list[Case]:
    """The unlabelled ``imagesTs`` cases (label ``None``), for prediction; same axes and slicing."""
    root = _task_root(config)
    meta = _read_json(root / "dataset.json")
    n_channels = _channel_count(meta, root / "dataset.json")
    endings = _file_ending(meta, root / "dataset.json")
    cases: list[Case] = []
    for first in _unlabelled_entries(root, meta, n_channels):
        stem = nifti_stem(first)
        if first.is_file() and not stem.endswith("_0000"):
            images, case_id = [first], stem
        else:
            case_id = stem[:-5] if stem.endswith("_0000") else stem
            images = _channel_files(first.parent, case_id, n_channels, endings)
        image, _, spacing = _read_case(images, None)
        for case in volume_cases(image, None, spacing, case_id, {"image_path": str(images[0]), "label_path": None},
                                 config.spatial_dims, config.resize):
            check_case(case, str(images[0]))
            cases.append(case)
    return cases
