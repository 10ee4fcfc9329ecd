"""The contrastive robustness score: how much an encoder's features move under photometric jitter,
relative to how far apart the features of two different target images are.

For N target images x_i, two random photometric augmentations a and a' (drawn per image, seeded) give
``q_i = f(a(x_i))`` and ``k_i = f(a'(x_i))``; the negative of image i is ``k_{p(i)} = f(a'(x_{p(i)}))``,
the second view of another image, where ``p`` is a fixed permutation without a fixed point (one random
cycle through all images). The score of a variant is the mean over images of the triplet hinge

    max(0, d(q_i, k_i) - d(q_i, k_{p(i)}) + margin)

with ``d`` one of ``cosine`` (1 - cosine similarity), ``l2`` (mean squared difference) or ``pearson``
(1 - Pearson correlation), on the features of one encoder level, either ``pooled`` (spatial mean, a C-vector)
or flattened (C x H x W). Lower = more robust.

Every variant (distance x margin x level x pooled/flat) comes from ONE encoder pass per augmentation:
images are visited in the order of the cycle ``p``, so the negative of every image but the last of a
batch is in the same batch, and the features of only two images are carried between batches.
:func:`robustness_naive` recomputes everything per variant; it is the reference the tests and the
benchmark compare with.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from medxfer.config import AugmentConfig, ScoreConfig
from medxfer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2", "pearson")
DEFAULT_MARGINS = (0.0, 0.25, 0.5, 0.75, 1.0)
# robustness.csv: the published reference columns first, medxfer's own after them.
REFERENCE_COLUMNS = ["dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                     "pretraining_length", "robustness"]
OWN_COLUMNS = ["ci_low", "ci_high", "n_images", "stride", "feature_dim", "checkpoint", "seed",
               "augmentation", "time_s"]
_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Distances and the triplet hinge


def row_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance between matching rows of two ``(N, D)`` tensors -> ``(N,)``.

    cosine: 1 - a.b / (|a| |b|); l2: mean over D of (a - b)^2; pearson: 1 - correlation of the two rows
    (cosine of the mean-centred rows). A zero (or constant, for pearson) row has similarity 0.
    """
    if metric == "l2":
        return (a - b).pow(2).mean(dim=1)
    if metric == "pearson":
        a = a - a.mean(dim=1, keepdim=True)
        b = b - b.mean(dim=1, keepdim=True)
    elif metric != "cosine":
        raise ConfigError(f"unknown robustness metric {metric!r}; use one of {', '.join(METRICS)}")
    dot = (a * b).sum(dim=1)
    norms = a.norm(dim=1).clamp_min(_EPS) * b.norm(dim=1).clamp_min(_EPS)
    return 1.0 - dot / norms


def triplet_hinge(d_positive: np.ndarray | torch.Tensor, d_negative: np.ndarray | torch.Tensor,
                  margin: float) -> np.ndarray:
    """Per-image ``max(0, d(q, k) - d(q, k') + margin)``."""
    d_pos = np.asarray(d_positive, dtype=np.float64)
    d_neg = np.asarray(d_negative, dtype=np.float64)
    return np.maximum(0.0, d_pos - d_neg + float(margin))


def negative_permutation(n: int, seed: int) -> np.ndarray:
    """``p`` with ``p[i] != i`` for every i: one random cycle through all ``n`` images (seeded).

    Returns ``p`` such that the negative of image ``i`` is image ``p[i]``.
    """
    if n < 2:
        raise DataError(f"the robustness score needs at least 2 images (a negative is another image), got {n}")
    cycle = cycle_order(n, seed)
    p = np.empty(n, dtype=np.int64)
    p[cycle] = np.roll(cycle, -1)
    return p


def cycle_order(n: int, seed: int) -> np.ndarray:
    """The order in which the cycle of :func:`negative_permutation` visits the images."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), n, 7])).permutation(n)


# --------------------------------------------------------------------------------------------------
# Photometric augmentation (seeded per image, so batching never changes what an image gets)


def _luminance(u: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of RGB images ``(B, 3, H, W)`` -> ``(B, 1, H, W)`` (torchvision's weights)."""
    return (0.299 * u[:, 0:1] + 0.587 * u[:, 1:2] + 0.114 * u[:, 2:3])


def _per_image(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


class PhotometricAugmentation:
    """One augmentation (``a`` or ``a'``) drawn for each of ``n_images`` images.

    Each image is mapped to its display range [0, 1] (its own min and max), jittered as torchvision's
    ColorJitter does (brightness, contrast, then for RGB saturation and hue; grayscale gets Gaussian noise
    instead; clamped to [0, 1] after each step), and mapped back. The normalisation of the image is thus
    kept, and the jitter is the same whatever the image's intensity scale. ``view`` (0 or 1) tells the two
    augmentations apart; image ``i`` always gets the same parameters, in any batch.
    """

    def __init__(self, config: AugmentConfig, n_images: int, seed: int, view: int, rgb: bool):
        self.config = config
        self.rgb = bool(rgb)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(view), 11])
                                                .generate_state(1)[0]))

        def factors(amount: float) -> torch.Tensor:
            return 1.0 + amount * (2.0 * torch.rand(n_images, generator=gen, dtype=torch.float64) - 1.0)

        self.brightness = factors(config.brightness)
        self.contrast = factors(config.contrast)
        self.saturation = factors(config.saturation)
        self.hue = config.hue * (2.0 * torch.rand(n_images, generator=gen, dtype=torch.float64) - 1.0)
        self.noise_seeds = torch.randint(0, 2**62, (n_images,), generator=gen)

    @property
    def is_identity(self) -> bool:
        c = self.config
        jitter = c.brightness or c.contrast or (self.rgb and (c.saturation or c.hue)) or (not self.rgb and c.noise)
        return not jitter

    def __call__(self, images: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Augment a batch ``(B, C, *S)`` whose rows are the images ``indices``."""
        if self.is_identity:
            return images
        c = self.config
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        ndim = images.ndim
        dtype, device = images.dtype, images.device
        flat = images.reshape(images.shape[0], -1)
        lo = _per_image(flat.min(dim=1).values, ndim)
        span = _per_image(flat.max(dim=1).values, ndim) - lo
        constant = span <= 1e-8
        span = torch.where(constant, torch.ones_like(span), span)
        u = (images - lo) / span

        def param(values: torch.Tensor) -> torch.Tensor:
            return _per_image(values[idx].to(device=device, dtype=dtype), ndim)

        if c.brightness:
            u = (u * param(self.brightness)).clamp(0.0, 1.0)
        if c.contrast:
            gray = _luminance(u) if self.rgb else u
            mean = gray.reshape(gray.shape[0], -1).mean(dim=1)
            u = (param(self.contrast) * u + (1.0 - param(self.contrast)) * _per_image(mean, ndim)).clamp(0.0, 1.0)
        if self.rgb:
            if c.saturation:
                u = (param(self.saturation) * u + (1.0 - param(self.saturation)) * _luminance(u)).clamp(0.0, 1.0)
            if c.hue:
                from torchvision.transforms.functional import adjust_hue

                u = torch.stack([adjust_hue(u[j], float(self.hue[i])) for j, i in enumerate(idx.tolist())])
        elif c.noise:
            noise = torch.empty_like(u, device="cpu")
            for j, i in enumerate(idx.tolist()):
                gen = torch.Generator().manual_seed(int(self.noise_seeds[i]))
                noise[j] = torch.randn(u.shape[1:], generator=gen, dtype=u.dtype)
            u = (u + c.noise * noise.to(device)).clamp(0.0, 1.0)
        out = u * span + lo
        return torch.where(constant, images, out)


# --------------------------------------------------------------------------------------------------
# Feature views


def _resolve_levels(encoder: torch.nn.Module, levels: Optional[Iterable[int]]) -> list[int]:
    n = len(encoder.channels)
    if levels is None:
        return list(range(n))
    out = []
    for level in levels:
        resolved = level + n if level < 0 else level
        if not 0 <= resolved < n:
            raise ConfigError(f"levels: encoder level {level} does not exist; the encoder has levels 0..{n - 1}")
        if resolved not in out:
            out.append(resolved)
    return out


def feature_views(features: Sequence[torch.Tensor], levels: Sequence[int],
                  pooled: Sequence[bool]) -> dict[tuple[int, bool], torch.Tensor]:
    """``(level, pooled) -> (B, D)`` float64 rows: the spatial mean (C) or the flattened map (C*H*W)."""
    views = {}
    for level in levels:
        fmap = features[level]
        for pool in pooled:
            rows = fmap.flatten(2).mean(dim=2) if pool else fmap.flatten(1)
            views[(level, bool(pool))] = rows.double()
    return views


def _device(name: str | torch.device | None) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(images, dtype=torch.float32)
    if tensor.ndim < 4:
        raise DataError(f"images must be a (N, C, H, W) or (N, C, D, H, W) batch, got shape {tuple(tensor.shape)}")
    return tensor


def _match_channels(batch: torch.Tensor, in_channels: int) -> torch.Tensor:
    if batch.shape[1] == in_channels:
        return batch
    if batch.shape[1] == 1:
        # grayscale into an RGB-pretrained encoder: repeated, as transforms.match_channels does
        return batch.expand(-1, in_channels, *batch.shape[2:])
    raise DataError(f"cannot feed {batch.shape[1]}-channel images to an encoder with {in_channels} input channels")


def _is_rgb(images: torch.Tensor, rgb: Optional[bool]) -> bool:
    return (images.shape[1] == 3 and images.ndim == 4) if rgb is None else bool(rgb)


# --------------------------------------------------------------------------------------------------
# All variants from one pass per augmentation


@dataclass
class PairDistances:
    """Per image and per ``(metric, level, pooled)``: ``d(q_i, k_i)`` and ``d(q_i, k_{p(i)})``.

    Every margin's score follows from these without touching the encoder again.
    """

    positive: dict[tuple[str, int, bool], np.ndarray]
    negative: dict[tuple[str, int, bool], np.ndarray]
    permutation: np.ndarray
    strides: dict[int, int] = field(default_factory=dict)
    feature_dims: dict[tuple[int, bool], int] = field(default_factory=dict)
    time_s: float = 0.0

    @property
    def n_images(self) -> int:
        return len(self.permutation)

    def losses(self, metric: str, margin: float, level: int, pooled: bool) -> np.ndarray:
        key = (metric, int(level), bool(pooled))
        return triplet_hinge(self.positive[key], self.negative[key], margin)

    def score(self, metric: str, margin: float, level: int, pooled: bool) -> float:
        return float(self.losses(metric, margin, level, pooled).mean())


def _two_views(encoder: torch.nn.Module, images, augment: Optional[AugmentConfig], seed: int,
               rgb: Optional[bool], device):
    """What the all-variants pass and the naive reference share: the images as a tensor, the two seeded
    augmentations (views 0 and 1), the device and the encoder's input channels."""
    images = _as_tensor(images)
    n = images.shape[0]
    augment = augment or AugmentConfig()
    rgb = _is_rgb(images, rgb)
    views = [PhotometricAugmentation(augment, n, seed, view=v, rgb=rgb) for v in (0, 1)]
    return images, views[0], views[1], _device(device), int(getattr(encoder, "in_channels", images.shape[1]))


@torch.inference_mode()
def pair_distances(
    encoder: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    metrics: Sequence[str] = METRICS,
    levels: Optional[Sequence[int]] = None,
    pooled: Sequence[bool] = (True, False),
    augment: Optional[AugmentConfig] = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device | None = "auto",
    rgb: Optional[bool] = None,
    progress: bool = False,
) -> PairDistances:
    """Distances of every ``(metric, level, pooled)`` from one encoder pass per augmentation.

    ``images``: normalised ``(N, C, *S)`` target images (grayscale is repeated to the encoder's channels
    after augmentation). ``rgb`` (default: 3 channels and 2D) chooses colour jitter over grayscale jitter.
    """
    start = time.perf_counter()
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"unknown robustness metric {metric!r}; use one of {', '.join(METRICS)}")
    images, aug_q, aug_k, dev, in_channels = _two_views(encoder, images, augment, seed, rgb, device)
    n = images.shape[0]
    permutation = negative_permutation(n, seed)
    order = cycle_order(n, seed)
    levels = _resolve_levels(encoder, levels)
    pooled = [bool(p) for p in dict.fromkeys(pooled)]
    was_training = encoder.training
    encoder.eval()
    keys = [(m, level, p) for m in metrics for level in levels for p in pooled]
    positive = {key: np.empty(n) for key in keys}
    negative = {key: np.empty(n) for key in keys}
    feature_dims: dict[tuple[int, bool], int] = {}
    first_k: dict = {}  # second-view features of the cycle's first image: the last image's negative
    pending_q: dict = {}  # first-view features of the previous batch's last image
    pending_index = -1
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    iterator: Iterable = batches
    if progress:
        from rich.progress import track

        iterator = track(batches, description="robustness", transient=True)
    try:
        for batch_indices in iterator:
            batch = images[batch_indices].to(dev)
            q_views = feature_views(encoder(_match_channels(aug_q(batch, batch_indices), in_channels)), levels, pooled)
            k_views = feature_views(encoder(_match_channels(aug_k(batch, batch_indices), in_channels)), levels, pooled)
            if not first_k:
                first_k = {view: rows[:1].clone() for view, rows in k_views.items()}
            for (level, pool), q in q_views.items():
                feature_dims[(level, pool)] = int(q.shape[1])
                k = k_views[(level, pool)]
                if pending_index >= 0:
                    anchors, anchor_ids = torch.cat([pending_q[(level, pool)], q[:-1]]), [pending_index, *batch_indices[:-1]]
                    negatives = k
                else:
                    anchors, anchor_ids, negatives = q[:-1], list(batch_indices[:-1]), k[1:]
                for metric in metrics:
                    positive[(metric, level, pool)][batch_indices] = row_distance(q, k, metric).cpu().numpy()
                    if len(anchor_ids):
                        negative[(metric, level, pool)][anchor_ids] = (
                            row_distance(anchors, negatives, metric).cpu().numpy())
            pending_q = {view: rows[-1:].clone() for view, rows in q_views.items()}
            pending_index = int(batch_indices[-1])
        for (level, pool), q in pending_q.items():
            for metric in metrics:
                negative[(metric, level, pool)][pending_index] = float(
                    row_distance(q, first_k[(level, pool)], metric)[0])
    finally:
        encoder.train(was_training)
    strides = {level: int(encoder.strides[level]) for level in levels} if hasattr(encoder, "strides") else {}
    return PairDistances(positive, negative, permutation, strides, feature_dims, time.perf_counter() - start)


@torch.inference_mode()
def robustness_naive(
    encoder: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    metric: str,
    margin: float,
    level: int,
    pooled: bool,
    augment: Optional[AugmentConfig] = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device | None = "auto",
    rgb: Optional[bool] = None,
) -> np.ndarray:
    """Reference implementation of ONE variant: per-image hinge losses, recomputing q, k and k' with
    three encoder passes in image order. Same augmentations and permutation as :func:`pair_distances`."""
    images, aug_q, aug_k, dev, in_channels = _two_views(encoder, images, augment, seed, rgb, device)
    n = images.shape[0]
    permutation = negative_permutation(n, seed)
    level = _resolve_levels(encoder, [level])[0]
    was_training = encoder.training
    encoder.eval()
    losses = np.empty(n)
    try:
        for start in range(0, n, batch_size):
            ids = np.arange(start, min(n, start + batch_size))
            neg_ids = permutation[ids]

            def features(aug: PhotometricAugmentation, which: np.ndarray) -> torch.Tensor:
                x = _match_channels(aug(images[which].to(dev), which), in_channels)
                fmap = encoder(x)[level]
                return (fmap.flatten(2).mean(dim=2) if pooled else fmap.flatten(1)).double()

            q, k, k_neg = features(aug_q, ids), features(aug_k, ids), features(aug_k, neg_ids)
            d_pos = row_distance(q, k, metric).cpu().numpy()
            d_neg = row_distance(q, k_neg, metric).cpu().numpy()
            losses[ids] = triplet_hinge(d_pos, d_neg, margin)
    finally:
        encoder.train(was_training)
    return losses


# --------------------------------------------------------------------------------------------------
# The reference code's protocol (Hidy, Bakos, Lukacs, arXiv 2410.18677), to regenerate published scores


def reference_negatives(n: int) -> np.ndarray:
    """The reference code's pairing: the negative of image ``i`` is image ``(n + 1 - i) mod n`` (the
    second views reversed, then rolled by two). It is its own inverse; for odd ``n`` image
    ``(n + 1) / 2`` is paired with itself (its negative is its own positive view)."""
    if n < 2:
        raise DataError(f"the robustness score needs at least 2 images (a negative is another image), got {n}")
    return (n + 1 - np.arange(n)) % n


class ReferenceColorJitter:
    """torchvision's ``ColorJitter`` as the reference code applies it: ONE draw of the parameters (order
    of the four operations and their factors) for all images of a view, applied to the images as they
    are (no per-image rescaling; float values are clamped to [0, 1] after each operation, as torchvision
    does). Seeded by ``(seed, view)``. Saturation and hue leave 1-channel images unchanged (torchvision).
    Volumes ``(B, C, D, H, W)`` are jittered as ``(B, C, D*H, W)`` images, so contrast uses the volume mean.
    """

    def __init__(self, config: AugmentConfig, seed: int, view: int):
        from torchvision.transforms import ColorJitter

        jitter = ColorJitter(brightness=config.brightness, contrast=config.contrast,
                             saturation=config.saturation, hue=config.hue)
        self.torch_seed = int(np.random.SeedSequence([int(seed), int(view), 31]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.torch_seed)  # ColorJitter draws from torch's global generator
            order, b, c, s, h = ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation,
                                                       jitter.hue)
        self.order = [int(i) for i in order]
        self.factors = (b, c, s, h)

    def __call__(self, images: torch.Tensor, indices: Sequence[int] = ()) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        shape = images.shape
        x = images.reshape(shape[0], shape[1], -1, shape[-1]) if images.ndim == 5 else images
        operations = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for index in self.order:
            factor = self.factors[index]
            if factor is not None:
                x = operations[index](x, factor)
        return x.reshape(shape)


@torch.inference_mode()
def reference_pair_distances(
    encoder: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    metrics: Sequence[str] = METRICS,
    levels: Optional[Sequence[int]] = None,
    pooled: Sequence[bool] = (True, False),
    augment: Optional[AugmentConfig] = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device | None = "auto",
) -> PairDistances:
    """:func:`pair_distances` under the reference code's protocol (``protocol: reference``): one
    :class:`ReferenceColorJitter` per view for all images, negatives :func:`reference_negatives`.

    The pairing is its own inverse, so images are visited pair by pair and every negative is in the
    anchor's batch: one encoder pass per view, nothing carried between batches.
    """
    start = time.perf_counter()
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"unknown robustness metric {metric!r}; use one of {', '.join(METRICS)}")
    images = _as_tensor(images)
    n = images.shape[0]
    permutation = reference_negatives(n)
    augment = augment or AugmentConfig()
    views = [ReferenceColorJitter(augment, seed, view) for view in (0, 1)]
    outside = float(images.min()) < 0.0 or float(images.max()) > 1.0
    if outside:
        log.warning("reference protocol: images reach %.3g..%.3g; ColorJitter clamps them to [0, 1] as the "
                    "reference code does (set data.normalization: minmax for images in [0, 1])",
                    float(images.min()), float(images.max()))
    dev = _device(device)
    in_channels = int(getattr(encoder, "in_channels", images.shape[1]))
    levels = _resolve_levels(encoder, levels)
    pooled = [bool(p) for p in dict.fromkeys(pooled)]
    pairs = [[i] if permutation[i] == i else [i, int(permutation[i])] for i in range(n) if permutation[i] >= i]
    batches, current = [], []
    for pair in pairs:  # whole pairs per batch (a batch may exceed batch_size by one image)
        current += pair
        if len(current) >= batch_size:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    keys = [(m, level, p) for m in metrics for level in levels for p in pooled]
    positive = {key: np.empty(n) for key in keys}
    negative = {key: np.empty(n) for key in keys}
    feature_dims: dict[tuple[int, bool], int] = {}
    was_training = encoder.training
    encoder.eval()
    try:
        for ids in batches:
            batch = images[ids].to(dev)
            q_views = feature_views(encoder(_match_channels(views[0](batch), in_channels)), levels, pooled)
            k_views = feature_views(encoder(_match_channels(views[1](batch), in_channels)), levels, pooled)
            where = {image: row for row, image in enumerate(ids)}
            partner = torch.as_tensor([where[int(permutation[i])] for i in ids], device=dev)
            for (level, pool), q in q_views.items():
                feature_dims[(level, pool)] = int(q.shape[1])
                k = k_views[(level, pool)]
                for metric in metrics:
                    positive[(metric, level, pool)][ids] = row_distance(q, k, metric).cpu().numpy()
                    negative[(metric, level, pool)][ids] = row_distance(q, k[partner], metric).cpu().numpy()
    finally:
        encoder.train(was_training)
    strides = {level: int(encoder.strides[level]) for level in levels} if hasattr(encoder, "strides") else {}
    return PairDistances(positive, negative, permutation, strides, feature_dims, time.perf_counter() - start)


def bootstrap_interval(values: np.ndarray, index: Optional[np.ndarray], confidence: float) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` over the resamples ``index`` (``(B, N)`` rows)."""
    if index is None or len(index) == 0:
        return math.nan, math.nan
    means = np.asarray(values, dtype=np.float64)[index].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def bootstrap_index(n: int, n_boot: int, seed: int) -> Optional[np.ndarray]:
    if n_boot <= 0:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), n, 13]))
    return rng.integers(0, n, size=(n_boot, n))


def variant_table(distances: PairDistances, margins: Sequence[float] = DEFAULT_MARGINS, *,
                  n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per ``(metric, margin, level, pooled)``: the score, its bootstrap interval over images."""
    index = bootstrap_index(distances.n_images, n_boot, seed)
    rows = []
    for (metric, level, pool) in distances.positive:
        for margin in margins:
            losses = distances.losses(metric, margin, level, pool)
            low, high = bootstrap_interval(losses, index, confidence)
            rows.append({"metric": metric, "margin": float(margin), "level": int(level), "pooled": bool(pool),
                         "robustness": float(losses.mean()), "ci_low": low, "ci_high": high,
                         "n_images": distances.n_images, "stride": distances.strides.get(level),
                         "feature_dim": distances.feature_dims.get((level, pool))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# One checkpoint's table (robustness.csv rows)


def augmentation_id(augment: AugmentConfig) -> str:
    c = augment
    return f"b{c.brightness:g}-c{c.contrast:g}-s{c.saturation:g}-h{c.hue:g}-n{c.noise:g}"


def score_checkpoint(encoder: torch.nn.Module, images: np.ndarray | torch.Tensor, config: ScoreConfig,
                     progress: bool = False) -> pd.DataFrame:
    """Every variant of ``config`` for one encoder: the score columns (no dataset/checkpoint columns).

    ``protocol: reference`` reproduces the reference code's scoring (:func:`reference_pair_distances`)
    and numbers levels from 1 as published (``levels`` in the config then use that numbering too)."""
    if config.protocol == "reference":
        levels = None if config.levels is None else [config.encoder_level(lv) for lv in config.levels]
        distances = reference_pair_distances(
            encoder, images, metrics=config.metrics, levels=levels, pooled=config.pooled,
            augment=config.augment, seed=config.seed, batch_size=config.batch_size, device=config.device)
    else:
        distances = pair_distances(
            encoder, images, metrics=config.metrics, levels=config.levels, pooled=config.pooled,
            augment=config.augment, seed=config.seed, batch_size=config.batch_size, device=config.device,
            progress=progress)
    table = variant_table(distances, config.margins, n_boot=config.bootstrap, confidence=config.confidence,
                          seed=config.seed)
    table["level"] = table["level"] + config.level_offset
    table["time_s"] = distances.time_s
    table["protocol"] = config.protocol
    return table


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    columns = REFERENCE_COLUMNS + OWN_COLUMNS
    for column in columns:
        if column not in table.columns:
            table[column] = pd.Series(dtype="float64")
    return table[columns + [c for c in table.columns if c not in columns]]
