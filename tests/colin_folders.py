"""Small real 2D datasets in the ``folders`` layout, cut from Colin27 + AAL (Debian's mricron-data): the
hippocampus (class 1) and the amygdala (class 2), left and right merged, in coronal or axial slices,
downsampled 3x (3 mm pixels, 32 x 32). Tests that need real images and hand-drawn labels build them here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medxfer.data.colin27 import ATLAS_FILE, IMAGE_FILE, NAMES_FILE, TEMPLATES, _read_volume, read_region_names

CLASS_NAMES = ["background", "hippocampus", "amygdala"]
REGIONS = {1: ("Hippocampus_L", "Hippocampus_R"), 2: ("Amygdala_L", "Amygdala_R")}
STEP = 3  # voxels per pixel (1 mm voxels -> 3 mm pixels)
CROP = {"x": (42, 138), "y": (62, 158), "z": (12, 108)}  # around both temporal lobes


def available() -> bool:
    return all((TEMPLATES / name).is_file() for name in (IMAGE_FILE, ATLAS_FILE, NAMES_FILE))


def volumes() -> tuple[np.ndarray, np.ndarray]:
    t1 = _read_volume(TEMPLATES / IMAGE_FILE).astype(np.float32)
    atlas = _read_volume(TEMPLATES / ATLAS_FILE)
    names = read_region_names(TEMPLATES / NAMES_FILE)
    labels = np.zeros(atlas.shape, dtype=np.uint8)
    for value, regions in REGIONS.items():
        for region in regions:
            labels[atlas == names[region]] = value
    return t1, labels


def slices(axis: str, n: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``n`` slices (index, image, mask) along ``axis`` ("coronal" = y, "axial" = z), evenly over the range
    where the hippocampus or amygdala appear, extended by a few slices so that some hold neither."""
    t1, labels = volumes()
    along = {"coronal": 1, "axial": 2}[axis]
    present = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != along)))
    positions = np.unique(np.linspace(present.min() - 4, present.max() + 4, n).round().astype(int))
    out = []
    crop = [slice(*CROP["x"], STEP), slice(*CROP["y"], STEP), slice(*CROP["z"], STEP)]
    for p in positions:
        index = list(crop)
        index[along] = int(p)
        out.append((int(p), t1[tuple(index)].copy(), labels[tuple(index)].copy()))
    return out


def write_folders(root: Path, axis: str, n_pool: int = 10, n_test: int = 6) -> Path:
    """ROOT/images, ROOT/masks (the pool) and ROOT/test/{images,masks}: alternate slices go to test."""
    cut = slices(axis, n_pool + n_test)
    test_every = max(2, len(cut) // n_test)
    for i, (p, image, mask) in enumerate(cut):
        folder = root / "test" if i % test_every == 1 and n_test > 0 else root
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        np.save(folder / "images" / f"slice_{i:03d}.npy", image)
        np.save(folder / "masks" / f"slice_{i:03d}.npy", mask)
    return root
