"""Whole-image inference: sliding windows (MONAI) for patch-trained models, padding otherwise.

The first sliding-window call in a fresh process used to cost 10x the next one: it imported MONAI (whose
``__init__`` imports every submodule, torchvision and ``torch._dynamo`` among them: 3-8 s on 2 cores) and
set up the convolution kernels for the window shape (oneDNN primitives on the CPU, cuDNN / cuBLAS on a
GPU). :func:`warm_up` pays both up front; ``medxfer predict`` runs it in a background thread while the
first input is read (benchmarks/bench_warmup.py measures both).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int,
                    smallest: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, list[slice]]:
    """Pad the spatial dims of ``(N, C, *S)`` at the end to a multiple (and, when the result is within the model's
    ``smallest`` input, e.g. ``Segmenter.smallest_input``, to that); return the crop back."""
    spatial = x.shape[2:]
    target = [int(math.ceil(s / multiple) * multiple) for s in spatial]
    if smallest is not None and all(t <= m for t, m in zip(target, smallest)):
        target = [int(m) for m in smallest]  # e.g. an instance-normalised deepest level needs 2 voxels
    pad: list[int] = []
    for s, t in reversed(list(zip(spatial, target))):
        pad += [0, t - s]
    crop = [slice(None), slice(None)] + [slice(0, s) for s in spatial]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")  # edge values, as the sliding-window path pads
    return x, crop


def window_size(patch_size: Sequence[int], size_multiple: int) -> list[int]:
    """The sliding window: the training patch rounded up to the network's total stride."""
    return [int(math.ceil(p / size_multiple) * size_multiple) for p in patch_size]


@torch.inference_mode()
def warm_up(model: torch.nn.Module, patch_size: Sequence[int], size_multiple: int = 1, sw_batch_size: int = 4,
            in_channels: int = 1) -> None:
    """Import MONAI's inferer, run the model once on a batch of zero windows, and stitch two windows once
    (the Gaussian weights and the aggregation use kernels of their own), so that the first real
    sliding-window call costs what the next ones do."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    window = window_size(patch_size, size_multiple)
    model(torch.zeros(sw_batch_size, in_channels, *window, device=device))
    two_windows = torch.zeros(1, in_channels, window[0] + 1, *window[1:], device=device)
    predict_logits(model, two_windows, patch_size, size_multiple, overlap=0.25, sw_batch_size=sw_batch_size)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Optional[Sequence[int]] = None,
    size_multiple: int = 1,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Logits ``(N, n_classes, *S)`` for a batch of whole images/volumes ``(N, C, *S)``.

    With ``patch_size`` the image is tiled with Gaussian-weighted overlapping windows and stitched
    (``monai.inferers.sliding_window_inference``); windows are padded to ``size_multiple`` as needed.
    Without it the image is padded to ``size_multiple`` and run whole.
    """
    if patch_size is not None and any(s > p for s, p in zip(image.shape[2:], patch_size)):
        from monai.inferers import sliding_window_inference

        roi = window_size(patch_size, size_multiple)
        logits = sliding_window_inference(
            image, roi_size=roi, sw_batch_size=sw_batch_size, predictor=model,
            overlap=overlap, mode="gaussian", padding_mode="replicate",
        )
        return logits.as_tensor() if hasattr(logits, "as_tensor") else logits  # MetaTensor -> Tensor
    padded, crop = pad_to_multiple(image, size_multiple, getattr(model, "smallest_input", None))
    return model(padded)[tuple(crop)]
