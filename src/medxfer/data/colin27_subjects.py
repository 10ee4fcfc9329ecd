"""A multi-subject 3D stand-in built from real data: Colin27 T1 + AAL deformed into simulated subjects,
written in the nnU-Net v2 layout (``msd`` loader), for the offline 3D sparse-label transfer study.

What is real and what is simulated:

- **real**: the T1 intensities of one brain (Colin27, 27 averaged scans of one subject) and the hand-drawn AAL
  labels on the same grid (Debian's ``mricron-data``; BSD-3, the AAL atlas keeps its own terms: cite
  Tzourio-Mazoyer et al. 2002);
- **simulated**: every difference between subjects. Each subject is the one real brain under a random affine
  (rotation +-6 degrees per axis, scale 0.92-1.08 per axis, shift +-4 mm) and a smooth elastic displacement
  (a 6 x 6 x 5 control grid of Gaussian offsets, sd 3 mm, cubic-spline upsampled), labels warped by nearest
  neighbour; then intensity variation: gamma 0.75-1.33, a smooth multiplicative bias field (+-15%), a global
  scale 0.8-1.2 and Gaussian noise (sd 1-4% of the 99th percentile). So a model learns the anatomy of one
  brain under realistic variation, not the variation between real people.

Grid: 2 mm voxels, 40 x 56 x 64 (D x H x W as medxfer reads it: z, y, x) around the deep grey matter.
Tasks (``TASKS``): ``source`` = caudate, putamen, pallidum, thalamus, insula, each subject annotating a random
2-3 of them (``annotated_classes`` in dataset.json; the other structures are background in its mask, as in
partially labelled CT sets); ``target`` = hippocampus + amygdala (not source classes), fully annotated;
``source_t2like`` = the source classes, fully annotated, in the demo's stated T1 -> "T2-like" contrast
(``medxfer.data.colin27.t2like``) applied before the intensity variation: the second domain.

Deterministic: subject ``i`` of a task depends only on ``(seed, task, i)``. ``write_subjects`` writes a
folder once and reuses it when its ``stand_in.json`` says the same parameters.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medxfer.data.colin27 import ATLAS_FILE, IMAGE_FILE, _read_volume, _root, structure_labels, t2like
from medxfer.errors import DataError
from medxfer.io import atomic_path, atomic_write_json, stable_hash

log = logging.getLogger(__name__)

SPACING_MM = 2.0
SHAPE_XYZ = (64, 56, 40)  # output voxels along the Colin27 x (left-right), y (posterior-anterior), z axes
SOURCE_STRUCTURES = {
    "caudate": ("Caudate_L", "Caudate_R"), "putamen": ("Putamen_L", "Putamen_R"),
    "pallidum": ("Pallidum_L", "Pallidum_R"), "thalamus": ("Thalamus_L", "Thalamus_R"),
    "insula": ("Insula_L", "Insula_R"),
}
TARGET_STRUCTURES = {"hippocampus": ("Hippocampus_L", "Hippocampus_R"), "amygdala": ("Amygdala_L", "Amygdala_R")}
TASKS = {  # task -> (structures, sparse annotation, intensity domain)
    "source": (SOURCE_STRUCTURES, True, "t1"),
    "target": (TARGET_STRUCTURES, False, "t1"),
    "source_t2like": (SOURCE_STRUCTURES, False, "t2like"),
}
STAMP_FILE = "stand_in.json"
GENERATOR_VERSION = 1


def _load(folder: Path, structures: dict[str, tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    t1 = _read_volume(folder / IMAGE_FILE).astype(np.float32)
    return t1, structure_labels(folder, _read_volume(folder / ATLAS_FILE), structures, np.uint8)


def _centre(folder: Path) -> np.ndarray:
    """The centre (1 mm voxel coordinates) of the box holding every source and target structure: one grid
    for all tasks, so source and target subjects show the same field of view."""
    _, labels = _load(folder, {**SOURCE_STRUCTURES, **TARGET_STRUCTURES})
    points = np.argwhere(labels > 0)
    return (points.min(0) + points.max(0)) / 2.0


def _smooth_field(rng: np.random.Generator, sd: float, grid: tuple[int, int, int]) -> np.ndarray:
    """A smooth random field on the output grid: Gaussian values on a coarse control grid, cubic-spline
    upsampled (scipy ``zoom``, order 3)."""
    from scipy.ndimage import zoom

    control = rng.normal(0.0, sd, size=grid)
    factors = [n / g for n, g in zip(SHAPE_XYZ, grid)]
    return zoom(control, factors, order=3, mode="nearest")[: SHAPE_XYZ[0], : SHAPE_XYZ[1], : SHAPE_XYZ[2]]


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def simulate_subject(t1: np.ndarray, labels: np.ndarray, centre: np.ndarray, rng: np.random.Generator,
                     domain: str = "t1") -> tuple[np.ndarray, np.ndarray]:
    """One simulated subject on the output grid (x, y, z order): (image float32, labels uint8)."""
    from scipy.ndimage import map_coordinates

    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE_XYZ], indexing="ij"), axis=-1)
    offset_mm = (grid - (np.asarray(SHAPE_XYZ) - 1) / 2.0) * SPACING_MM  # output voxel -> mm about the centre
    matrix = _rotation(np.deg2rad(rng.uniform(-6, 6, size=3))) @ np.diag(rng.uniform(0.92, 1.08, size=3))
    shift = rng.uniform(-4, 4, size=3)
    displacement = np.stack([_smooth_field(rng, 3.0, (6, 6, 5)) for _ in range(3)], axis=-1)
    source_mm = offset_mm @ matrix.T + shift + displacement  # Colin27 is 1 mm: mm = voxels
    coords = np.moveaxis(source_mm + centre, -1, 0)
    image = map_coordinates(t2like(t1) if domain == "t2like" else t1, coords, order=1, mode="constant")
    label = map_coordinates(labels, coords, order=0, mode="constant").astype(np.uint8)
    # intensity variation (on the image scaled to its 99th percentile)
    scale = float(np.percentile(image[image > 0], 99)) if (image > 0).any() else 1.0
    x = np.clip(image / scale, 0.0, None) ** rng.uniform(0.75, 1.33)
    bias = np.exp(0.15 * _smooth_field(rng, 1.0, (3, 3, 3)))
    x = x * bias * rng.uniform(0.8, 1.2)
    x = x + rng.normal(0.0, rng.uniform(0.01, 0.04), size=x.shape)
    return x.astype(np.float32), label


def write_subjects(out: str | os.PathLike, task: str, n_subjects: int, seed: int = 0,
                   root: Optional[os.PathLike] = None) -> Path:
    """Write ``n_subjects`` simulated subjects of ``task`` (``TASKS``) as an nnU-Net v2 dataset in ``out``
    (``imagesTr/sub_NNN_0000.nii.gz``, ``labelsTr/sub_NNN.nii.gz``, ``dataset.json``, ``stand_in.json``);
    an existing folder written with the same parameters is reused."""
    import nibabel as nib

    if task not in TASKS:
        raise DataError(f"unknown stand-in task {task!r}; one of {', '.join(TASKS)}")
    if n_subjects < 2:
        raise DataError(f"a stand-in needs at least 2 subjects, got {n_subjects}")
    folder = _root(root).resolve()
    out = Path(out)
    params = {"task": task, "n_subjects": int(n_subjects), "seed": int(seed), "version": GENERATOR_VERSION,
              "shape_xyz": list(SHAPE_XYZ), "spacing_mm": SPACING_MM}
    stamp = out / STAMP_FILE
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")).get("params_hash") == stable_hash(params):
                return out
        except (OSError, ValueError):
            pass
    structures, sparse, domain = TASKS[task]
    t1, labels = _load(folder, structures)
    centre = _centre(folder)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    annotated: dict[str, list[int]] = {}
    n_classes = len(structures)
    for i in range(n_subjects):
        rng = np.random.default_rng([int(seed), list(TASKS).index(task), i])
        image, label = simulate_subject(t1, labels, centre, rng, domain)
        name = f"sub_{i:03d}"
        if sparse:
            keep = sorted(rng.choice(np.arange(1, n_classes + 1), size=int(rng.integers(2, 4)), replace=False).tolist())
            label = np.where(np.isin(label, keep), label, 0).astype(np.uint8)
            annotated[name] = keep
        for path, array in ((out / "imagesTr" / f"{name}_0000.nii.gz", image), (out / "labelsTr" / f"{name}.nii.gz", label)):
            with atomic_path(path) as tmp:  # nibabel picks the format by the name: write NAME.nii.gz, then move
                named = f"{tmp}.nii.gz"
                nib.save(nib.Nifti1Image(array, affine), named)
                os.replace(named, tmp)
    meta: dict[str, Any] = {
        "name": f"colin27-subjects-{task}",
        "description": ("Colin27 T1 + AAL labels (real, one brain) deformed into simulated subjects (affine, elastic, "
                        "intensity variation); subject variability is simulated. Built by "
                        "medxfer.data.colin27_subjects."),
        "channel_names": {"0": "T2like" if domain == "t2like" else "T1"},
        "labels": {"background": 0, **{name: k for k, name in enumerate(structures, 1)}},
        "numTraining": int(n_subjects), "file_ending": ".nii.gz",
    }
    if sparse:
        meta["annotated_classes"] = annotated
    atomic_write_json(out / "dataset.json", meta)
    atomic_write_json(stamp, {"params": params, "params_hash": stable_hash(params)})
    log.info("wrote %d simulated %s subjects to %s", n_subjects, task, out)
    return out
