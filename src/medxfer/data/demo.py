"""Embedded demo data: nothing is downloaded.

Segmentation ("nuclei"), two domains: REAL fluorescence nuclei from the 2018 Data Science Bowl as shipped
by the ``stardist`` package (``stardist/data/images/img2d.tif`` + ``mask2d.tif``, 512x512, 125 hand-labelled
nuclei, BSD-3). The image is cut into 64 non-overlapping 64x64 tiles. Domain A is the left half as
recorded. Domain B is the right half passed through a fixed, seeded "other microscope" intensity model
(inverted contrast as in brightfield, gamma, uneven illumination, blur and shot-like noise): the same
morphology and labels, a different intensity distribution. The intensity model is procedural; the
images and masks under it are real. Each domain has 20 train, 4 val and 8 test tiles.

Classification ("natural"), a stand-in for ImageNet: labelled 32x32 crops of the natural photographs that
scikit-image bundles (astronaut, brick, camera, cat, coffee, coins, grass, gravel, moon, rocket; one class
per photograph). Training crops come from the left 75% of each photograph, validation crops from the
right 25%, so no pixel is shared between the splits.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.data.base import Case, SegmentationData
from medxfer.errors import DataError

TILE = 64
N_TEST = 8
N_VAL = 4
DOMAINS = ("A", "B")
NATURAL_CLASSES = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel", "moon", "rocket")
_DATASET_SEED = 20181  # fixes which tiles are test/val; not a run seed


def _stardist_image_dir() -> Path:
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("demo data: the 'stardist' package (which ships the nuclei images) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "images"


@lru_cache(maxsize=1)
def _nuclei_image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    folder = _stardist_image_dir()
    try:
        image = tifffile.imread(folder / "img2d.tif").astype(np.float32)
        instances = tifffile.imread(folder / "mask2d.tif")
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: cannot read the demo nuclei images: {exc}") from None
    return image, (instances > 0).astype(np.int64)


def _other_microscope(image: np.ndarray, seed: int) -> np.ndarray:
    """Map fluorescence intensities to a brightfield-like appearance (dark nuclei on a bright, uneven
    background), keeping geometry. Deterministic for a seed."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = image / max(float(image.max()), 1.0)
    x = 1.0 - 0.8 * x**0.6  # inverted contrast, compressed by a gamma
    h, w = x.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    x = x * (0.85 + 0.15 * np.cos(2.0 * yy + 1.3) * np.cos(1.5 * xx))  # uneven illumination
    x = gaussian_filter(x, sigma=1.0)
    x = x + rng.normal(0.0, 0.025, size=x.shape) * np.sqrt(np.clip(x, 0.0, None))
    return (np.clip(x, 0.0, 1.2) * 1000.0).astype(np.float32)


def nuclei_cases(domain: str) -> list[Case]:
    """All 32 tiles of one domain, in raster order."""
    if domain not in DOMAINS:
        raise DataError(f"demo data: domain must be one of {DOMAINS}, got {domain!r}")
    image, mask = _nuclei_image_and_mask()
    half = image.shape[1] // 2
    cols = slice(0, half) if domain == "A" else slice(half, 2 * half)
    image, mask = image[:, cols], mask[:, cols]
    if domain == "B":
        image = _other_microscope(image, seed=_DATASET_SEED)
    cases = []
    for r in range(image.shape[0] // TILE):
        for c in range(image.shape[1] // TILE):
            sl = (slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE))
            cases.append(
                Case(
                    image=image[sl][None].copy(),
                    label=mask[sl].copy(),
                    case_id=f"nuclei{domain}_r{r}c{c}",
                    spacing=(1.0, 1.0),
                    meta={"domain": domain},
                )
            )
    return cases


def load_demo(options: dict[str, Any] | None = None, val_fraction: float | None = None) -> SegmentationData:
    """The demo segmentation set of one domain (``options={"domain": "A"|"B"}``, default "B")."""
    options = dict(options or {})
    domain = str(options.pop("domain", "B"))
    if options:
        raise DataError(f"demo data: unknown option(s) {sorted(options)}; the demo takes only 'domain'")
    cases = nuclei_cases(domain)
    order = np.random.default_rng(_DATASET_SEED).permutation(len(cases))
    test = [cases[i] for i in sorted(order[:N_TEST])]
    pool = [cases[i] for i in sorted(order[N_TEST:])]
    n_val = N_VAL if val_fraction is None else int(round(val_fraction * len(pool)))
    val, train = pool[:n_val], pool[n_val:]
    return SegmentationData(
        name=f"demo-nuclei-{domain}",
        train=train,
        val=val,
        test=test,
        n_classes=2,
        class_names=["background", "nucleus"],
        in_channels=1,
        spatial_dims=2,
        meta={"domain": domain, "source": "stardist img2d.tif / mask2d.tif (2018 Data Science Bowl)"},
    )


@lru_cache(maxsize=1)
def _natural_photographs() -> tuple[np.ndarray, ...]:
    import skimage.data as skdata
    from skimage.transform import resize

    loaders = {
        "astronaut": skdata.astronaut, "brick": skdata.brick, "camera": skdata.camera,
        "cat": skdata.chelsea, "coffee": skdata.coffee, "coins": skdata.coins,
        "grass": skdata.grass, "gravel": skdata.gravel, "moon": skdata.moon, "rocket": skdata.rocket,
    }
    photos = []
    for name in NATURAL_CLASSES:
        img = np.asarray(loaders[name]())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        img = img[..., :3]
        # Same scale for every photograph: short side 160 px, so crops show comparable detail.
        scale = 160.0 / min(img.shape[:2])
        shape = (int(round(img.shape[0] * scale)), int(round(img.shape[1] * scale)), 3)
        img = resize(img, shape, preserve_range=True, anti_aliasing=True)
        photos.append(np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1))  # (3, H, W)
    return tuple(photos)


def natural_images(
    split: str = "train", n_per_class: int = 100, size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Random crops of the bundled photographs: uint8 ``(N, 3, size, size)``, int64 labels, class names.

    Same arguments -> identical arrays. Train crops lie in the left 75% of each photograph, val crops
    in the right 25%.
    """
    if split not in ("train", "val"):
        raise DataError(f"natural demo images: split must be 'train' or 'val', got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0 if split == "train" else 1, size]))
    images, labels = [], []
    for label, photo in enumerate(_natural_photographs()):
        _, h, w = photo.shape
        cut = int(w * 0.75)
        x_lo, x_hi = (0, cut - size) if split == "train" else (cut, w - size)
        ys = rng.integers(0, h - size + 1, size=n_per_class)
        xs = rng.integers(x_lo, x_hi + 1, size=n_per_class)
        for y, x in zip(ys, xs):
            images.append(photo[:, y : y + size, x : x + size])
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), list(NATURAL_CLASSES)


def load_demo_config(config) -> SegmentationData:
    """Loader entry point for ``data.name: demo`` (a :class:`medxfer.config.DataConfig`)."""
    return load_demo(config.options, val_fraction=config.val_fraction)
