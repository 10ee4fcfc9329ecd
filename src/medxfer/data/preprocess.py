"""Plan and preprocess a 3D dataset once, as nnU-Net's ``plan_and_preprocess`` does, into an on-disk cache.

``data.preprocess`` (a :class:`medxfer.config.PreprocessConfig`) turns it on for the ``msd`` layout (NIfTI
volumes, MSD / nnU-Net folders). The step reads the cases one at a time, twice, so a dataset never has to fit
in memory:

1. **Fingerprint** (:func:`fingerprint`): every case's spacing and shape, and per channel the intensities of
   foreground voxels (label > 0, up to ``FOREGROUND_SAMPLES`` drawn per case, seeded): mean, s.d.,
   0.5 / 99.5 percentiles, as nnU-Net's dataset fingerprint.
2. **Plan** (:func:`make_plan`): the target spacing, by default nnU-Net's: the median spacing, except that an
   anisotropic axis (its median spacing more than ``ANISOTROPY_RATIO`` times the finest other axis, and its
   median size under a third of theirs) takes the 10th percentile of its spacings instead (never finer than
   the other axes); and one normalisation per channel: ``ct`` (clip to the foreground's 0.5 / 99.5
   percentiles over the whole dataset, then z-score with its foreground mean and s.d.) for channels named CT
   in dataset.json, else ``zscore`` per image (MRI and the like), unless the config names one.
3. **Preprocess**: resample each case to the target spacing (images: cubic spline; labels: linear on each
   class's one-hot map, then argmax, as nnU-Net; an anisotropic axis separately, nearest neighbour, so
   that thick slices are not blended), normalise, and write ``<case>_image.npy`` (float32 or float16,
   read memory-mapped), ``<case>_label.npy`` (uint8) and ``<case>_fg.npy`` (sampled foreground voxel
   coordinates with their class, for patch sampling) into ``<cache_dir>/<plan key>/cases``.

The plan key hashes everything the cached arrays depend on: the dataset options, the preprocess settings,
each source file's size and modification time, and ``PLAN_VERSION``. ``plan.json`` is written last: a folder
with it is complete and is reused by every later run (nothing is read but the plan); a changed source
file gives a new key. The folder is built under a temporary name and renamed into place, so a killed step
leaves nothing that a later run would take for a cache.

Resampling keeps the field of view (voxel corners, not centres, stay in place: scipy's ``grid_mode``):
along an axis of ``n`` voxels resampled to ``m``, new voxel ``j`` sits at old voxel ``(j + 0.5) n / m - 0.5``;
:func:`resampled_affine` gives the NIfTI affine of the new grid. Prediction (``medxfer.inference``)
resamples the probabilities back to the input's grid the same way, so masks keep the input's affine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

from medxfer.data.base import IGNORE_INDEX, Case, SegmentationData
from medxfer.errors import ConfigError, DataError
from medxfer.io import atomic_write_json, stable_hash

log = logging.getLogger(__name__)

PLAN_VERSION = 1  # bump when the cached arrays change meaning: old caches are then never reused
PLAN_FILE = "plan.json"
CASES_DIR = "cases"
ANISOTROPY_RATIO = 3.0  # nnU-Net: an axis this much coarser than the others is resampled separately
FOREGROUND_SAMPLES = 10_000  # foreground voxels sampled per case (intensity statistics, patch centres)
_EPS = 1e-8


# ------------------------------------------------------------------------------------------- spacing
def anisotropic_axis(spacing: Sequence[float], ratio: float = ANISOTROPY_RATIO) -> Optional[int]:
    """The axis to resample on its own (nnU-Net's "separate z"): the coarsest, when it is more than
    ``ratio`` times the finest; else None."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.max() / spacing.min() > ratio:
        return int(np.argmax(spacing))
    return None


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                   ratio: float = ANISOTROPY_RATIO) -> list[float]:
    """nnU-Net's default target spacing: the median spacing per axis, except for an anisotropic axis
    (median spacing > ``ratio`` x the other axes' largest, and median size x ``ratio`` < the other axes'
    smallest), which takes the 10th percentile of its spacings, but never finer than the other axes."""
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    target = np.median(spacings, axis=0)
    target_size = np.median(shapes * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    if others:
        aniso_spacing = target[worst] > ratio * max(target[others])
        aniso_voxels = target_size[worst] * ratio < min(target_size[others])
        if aniso_spacing and aniso_voxels:
            value = float(np.percentile(spacings[:, worst], 10))
            if value < max(target[others]):  # never finer than the in-plane axes
                value = max(max(target[others]), value) + 1e-5
            target[worst] = value
    return [float(s) for s in target]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis that cover the same field of view at ``target`` spacing (rounded, at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def _zoom(volume: np.ndarray, shape: Sequence[int], order: int, separate_axis: Optional[int]) -> np.ndarray:
    """One float volume to ``shape`` (field of view kept); the separate axis with nearest neighbour."""
    shape = tuple(int(s) for s in shape)
    if tuple(volume.shape) == shape:
        return volume
    if separate_axis is None:
        return ndimage.zoom(volume, np.divide(shape, volume.shape), order=order, mode="nearest", grid_mode=True)
    in_plane = tuple(s if a != separate_axis else volume.shape[a] for a, s in enumerate(shape))
    if in_plane != tuple(volume.shape):
        volume = ndimage.zoom(volume, np.divide(in_plane, volume.shape), order=order, mode="nearest",
                              grid_mode=True)
    if volume.shape[separate_axis] != shape[separate_axis]:
        volume = ndimage.zoom(volume, np.divide(shape, volume.shape), order=0, mode="nearest", grid_mode=True)
    return volume


def resample_image(image: np.ndarray, shape: Sequence[int], separate_axis: Optional[int] = None,
                   order: int = 3) -> np.ndarray:
    """A ``(C, *S)`` image resampled to ``(C, *shape)`` (cubic spline by default), float32."""
    return np.stack([_zoom(np.asarray(ch, dtype=np.float32), shape, order, separate_axis)
                     for ch in image]).astype(np.float32, copy=False)


def resample_label(label: np.ndarray, shape: Sequence[int], separate_axis: Optional[int] = None) -> np.ndarray:
    """A label map resampled to ``shape``: each value's one-hot map linearly, then the most likely value
    per voxel (nnU-Net's label resampling; ``IGNORE_INDEX`` is one of the values)."""
    label = np.asarray(label)
    if tuple(label.shape) == tuple(shape):
        return label.copy()
    values = np.unique(label)
    best = np.full(tuple(shape), -1.0, dtype=np.float32)
    out = np.zeros(tuple(shape), dtype=label.dtype)
    for value in values:
        share = _zoom((label == value).astype(np.float32), shape, 1, separate_axis)
        better = share > best
        out[better] = value
        best[better] = share[better]
    return out


def resampled_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """The voxel-to-world affine of a volume resampled from ``old_shape`` to ``new_shape`` over the same
    field of view (all in the affine's own axis order): new voxel ``j`` is old voxel
    ``(j + 0.5) * old / new - 0.5`` along each axis."""
    factors = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    index_map = np.eye(len(factors) + 1)
    index_map[:-1, :-1] = np.diag(factors)
    index_map[:-1, -1] = 0.5 * factors - 0.5
    return np.asarray(affine, dtype=np.float64) @ index_map


# ---------------------------------------------------------------------------------------- intensities
def foreground_coordinates(label: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` foreground voxels of ``label`` (seeded draw), int32 ``(k, 1 + ndim)``: class, then index."""
    foreground = np.argwhere((label > 0) & (label != IGNORE_INDEX))
    if len(foreground) > n:
        foreground = foreground[np.sort(rng.choice(len(foreground), n, replace=False))]
    classes = label[tuple(foreground.T)] if len(foreground) else np.zeros(0, dtype=label.dtype)
    return np.concatenate([classes[:, None].astype(np.int64), foreground], axis=1).astype(np.int32)


def intensity_statistics(samples: np.ndarray) -> dict[str, float]:
    """Mean, s.d., 0.5 / 99.5 percentiles, min and max of one channel's foreground samples."""
    if samples.size == 0:
        return {"mean": 0.0, "sd": 1.0, "p00_5": 0.0, "p99_5": 0.0, "min": 0.0, "max": 0.0, "n": 0}
    lo, hi = np.percentile(samples, (0.5, 99.5))
    return {"mean": float(samples.mean()), "sd": float(samples.std()), "p00_5": float(lo), "p99_5": float(hi),
            "min": float(samples.min()), "max": float(samples.max()), "n": int(samples.size)}


def normalize_channels(image: np.ndarray, schemes: Sequence[str], statistics: Sequence[dict[str, float]]
                       ) -> np.ndarray:
    """Normalise a ``(C, *S)`` image per channel by the plan: ``ct`` (dataset foreground clip + z-score),
    ``zscore`` (this image's own mean and s.d.) or ``none``. Constant channels map to 0, never NaN."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, (scheme, stats) in enumerate(zip(schemes, statistics)):
        channel = np.asarray(image[c], dtype=np.float32)
        if scheme == "ct":
            channel = np.clip(channel, stats["p00_5"], stats["p99_5"])
            out[c] = (channel - stats["mean"]) / max(stats["sd"], _EPS)
        elif scheme == "zscore":
            sd = float(channel.std())
            out[c] = (channel - channel.mean()) / sd if sd > _EPS else 0.0
        elif scheme == "none":
            out[c] = channel
        else:
            raise ConfigError(f"data.preprocess.normalization: unknown scheme {scheme!r}")
    return out


def channel_schemes(setting: str, channel_names: Sequence[str], n_channels: int) -> list[str]:
    """One normalisation per channel: ``auto`` = ``ct`` for channels dataset.json names CT, else ``zscore``."""
    if setting != "auto":
        return [setting] * n_channels
    names = list(channel_names) + [""] * max(0, n_channels - len(channel_names))
    return ["ct" if str(name).strip().upper() == "CT" else "zscore" for name in names[:n_channels]]


# ------------------------------------------------------------------------------------- fingerprint, plan
def fingerprint(cases: Iterable[tuple[str, np.ndarray, np.ndarray, Sequence[float]]], seed: int = 0
                ) -> dict[str, Any]:
    """Spacings, shapes and foreground intensity statistics of ``(case_id, image, label, spacing)`` items
    (consumed one at a time)."""
    rng = np.random.default_rng(seed)
    ids, spacings, shapes, samples = [], [], [], []
    for case_id, image, label, spacing in cases:
        ids.append(case_id)
        spacings.append([float(s) for s in spacing])
        shapes.append([int(s) for s in image.shape[1:]])
        coords = foreground_coordinates(label, FOREGROUND_SAMPLES, rng)[:, 1:]
        samples.append(image[(slice(None), *coords.T)].astype(np.float64))  # (C, k)
    if not ids:
        raise DataError("preprocess: no cases to fingerprint")
    pooled = np.concatenate(samples, axis=1)
    return {"case_ids": ids, "spacings": spacings, "shapes": shapes,
            "median_spacing": np.median(np.asarray(spacings), axis=0).tolist(),
            "median_shape": np.median(np.asarray(shapes), axis=0).tolist(),
            "foreground_intensities": [intensity_statistics(channel) for channel in pooled]}


def make_plan(print_: dict[str, Any], settings: dict[str, Any], channel_names: Sequence[str]) -> dict[str, Any]:
    """The plan: target spacing, per-channel normalisation (with the statistics it needs), each case's
    resampled shape; ``settings`` = the ``data.preprocess`` section as a dict."""
    spacing = settings.get("target_spacing") or target_spacing(print_["spacings"], print_["shapes"])
    n_channels = len(print_["foreground_intensities"])
    schemes = channel_schemes(settings.get("normalization", "auto"), channel_names, n_channels)
    return {
        "version": PLAN_VERSION,
        "target_spacing": [float(s) for s in spacing],
        "normalization": schemes,
        "intensity_statistics": print_["foreground_intensities"],
        "channel_names": list(channel_names),
        "image_dtype": settings.get("image_dtype", "float32"),
        "fingerprint": print_,
    }


def preprocess_case(image: np.ndarray, label: Optional[np.ndarray], spacing: Sequence[float],
                    plan: dict[str, Any]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """One case as the plan wants it: resampled to the target spacing, normalised (float32); label too."""
    target = plan["target_spacing"]
    shape = resampled_shape(image.shape[1:], spacing, target)
    axis = anisotropic_axis(spacing)
    image = normalize_channels(resample_image(image, shape, axis), plan["normalization"],
                               plan["intensity_statistics"])
    if label is not None:
        label = resample_label(label, shape, axis)
    return image, label


def resample_to_input(probabilities: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Probabilities ``(K, *S)`` on the plan's grid back to an input grid of ``shape`` (linear, field of
    view kept; the input's anisotropic axis nearest neighbour), renormalised to sum to 1."""
    axis = anisotropic_axis(spacing)
    out = np.stack([_zoom(np.asarray(p, dtype=np.float32), shape, 1, axis) for p in probabilities])
    return out / np.clip(out.sum(0, keepdims=True), _EPS, None)


# ---------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$MEDXFER_CACHE/preprocessed``, else ``~/.cache/medxfer/preprocessed``."""
    base = os.environ.get("MEDXFER_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "medxfer") / "preprocessed"


def plan_key(config, sources: Sequence[Path]) -> str:
    """The cache key: dataset options, preprocess settings (not the cache folder), source files' size and
    modification time, and ``PLAN_VERSION``."""
    from medxfer.config import config_to_dict

    settings = config_to_dict(config.preprocess)
    settings.pop("cache_dir", None)
    files = []
    for path in sources:
        stat = Path(path).stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    return stable_hash({"version": PLAN_VERSION, "layout": config.name, "root": str(config.root),
                        "options": config.options, "preprocess": settings, "files": files}, length=16)


def _case_paths(folder: Path, case_id: str) -> dict[str, Path]:
    cases = folder / CASES_DIR
    return {"image": cases / f"{case_id}_image.npy", "label": cases / f"{case_id}_label.npy",
            "foreground": cases / f"{case_id}_fg.npy"}


def read_plan(folder: Path) -> Optional[dict[str, Any]]:
    """The plan of a complete cache folder, else None."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable preprocessing plan (%s); it is rebuilt", path, exc)
        return None
    return plan if isinstance(plan, dict) and plan.get("version") == PLAN_VERSION else None


def build_cache(config) -> tuple[Path, dict[str, Any]]:
    """Plan and preprocess the msd dataset of ``config`` into its cache folder (or reuse it); returns the
    folder and the plan. Cases are read one at a time."""
    import fcntl

    from medxfer.data.msd import read_training_case, scan_msd

    if config.name != "msd":
        raise ConfigError(f"data.preprocess: supported for the msd layout (NIfTI volumes), not {config.name!r}")
    if config.spatial_dims != 3:
        raise ConfigError("data.preprocess: needs spatial_dims: 3 (it resamples volumes)")
    if config.resize is not None:
        raise ConfigError("data.preprocess: resamples to a target spacing; leave data.resize unset")
    scan = scan_msd(config)
    sources = [p for _, images, label in scan.entries for p in (*images, label)]
    key = plan_key(config, sources)
    cache_dir = Path(config.preprocess.cache_dir or default_cache_dir())
    folder = cache_dir / key
    plan = read_plan(folder)
    if plan is not None:
        log.info("preprocessed cache %s reused", folder)
        return folder, plan
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then reuses what the first one built
        plan = read_plan(folder)
        if plan is not None:
            return folder, plan
        started = time.perf_counter()
        partial = cache_dir / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            plan = _write_cache(config, scan, partial, read_training_case)
            if folder.exists():  # an unreadable or old-version plan: replaced
                shutil.rmtree(folder)
            atomic_write_json(partial / PLAN_FILE, plan)
            os.rename(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        log.info("preprocessed %d cases into %s in %.0f s", len(plan["cases"]), folder,
                 time.perf_counter() - started)
    return folder, plan


def _write_cache(config, scan, folder: Path, read_case) -> dict[str, Any]:
    channels: list[Optional[int]] = [None]

    def cases():
        for entry in scan.entries:
            image, label, spacing = read_case(scan, entry, channels[0])
            channels[0] = image.shape[0]
            yield entry[0], image, label, spacing

    settings = config.preprocess.model_dump(mode="json")
    plan = make_plan(fingerprint(cases()), settings, scan.channel_names)
    dtype = np.float16 if plan["image_dtype"] == "float16" else np.float32
    (folder / CASES_DIR).mkdir(parents=True)
    rng = np.random.default_rng(0)
    index = []
    for case_id, image, label, spacing in cases():
        original_shape = list(image.shape[1:])
        image, label = preprocess_case(image, label, spacing, plan)
        paths = _case_paths(folder, case_id)
        np.save(paths["image"], image.astype(dtype, copy=False))
        np.save(paths["label"], label.astype(np.uint8))
        np.save(paths["foreground"], foreground_coordinates(label, FOREGROUND_SAMPLES, rng))
        index.append({"case_id": case_id, "shape": list(label.shape), "original_spacing": list(spacing),
                      "original_shape": original_shape,
                      "annotated": list(scan.annotated[case_id]) if case_id in scan.annotated else None})
    plan["cases"] = index
    plan["n_classes"] = len(scan.class_names)
    plan["class_names"] = scan.class_names
    plan["in_channels"] = channels[0]
    plan["name"] = str(scan.meta.get("name") or scan.root.name)
    return plan


def load_preprocessed(config) -> SegmentationData:
    """The dataset from its cache (built first if needed): cases hold memory-mapped arrays, and
    ``case.meta["cache"]`` the file paths that training reads patches from."""
    from medxfer.data.msd import DEFAULT_TEST_FRACTION, test_and_val_ids

    folder, plan = build_cache(config)  # checks the options (scan_msd), test_fraction among them
    ids = [c["case_id"] for c in plan["cases"]]
    test_fraction = float((config.options or {}).get("test_fraction", DEFAULT_TEST_FRACTION))
    test_ids, val_ids = test_and_val_ids(ids, test_fraction, config.val_fraction)
    train, val, test = [], [], []
    for item in plan["cases"]:
        paths = _case_paths(folder, item["case_id"])
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: missing from the preprocessed cache; delete {folder} to rebuild it")
        annotated = tuple(item["annotated"]) if item["annotated"] is not None else None
        case = Case(image=np.load(paths["image"], mmap_mode="r"), label=np.load(paths["label"], mmap_mode="r"),
                    case_id=item["case_id"], spacing=tuple(plan["target_spacing"]), annotated=annotated,
                    meta={"group": item["case_id"], "cache": {k: str(v) for k, v in paths.items()},
                          "original_spacing": item["original_spacing"], "original_shape": item["original_shape"]})
        (test if item["case_id"] in test_ids else val if item["case_id"] in val_ids else train).append(case)
    return SegmentationData(
        name=plan["name"], train=train, val=val, test=test, n_classes=plan["n_classes"],
        class_names=list(plan["class_names"]), in_channels=int(plan["in_channels"]), spatial_dims=3,
        meta={"root": str(config.root), "preprocess_cache": str(folder), "plan": plan_summary(plan)},
    )


def plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """What prediction needs from a plan (kept in run records and model manifests): spacing, normalisation."""
    return {"version": plan["version"], "target_spacing": plan["target_spacing"],
            "normalization": plan["normalization"], "intensity_statistics": plan["intensity_statistics"]}


def is_preprocessed(case: Case) -> bool:
    return "cache" in case.meta


def image_normalization(data_config) -> str:
    """What a loaded image still needs: ``none`` for preprocessed data (the cache holds it normalised by
    the plan), else ``data.normalization`` (per image)."""
    return "none" if getattr(data_config, "preprocess", None) is not None else data_config.normalization
