"""Classification images for encoder pretraining: an ImageNet copy stored as ``.npy`` files, Fashion-MNIST
as installed by Debian's ``dataset-fashion-mnist`` (IDX files), and the embedded natural-image stand-in, as
torch Datasets with torchvision (v2) augmentation.

ImageNet layout (``root``)::

    root/labels.json           {"data/n01440764_10026.npy": 1, "data/ILSVRC2012_val_00000001.npy": 66, ...}
    root/data/<name>.npy       uint8 RGB, channels first: (3, H, W), e.g. 3x64x64 or 3x224x224

``labels.json`` maps each file path (relative to ``root``) to a class index 1..n_classes (1000 for
ImageNet); medxfer shifts them to 0..n_classes-1. Files whose name starts with ``ILSVRC2012_val_`` are
the validation split, every other file is training. Files are read lazily, one per item
(``np.load(mmap_mode="r", allow_pickle=False)``), so the copy never has to fit in memory. Every defect
(missing file, unreadable file, label out of range, wrong shape or dtype) is a one-line ``DataError``
naming the file.

Transforms (:func:`classification_transform`) run on uint8 ``(3, H, W)`` tensors and end with float32
ImageNet normalisation. Training: the scheme's augmentation (see :mod:`medxfer.pretraining`); evaluation:
resize the short side to ``input_size / 0.875`` and take the centre ``input_size`` crop (the usual
ImageNet protocol), or nothing at all when the image already has the input size.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medxfer.data.base import seeded_order, subset_size
from medxfer.errors import DataError

log = logging.getLogger(__name__)

VAL_PREFIX = "ILSVRC2012_val_"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # centre crop covers 87.5% of the resized short side (224 of 256)


@dataclass(frozen=True)
class ImageItem:
    """One labelled image file: ``path`` relative to the dataset root, ``label`` in 0..n_classes-1."""

    path: str
    label: int


@dataclass
class ImageNetIndex:
    """The parsed ``labels.json``: training and validation items, sorted by path."""

    root: Path
    train: list[ImageItem]
    val: list[ImageItem]
    n_classes: int


def is_validation_file(path: str) -> bool:
    return PurePosixPath(path).name.startswith(VAL_PREFIX)


def read_imagenet_index(
    root: str | os.PathLike, labels_file: str = "labels.json", n_classes: int = 1000
) -> ImageNetIndex:
    """Parse and check ``root/labels_file`` (labels 1..n_classes -> 0..n_classes-1), split by file name."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: ImageNet folder not found")
    labels_path = root / labels_file
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: labels file not found (expected a JSON mapping file path -> class 1..{n_classes})")
    try:
        mapping = json.loads(labels_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{labels_path}: unreadable labels file ({type(exc).__name__}: {exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{labels_path}: expected a non-empty JSON object mapping file path -> class index")
    train, val = [], []
    for path, label in mapping.items():
        relative = PurePosixPath(str(path).replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts:
            raise DataError(f"{labels_path}: entry {path!r} must be a path relative to {root} (inside it)")
        if relative.suffix != ".npy":
            raise DataError(f"{labels_path}: entry {path!r} is not a .npy file")
        if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label <= n_classes:
            raise DataError(
                f"{root / relative}: label {label!r} in {labels_path.name} is out of range 1..{n_classes}"
            )
        item = ImageItem(str(relative), label - 1)
        (val if is_validation_file(item.path) else train).append(item)
    train.sort(key=lambda i: i.path)
    val.sort(key=lambda i: i.path)
    log.info("%s: %d training and %d validation images", labels_path, len(train), len(val))
    return ImageNetIndex(root=root, train=train, val=val, n_classes=n_classes)


def select_items(items: Sequence[ImageItem], n: int | float | None, seed: int) -> list[ImageItem]:
    """``n`` items (int) or a fraction (float in (0, 1]) chosen by ``seed``, kept in path order; None = all."""
    items = list(items)
    if n is None:
        return items
    count = subset_size(n, len(items))
    chosen = sorted(seeded_order(len(items), seed)[:count].tolist())
    return [items[i] for i in chosen]


def check_files_exist(root: Path, items: Sequence[ImageItem]) -> None:
    """Fail before training, not hours into it, when a listed file is missing."""
    for item in items:
        if not (root / item.path).is_file():
            raise DataError(f"{root / item.path}: image file listed in labels.json not found")


def load_npy_image(path: Path) -> np.ndarray:
    """A uint8 ``(3, H, W)`` array from ``path`` (memory-mapped, no pickles) or a DataError naming it."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(array, np.ndarray):  # np.load of an .npz archive
        raise DataError(f"{path}: not a single .npy array")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != 3 or min(array.shape[1:]) < 1:
        raise DataError(
            f"{path}: expected a uint8 RGB image of shape (3, H, W), got dtype {array.dtype} shape {tuple(array.shape)}"
        )
    return array


class NpyImageDataset(Dataset):
    """``(image, label)`` pairs from ``.npy`` files; the image goes through ``transform`` (uint8 tensor in)."""

    def __init__(self, root: str | os.PathLike, items: Sequence[ImageItem], transform: Optional[Callable] = None):
        self.root = Path(root)
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        image = torch.from_numpy(np.array(load_npy_image(self.root / item.path)))  # copy out of the mmap
        if self.transform is not None:
            image = self.transform(image)
        return image, item.label


class ArrayImageDataset(Dataset):
    """``(image, label)`` pairs from in-memory uint8 ``(N, 3, H, W)`` images (the natural stand-in)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


@dataclass(frozen=True)
class AugmentationRecipe:
    """What the training transform does (filled from a scheme; see :mod:`medxfer.pretraining`)."""

    kind: str = "simple"  # "simple": flip + padded random crop; "advanced": random-resized crop + colour
    crop_scale: tuple[float, float] = (0.25, 1.0)  # advanced: RandomResizedCrop area range
    color_jitter: float = 0.0  # advanced: ColorJitter brightness/contrast/saturation strength
    auto_augment: str = "none"  # advanced: "trivial" (TrivialAugmentWide), "randaugment" or "none"


def classification_transform(input_size: int, train: bool, recipe: AugmentationRecipe = AugmentationRecipe()):
    """torchvision v2 pipeline: uint8 ``(3, H, W)`` tensor -> normalised float32 ``(3, S, S)``."""
    from torchvision.transforms import v2

    steps: list = []
    if train and recipe.kind == "advanced":
        steps.append(v2.RandomResizedCrop(input_size, scale=tuple(recipe.crop_scale), antialias=True))
        steps.append(v2.RandomHorizontalFlip())
        if recipe.auto_augment == "trivial":
            steps.append(v2.TrivialAugmentWide())
        elif recipe.auto_augment == "randaugment":
            steps.append(v2.RandAugment())
        if recipe.color_jitter > 0:
            s = recipe.color_jitter
            steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    elif train:
        # Short side to the input size (no-op when equal), then a random crop of a reflect-padded image:
        # translations of up to 1/8 of the side, the classic CIFAR/ResNet recipe.
        steps.append(v2.Resize(input_size, antialias=True))
        steps.append(v2.RandomCrop(input_size, padding=max(1, input_size // 8), padding_mode="reflect"))
        steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(_EvalResize(input_size))
        steps.append(v2.CenterCrop(input_size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(steps)


class _EvalResize(torch.nn.Module):
    """Short side to ``input_size / 0.875`` (ImageNet evaluation), unless the image already has the size."""

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        if tuple(image.shape[-2:]) == (self.input_size, self.input_size):
            return image
        return TF.resize(image, [int(round(self.input_size / EVAL_CROP_FRACTION))], antialias=True)


@dataclass
class ClassificationData:
    """Training and validation datasets of a classification pretraining run."""

    name: str
    train: Dataset
    val: Dataset
    n_classes: int
    class_names: list[str]
    in_channels: int = 3


def load_imagenet(
    root: str | os.PathLike,
    *,
    input_size: int,
    recipe: AugmentationRecipe,
    labels_file: str = "labels.json",
    n_classes: int = 1000,
    train_images: int | float | None = None,
    val_images: int | None = None,
    seed: int = 0,
) -> ClassificationData:
    """The ``.npy`` ImageNet copy at ``root`` (optionally a seeded subset of the training split and the
    first ``val_images`` validation files), every listed file checked to exist."""
    index = read_imagenet_index(root, labels_file, n_classes)
    if not index.train:
        raise DataError(f"{index.root / labels_file}: no training images (every file is {VAL_PREFIX}*)")
    if not index.val:
        raise DataError(f"{index.root / labels_file}: no validation images (no {VAL_PREFIX}* files)")
    train = select_items(index.train, train_images, seed)
    val = index.val if val_images is None else index.val[: min(val_images, len(index.val))]
    check_files_exist(index.root, train + val)
    return ClassificationData(
        name=f"imagenet:{index.root.name}",
        train=NpyImageDataset(index.root, train, classification_transform(input_size, True, recipe)),
        val=NpyImageDataset(index.root, val, classification_transform(input_size, False)),
        n_classes=n_classes,
        class_names=[str(i) for i in range(n_classes)],
    )


def load_natural(
    *, input_size: int, recipe: AugmentationRecipe, n_per_class: int = 100, val_per_class: int = 20,
    image_size: int = 32, data_seed: int = 0,
) -> ClassificationData:
    """The embedded natural-image stand-in (:func:`medxfer.data.demo.natural_images`), fixed by ``data_seed``."""
    from medxfer.data.demo import natural_images

    train_x, train_y, names = natural_images("train", n_per_class, image_size, data_seed)
    val_x, val_y, _ = natural_images("val", val_per_class, image_size, data_seed)
    return ClassificationData(
        name="natural",
        train=ArrayImageDataset(train_x, train_y, classification_transform(input_size, True, recipe)),
        val=ArrayImageDataset(val_x, val_y, classification_transform(input_size, False)),
        n_classes=len(names),
        class_names=names,
    )


# ---------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")
_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format; ``.gz`` or plain) as a numpy array; a DataError names a bad file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise DataError(f"{path}: IDX file not found") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable IDX file ({type(exc).__name__}: {exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    n_dims = raw[3]
    header = 4 + 4 * n_dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says shape {shape} but the file holds {len(raw) - header} values")
    return np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=header).reshape(shape)


def _fashion_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
            if (root / name).is_file():
                return root / name
        raise DataError(f"{root / (prefix + '-' + kind + '-ubyte.gz')}: Fashion-MNIST file not found "
                        "(Debian: apt-get install dataset-fashion-mnist)")

    images = read_idx(find("images-idx3"))
    labels = read_idx(find("labels-idx1")).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{root}: {prefix} label {int(labels.max())} out of range 0..9")
    return images, labels


def load_fashion_mnist(
    root: str | os.PathLike | None = None, *, input_size: int, recipe: AugmentationRecipe,
    train_images: int | float | None = None, val_images: int | None = None, seed: int = 0,
) -> ClassificationData:
    """Fashion-MNIST (60,000 training and 10,000 test photos of clothing, 28 x 28 grey; MIT licence): a seeded
    subset of the training split, the first ``val_images`` test images for validation. Grey values are
    repeated to three channels, as for ImageNet encoders."""
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    train_x, train_y = _fashion_split(root, "train")
    val_x, val_y = _fashion_split(root, "t10k")
    if train_images is not None:
        chosen = np.sort(seeded_order(len(train_y), seed)[: subset_size(train_images, len(train_y))])
        train_x, train_y = train_x[chosen], train_y[chosen]
    if val_images is not None:
        val_x, val_y = val_x[:val_images], val_y[:val_images]

    def rgb(images: np.ndarray) -> np.ndarray:
        return np.repeat(images[:, None], 3, axis=1)

    return ClassificationData(
        name="fashion-mnist",
        train=ArrayImageDataset(rgb(train_x), train_y, classification_transform(input_size, True, recipe)),
        val=ArrayImageDataset(rgb(val_x), val_y, classification_transform(input_size, False)),
        n_classes=len(FASHION_MNIST_CLASSES),
        class_names=list(FASHION_MNIST_CLASSES),
    )
