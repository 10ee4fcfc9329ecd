"""Training patches read lazily from the preprocessed cache (``medxfer.data.preprocess``), memory-bounded.

:class:`CachedPatchDataset` holds file paths, not arrays: each item memory-maps one case's image and label
(``np.load(mmap_mode="r")``), copies one patch out and lets the mapping go, so a process's memory does not
grow with the number of cases (benchmarks/bench_data3d.py measures it: 20 vs 200 cases of 128^3). Patch
centres are drawn as nnU-Net draws them: a share ``foreground_ratio`` on a foreground voxel (a class
chosen uniformly among the case's, then one of its sampled voxels), the rest anywhere.

The randomness of an item (patch position, augmentation) comes from a seed that
:class:`medxfer.data.sampling.EpochSeededSampler` draws in the training process from the run's seed and the
epoch, so the batches depend neither on ``num_workers`` nor on whether the run was resumed.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medxfer.data.base import Case

MAX_AUTO_WORKERS = 4  # loader processes "auto" starts at most (a 128^3 patch with augmentation is ~10 ms)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a sweep worker or a batch system may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(cached: bool, cores: Optional[int] = None) -> int:
    """``train.num_workers: null``: loader processes for cache-backed 3D patches, ``min(4, cores - 1)`` (one
    core stays with the training process); 0 for in-memory data, whose items are cheap slices (a worker's
    start costs more than it saves there)."""
    if not cached:
        return 0
    cores = available_cores() if cores is None else cores
    return max(0, min(MAX_AUTO_WORKERS, cores - 1))


def patch_start(shape: Sequence[int], patch: Sequence[int], centre: Optional[Sequence[int]],
                rng: np.random.Generator) -> list[int]:
    """The corner of a patch centred on ``centre`` (None: anywhere), kept inside the volume where it fits."""
    start = []
    for size, p, c in zip(shape, patch, centre if centre is not None else [None] * len(shape)):
        if size <= p:
            start.append(0)
        elif c is None:
            start.append(int(rng.integers(0, size - p + 1)))
        else:
            start.append(int(min(max(int(c) - p // 2, 0), size - p)))
    return start


class CachedPatchDataset(Dataset):
    """Cache-backed cases -> ``{"image": float32 (C, *P), "label": int64 (*P), "annotated", "index"}``, one
    random patch per item; index items with ``(case index, seed)`` pairs
    (:class:`~medxfer.data.sampling.EpochSeededSampler`).
    ``augment`` as ``data.augment``: True, ``"nnunet"`` or False (``training_augmentation``)."""

    def __init__(self, cases: Sequence[Case], n_classes: int, patch_size: Sequence[int],
                 foreground_ratio: float = 0.33, augment: bool | str = True, in_channels: Optional[int] = None):
        self.paths = [dict(case.meta["cache"]) for case in cases]  # plain strings: cheap to send to workers
        self.annotated = [case.annotated for case in cases]
        self.n_classes = n_classes
        self.patch_size = [int(p) for p in patch_size]
        self.foreground_ratio = foreground_ratio
        self.in_channels = in_channels
        self.augment = augment
        self._transform = None

    def __len__(self) -> int:
        return len(self.paths)

    def annotated_mask(self, index: int) -> torch.Tensor:
        mask = torch.ones(self.n_classes, dtype=torch.bool)
        if self.annotated[index] is not None:
            mask[1:] = False
            mask[list(self.annotated[index])] = True
        return mask

    def read_patch(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One patch of case ``index``: only its voxels are read (memory-mapped files), then padded with
        zeros (image and label, as MONAI's SpatialPad in the in-memory pipeline) to the patch size."""
        paths = self.paths[index]
        image = np.load(paths["image"], mmap_mode="r")
        label = np.load(paths["label"], mmap_mode="r")
        centre = None
        if rng.random() < self.foreground_ratio:
            foreground = np.load(paths["foreground"])
            if len(foreground):
                classes = np.unique(foreground[:, 0])
                chosen = foreground[foreground[:, 0] == rng.choice(classes)]
                centre = chosen[rng.integers(len(chosen)), 1:]
        start = patch_start(label.shape, self.patch_size, centre, rng)
        window = tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
        image_patch = np.array(image[(slice(None), *window)], dtype=np.float32)
        label_patch = np.array(label[window], dtype=np.int64)
        del image, label  # the mapping goes with the last reference: nothing of the case stays resident
        pad = [(0, p - s) for s, p in zip(label_patch.shape, self.patch_size)]
        if any(after for _, after in pad):
            image_patch = np.pad(image_patch, [(0, 0), *pad])
            label_patch = np.pad(label_patch, pad)
        return image_patch, label_patch

    def transform(self):
        if self._transform is None and self.augment:
            from medxfer.data.transforms import training_augmentation

            self._transform = training_augmentation(len(self.patch_size), None, 0.0, self.augment)
        return self._transform

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, item)
        rng = np.random.default_rng(seed)
        image, label = self.read_patch(index, rng)
        if self.in_channels is not None and image.shape[0] != self.in_channels and image.shape[0] == 1:
            image = np.repeat(image, self.in_channels, axis=0)
        transform = self.transform()
        if transform is not None:
            transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
            out = transform({"image": image, "label": label[None].astype(np.float32)})
            image, label = np.asarray(out["image"]), np.asarray(out["label"])[0].round().astype(np.int64)
        return {"image": torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32),
                "label": torch.as_tensor(np.ascontiguousarray(label)), "annotated": self.annotated_mask(index),
                "index": index}
