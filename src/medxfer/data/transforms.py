"""Intensity normalisation, augmentation (MONAI) and the torch Dataset that feeds training."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medxfer.data.base import IGNORE_INDEX, Case


def normalize_image(
    image: np.ndarray, method: str = "zscore", percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Per-image, per-channel intensity normalisation of a ``(C, *spatial)`` array -> float32.

    zscore: (x - mean) / std; minmax: to [0, 1]; percentile: clip to the given percentiles, then
    z-score (the usual CT/MR recipe); none: unchanged. Constant channels map to 0, never NaN. Computed in
    float64: float32 squares overflow for values beyond ~1e19 (a float TIFF holding 1e30 became all zeros).
    """
    x = image.astype(np.float32, copy=True)
    if method == "none":
        return x
    for c in range(x.shape[0]):
        ch = np.asarray(image[c], dtype=np.float64)
        if method == "percentile":
            lo, hi = np.percentile(ch, percentiles)
            ch = np.clip(ch, lo, hi)
            method_c = "zscore"
        else:
            method_c = method
        if method_c == "zscore":
            std = float(ch.std())
            x[c] = (ch - ch.mean()) / std if std > 1e-8 else 0.0
        elif method_c == "minmax":
            lo, hi = float(ch.min()), float(ch.max())
            x[c] = (ch - lo) / (hi - lo) if hi - lo > 1e-8 else 0.0
        else:
            raise ValueError(f"unknown normalisation {method!r}")
    return x


def match_channels(image: np.ndarray, in_channels: Optional[int]) -> np.ndarray:
    """Repeat a grayscale image to ``in_channels`` (e.g. 3 for an ImageNet-pretrained encoder)."""
    if in_channels is None or image.shape[0] == in_channels:
        return image
    if image.shape[0] == 1:
        return np.repeat(image, in_channels, axis=0)
    raise ValueError(f"cannot map {image.shape[0]} image channels to a model with {in_channels}")


def training_augmentation(spatial_dims: int, patch_size: Optional[Sequence[int]], foreground_ratio: float,
                          augment: bool | str):
    """MONAI dictionary transforms on ``{"image": (C, *S), "label": (1, *S)}``.

    ``augment``: True = flips, quarter turns (square planes), intensity scale and shift; ``"nnunet"`` =
    nnU-Net's set (``medxfer.data.augmentations.nnunet_augmentation``); False = none.

    Patches are sampled with ``RandCropByPosNegLabeld``: a share ``foreground_ratio`` of patches is
    centred on a foreground pixel, the rest on background.
    """
    from monai import transforms as mt

    from medxfer.data.augmentations import SquareRandRotate90d

    steps: list = []
    if patch_size is not None:
        steps.append(mt.SpatialPadd(keys=["image", "label"], spatial_size=list(patch_size), mode="constant"))
        pos = foreground_ratio
        steps.append(
            mt.RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=list(patch_size),
                pos=pos, neg=1.0 - pos, num_samples=1, allow_smaller=False,
            )
        )
    if augment == "nnunet":
        from medxfer.data.augmentations import nnunet_augmentation

        steps += nnunet_augmentation(spatial_dims)
    elif augment:
        for axis in range(spatial_dims):
            steps.append(mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=axis))
        axes = (spatial_dims - 2, spatial_dims - 1)
        steps.append(SquareRandRotate90d(keys=["image", "label"], prob=0.5, max_k=3, spatial_axes=axes))
        steps.append(mt.RandScaleIntensityd(keys=["image"], factors=0.1, prob=0.5))
        steps.append(mt.RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.5))
    return mt.Compose(steps)


class CaseDataset(Dataset):
    """Cases -> ``{"image": float32 (C, *S), "label": int64 (*S), "annotated": bool (n_classes,)}``.

    Normalisation, augmentation and patching happen per item, so no second, normalised copy of the dataset
    is held in memory. An item indexed ``(index, seed)`` (``medxfer.data.sampling.EpochSeededSampler``) seeds
    its random transforms with ``seed``: its draws depend on nothing else (not the worker, not what came
    before). A plain index draws from the transform's running state (seeded from torch's RNG, which
    Lightning seeds in every worker).
    """

    def __init__(self, cases: Sequence[Case], n_classes: int, normalization: str = "zscore",
                 percentiles: tuple[float, float] = (0.5, 99.5), in_channels: Optional[int] = None,
                 transform=None):
        self.cases = list(cases)
        self.n_classes = n_classes
        self.normalization = normalization
        self.percentiles = percentiles
        self.in_channels = in_channels
        self.transform = transform
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=int(torch.initial_seed() % (2**31)))

    def __len__(self) -> int:
        return len(self.cases)

    def annotated_mask(self, case: Case) -> torch.Tensor:
        mask = torch.ones(self.n_classes, dtype=torch.bool)
        if case.annotated is not None:
            mask[1:] = False
            mask[list(case.annotated)] = True
        return mask

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        case = self.cases[index]
        image = match_channels(normalize_image(case.image, self.normalization, self.percentiles), self.in_channels)
        label = case.label if case.label is not None else np.full(case.spatial_shape, IGNORE_INDEX)
        item = {"image": image, "label": label[None].astype(np.float32)}
        if self.transform is not None:
            if seed is not None and hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=seed)
            item = self.transform(item)
            if isinstance(item, list):  # RandCrop* returns a list of num_samples dicts
                item = item[0]
        image_t = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
        label_t = torch.as_tensor(np.asarray(item["label"]))[0].round().long()
        return {"image": image_t, "label": label_t, "annotated": self.annotated_mask(case), "index": index}
