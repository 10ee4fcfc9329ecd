"""Established transferability estimators, adapted to segmentation, to compare the robustness score with.

- **LogME** (You, Liu, Wang, Long: "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021): the log marginal evidence of a Bayesian linear model from features to labels,
  maximised over its prior precision alpha and noise precision beta by the paper's fixed-point iteration,
  per class (one-hot target), divided by the number of samples and averaged over classes. Higher = better.
- **H-score** (Bao, Li, Huang, Ma, Wang, Zheng: "An Information-Theoretic Approach to Transferability
  in Task Transfer Learning", ICIP 2019): ``tr(cov(f)^-1 cov(E[f | y]))``. By default the regularised
  H-score of Ibrahim, Ponomareva, Mazumder: "Newer is not always better: Rethinking transferability
  metrics, their peculiarities, stability and performance" (ECML-PKDD 2022), as they define it:
  ``H_alpha = tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f | y]))``, ``cov_alpha`` the Ledoit-Wolf estimate with
  its own shrinkage ``alpha``. Higher = better.
- **Linear-probe Dice**: a 1x1 convolution trained on frozen features of one level, upsampled to the
  mask, evaluated by Dice on held-out images. Higher = better.
- **kNN probe** (Sorkhei, Matsoukas, Fredin Haslum, Smith: "k-NN as a Simple and Effective Estimator of
  Transferability", arXiv 2503.18528, 2025): balanced accuracy of a k-nearest-neighbour classifier on the
  pixels of held-out images, neighbours from the other images. Higher = better.
- **GBC** (Pandy, Agostinelli, Uijlings, Ferrari, Mensink: "Transferability Estimation using Bhattacharyya
  Class Separability", CVPR 2022): minus the sum of the Bhattacharyya coefficients between the per-class
  Gaussians of the PCA-reduced features. ``gbc``: spherical Gaussians (one variance per class), the
  authors' default; ``gbc_diagonal``: diagonal ones (one variance per class and dimension), their other
  option. Higher (closer to 0) = better separated classes.
- **CC-FV** (Yang, Wei, He, Yang, Ye, Gu: "Pick the Best Pre-trained Model: Towards Transferability
  Estimation for Medical Image Segmentation", MICCAI 2023), as the paper and the authors' code define it:
  ``log(F_v / C_cons)``; class consistency ``C_cons`` = the mean 2-Wasserstein distance between the
  (full-covariance) Gaussians of a foreground class in two images; feature variety ``F_v`` = the mean
  inverse distance between the images' mean features. Higher = better. ``ccfv_ratio`` is medxfer's earlier
  variant under its own name (see :func:`cc_fv_ratio`).

Segmentation adaptation: every pixel of a level's feature map is a sample, its label the mask
downsampled (nearest) to that map; unannotated pixels (``IGNORE_INDEX``) are dropped; a seeded, capped
number of pixels is drawn per image. LogME and H-score draw uniformly among an image's annotated pixels
(as published in medxfer so far); kNN, GBC and CC-FV draw class-balanced (the image's quota split evenly
over the classes present in it), because background would otherwise dominate their class statistics.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxfer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
METHODS = ("logme", "hscore", "linear_probe", "knn", "gbc", "gbc_diagonal", "ccfv", "ccfv_ratio")
PIXEL_METHODS = {"logme": "logme", "hscore": "hscore", "knn": "knn_accuracy", "gbc": "gbc",
                 "gbc_diagonal": "gbc_diagonal", "ccfv": "cc_fv", "ccfv_ratio": "cc_fv_ratio"}
# the estimators that use the class-balanced pixel sample
BALANCED_METHODS = ("knn", "gbc", "gbc_diagonal", "ccfv", "ccfv_ratio")
BASELINE_COLUMNS = ["dataset", "metric", "encoder", "pretraining_scheme", "level", "pretraining_length",
                    "score", "higher_is_better", "n_samples", "checkpoint", "seed"]


# --------------------------------------------------------------------------------------------------
# LogME


def _logme_one_target(sigma: np.ndarray, z: np.ndarray, y_norm2: float, n: int, dim: int,
                      max_iter: int, tol: float) -> float:
    """Maximum log evidence / n for one target column, from the feature spectrum.

    ``sigma``: the nonzero eigenvalues of ``F^T F`` (squared singular values s^2); ``z = U^T y`` (the
    target in the left singular basis); ``y_norm2 = |y|^2``. Residual of the part of y outside span(F)
    is ``y_norm2 - |z|^2``. Fixed point (You et al. 2021, Algorithm 2): with
    gamma = sum(beta s^2 / (alpha + beta s^2)), alpha <- gamma / |m|^2, beta <- (n - gamma) / |F m - y|^2.
    """
    alpha, beta = 1.0, 1.0
    outside = max(y_norm2 - float(z @ z), 0.0)
    z2 = z * z
    for _ in range(max_iter):
        denom = alpha + beta * sigma
        gamma = float((beta * sigma / denom).sum())
        m2 = float((beta**2 * sigma * z2 / denom**2).sum())  # |m|^2, m = beta A^-1 F^T y
        residual = float((alpha**2 * z2 / denom**2).sum()) + outside  # |F m - y|^2
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / max(residual, 1e-300)
        if not (math.isfinite(new_alpha) and math.isfinite(new_beta) and new_alpha > 0 and new_beta > 0):
            break  # degenerate (e.g. n <= D and an exact fit): keep the last proper estimate
        converged = abs(new_alpha / new_beta - alpha / beta) <= tol * abs(alpha / beta)
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    denom = alpha + beta * sigma
    m2 = float((beta**2 * sigma * z2 / denom**2).sum())
    residual = float((alpha**2 * z2 / denom**2).sum()) + outside
    # log|A| over all D dimensions: the zero-eigenvalue directions contribute log(alpha) each.
    log_det = float(np.log(denom).sum()) + (dim - len(sigma)) * math.log(alpha)
    evidence = (n / 2.0 * math.log(beta) + dim / 2.0 * math.log(alpha) - n / 2.0 * math.log(2.0 * math.pi)
                - beta / 2.0 * residual - alpha / 2.0 * m2 - 0.5 * log_det)
    return evidence / n


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-4) -> float:
    """LogME of ``features`` ``(n, D)`` for integer ``labels`` ``(n,)`` (one-hot per class, averaged).

    You et al., ICML 2021. Higher means the features explain the labels better with a linear model.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or len(f) != len(y):
        raise DataError(f"logme: features must be (n, D) with one label per row, got {f.shape} and {y.shape}")
    n, dim = f.shape
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError("logme: the sampled pixels have only one class; need at least two")
    # Eigen-decomposition of the smaller Gram matrix: D x D when n > D (the usual case for pixels).
    if n > dim:
        sigma, v = np.linalg.eigh(f.T @ f)
        keep = sigma > sigma.max() * 1e-12
        sigma, v = sigma[keep], v[:, keep]
        project = (f @ v) / np.sqrt(sigma)  # U restricted to the kept directions
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        keep = s > s.max() * 1e-6
        sigma, project = s[keep] ** 2, u[:, keep]
    values = []
    for cls in classes:
        target = (y == cls).astype(np.float64)
        values.append(_logme_one_target(sigma, project.T @ target, float(target @ target), n, dim, max_iter, tol))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------------
# H-score


def h_score(features: np.ndarray, labels: np.ndarray, shrinkage: bool = True) -> float:
    """H-score of ``features`` ``(n, D)`` for integer ``labels`` ``(n,)``.

    ``shrinkage=True``: Ibrahim et al.'s regularised H-score (ECML-PKDD 2022),
    ``H_alpha = tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f|y]))`` with ``cov_alpha = (1 - alpha) cov(f) + alpha
    (tr cov(f) / D) I`` the Ledoit-Wolf estimate (sklearn) and ``alpha`` its shrinkage. The ``(1 - alpha)``
    factor shrinks the between-class covariance as much as the feature covariance, so the score is not
    inflated when alpha is large. ``False``: Bao et al.'s H-score (ICIP 2019) with the pseudo-inverse of the
    sample covariance. Covariances are normalised by ``n`` (the authors' code uses ``n - 1`` for
    ``cov(E[f|y])``: a factor ``n / (n - 1)``, immaterial for pixel samples).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or len(f) != len(y):
        raise DataError(f"h_score: features must be (n, D) with one label per row, got {f.shape} and {y.shape}")
    f = f - f.mean(axis=0, keepdims=True)
    between_weight = 1.0
    if shrinkage:
        from sklearn.covariance import LedoitWolf

        estimate = LedoitWolf(assume_centered=True).fit(f)
        cov, between_weight = estimate.covariance_, 1.0 - float(estimate.shrinkage_)
    else:
        cov = f.T @ f / len(f)
    class_means = np.zeros_like(f)
    for cls in np.unique(y):
        rows = y == cls
        class_means[rows] = f[rows].mean(axis=0)
    cov_between = between_weight * (class_means.T @ class_means) / len(f)
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-10, hermitian=True) @ cov_between))


# --------------------------------------------------------------------------------------------------
# kNN probe, GBC, CC-FV


def _check_samples(name: str, features, labels, image_index=None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or len(f) != len(y):
        raise DataError(f"{name}: features must be (n, D) with one label per row, got {f.shape} and {y.shape}")
    if not np.isfinite(f).all():
        raise DataError(f"{name}: features contain NaN or infinite values")
    if len(np.unique(y)) < 2:
        raise DataError(f"{name}: the sampled pixels have only one class; need at least two")
    groups = None
    if image_index is not None:
        groups = np.asarray(image_index).reshape(-1)
        if len(groups) != len(y):
            raise DataError(f"{name}: one image index per sample needed, got {len(groups)} for {len(y)}")
    return f, y, groups


def _unit_rows(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, image_index: np.ndarray, k: int = 20,
                 temperature: float = 0.07, held_out: float = 0.25, seed: int = 0) -> float:
    """kNN probe (Sorkhei et al., arXiv 2503.18528): balanced accuracy on the pixels of a seeded
    ``held_out`` share of the images, each pixel classified by its ``k`` nearest training pixels
    (cosine similarity, votes weighted by ``exp(similarity / temperature)``: the weighted kNN that
    self-supervised learning uses to judge features, Wu et al. 2018 / Caron et al. 2021).

    Pixels are held out by image, so neighbours never come from the same image as the query (pixels of
    one image are near-duplicates of each other and would flatter every encoder alike).
    """
    f, y, groups = _check_samples("knn", features, labels, image_index)
    images = np.unique(groups)
    if len(images) < 2:
        raise DataError(f"knn: needs pixels of at least 2 images (train + held out), got {len(images)}")
    order = np.random.default_rng(np.random.SeedSequence([int(seed), len(images), 23])).permutation(images)
    n_test = min(len(images) - 1, max(1, int(round(held_out * len(images)))))
    test = np.isin(groups, order[:n_test])
    train_f = torch.from_numpy(_unit_rows(f[~test])).float()
    test_f = torch.from_numpy(_unit_rows(f[test])).float()
    classes, train_y = np.unique(y[~test], return_inverse=True)
    k = min(int(k), len(train_y))
    votes = torch.zeros(len(test_f), len(classes))
    train_y_t = torch.from_numpy(train_y)
    for start in range(0, len(test_f), 2048):  # chunks keep the similarity matrix small
        sims = test_f[start:start + 2048] @ train_f.T
        top, idx = sims.topk(k, dim=1)
        votes[start:start + 2048].scatter_add_(1, train_y_t[idx], torch.exp(top / temperature))
    predicted = classes[votes.argmax(dim=1).numpy()]
    truth = y[test]
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in np.unique(truth)]
    return float(np.mean(recalls))


GBC_COVARIANCES = ("spherical", "diagonal")


def gbc(features: np.ndarray, labels: np.ndarray, n_components: int = 64, seed: int = 0,
        covariance: str = "spherical") -> float:
    """Gaussian Bhattacharyya coefficient (Pandy et al., CVPR 2022): features reduced by PCA to
    ``n_components`` dimensions, one Gaussian per class, and minus the sum over ordered class pairs of
    ``BC = exp(-D_B)``, with the paper's Bhattacharyya distance
    ``D_B = (mu_i - mu_j)^T S^-1 (mu_i - mu_j) / 8 + ln(det S / sqrt(det S_i det S_j)) / 2``, ``S = (S_i + S_j) / 2``.
    0 = perfectly separated classes.

    ``covariance``: ``"spherical"`` (the authors' default: ``S_c = s_c I``, ``s_c`` the class's variance
    averaged over dimensions) or ``"diagonal"`` (``S_c`` = the class's per-dimension variances). Variances are
    population variances (as the authors' code), floored at 1e-4 (their floor) times the mean feature
    variance, so that the floor does not depend on the feature scale. For spherical Gaussians the
    log-determinant term is the paper's ``D/2 * ln(...)``; the authors' code adds it once, not D times.
    """
    from sklearn.decomposition import PCA

    if covariance not in GBC_COVARIANCES:
        raise ConfigError(f"gbc: unknown covariance {covariance!r}; use {', '.join(GBC_COVARIANCES)}")
    f, y, _ = _check_samples("gbc", features, labels)
    dims = min(int(n_components), f.shape[1], len(f) - 1)
    if dims < f.shape[1]:
        f = PCA(n_components=dims, random_state=int(seed)).fit_transform(f)
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    floor = 1e-4 * (f.var(axis=0).mean() + 1e-12)
    variances = np.maximum(np.stack([f[y == c].var(axis=0) for c in classes]), floor)
    if covariance == "spherical":
        variances = np.repeat(variances.mean(axis=1, keepdims=True), f.shape[1], axis=1)
    total = 0.0
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            pooled = (variances[i] + variances[j]) / 2.0
            distance = (np.sum((means[i] - means[j]) ** 2 / pooled) / 8.0
                        + 0.5 * np.sum(np.log(pooled) - 0.5 * (np.log(variances[i]) + np.log(variances[j]))))
            total += 2.0 * math.exp(-distance)  # BC(i, j) = BC(j, i): both ordered pairs
    return -total


def _class_image_samples(f: np.ndarray, y: np.ndarray, groups: np.ndarray, cls) -> list[np.ndarray]:
    """The feature rows of class ``cls`` in each image that has at least 2 of them."""
    rows = [f[(y == cls) & (groups == image)] for image in np.unique(groups[y == cls])]
    return [r for r in rows if len(r) >= 2]


def _covariance_factor(rows: np.ndarray) -> np.ndarray:
    """A matrix ``F`` with ``F^T F = cov(rows)`` (sample covariance, ``n - 1``): the centred rows scaled
    (``n`` x D) when there are fewer rows than dimensions, else the symmetric square root (D x D)."""
    centred = (rows - rows.mean(axis=0)) / math.sqrt(len(rows) - 1)
    if len(rows) <= rows.shape[1]:
        return centred
    values, vectors = np.linalg.eigh(centred.T @ centred)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def gaussian_w2(mean_a: np.ndarray, factor_a: np.ndarray, mean_b: np.ndarray, factor_b: np.ndarray) -> float:
    """2-Wasserstein distance between ``N(mean_a, A)`` and ``N(mean_b, B)``, ``A = factor_a^T factor_a``:
    ``sqrt(|mu_a - mu_b|^2 + tr A + tr B - 2 tr (A^1/2 B A^1/2)^1/2)``. The last trace is the nuclear norm of
    ``factor_a factor_b^T`` (its squared singular values are the eigenvalues of ``A B``), which avoids a
    D x D matrix square root when the factors have few rows."""
    cross = np.linalg.svd(factor_a @ factor_b.T, compute_uv=False).sum()
    squared = float(np.sum((mean_a - mean_b) ** 2) + np.sum(factor_a ** 2) + np.sum(factor_b ** 2) - 2.0 * cross)
    return math.sqrt(max(squared, 0.0))


# The authors' code adds 1e-3 to every squared distance between mean features before the inverse root.
CCFV_VARIETY_EPS = 1e-3


def cc_fv(features: np.ndarray, labels: np.ndarray, image_index: np.ndarray, background: int = 0) -> float:
    """CC-FV (Yang et al., MICCAI 2023) as the paper and the authors' code define it: ``log(F_v / C_cons)``.

    - Class consistency ``C_cons``: for each foreground class (``background`` excluded), a Gaussian with full
      covariance of its pixel features in each image that has at least 2 of them, and the mean 2-Wasserstein
      distance (:func:`gaussian_w2`) over all pairs of images; averaged over classes.
    - Feature variety ``F_v``: each image's mean feature over its sampled pixels (every class), and the mean
      over image pairs of ``1 / sqrt(|g_a - g_b|^2 + 1e-3)`` (the authors' code: a potential energy, s = 1).

    Higher = better. The paper sums the log-ratio over encoder levels; medxfer reports it per level. The
    authors' code adds each class's mean distance to the running sum instead of taking the mean (a slip);
    this follows the paper's mean. The value depends on the feature scale (as the paper's does).
    """
    f, y, groups = _check_samples("ccfv", features, labels, image_index)
    distances = []
    for cls in np.unique(y):
        if cls == background:
            continue
        samples = _class_image_samples(f, y, groups, cls)
        if len(samples) < 2:
            continue
        moments = [(rows.mean(axis=0), _covariance_factor(rows)) for rows in samples]
        pairs = [gaussian_w2(*moments[a], *moments[b])
                 for a in range(len(moments)) for b in range(a + 1, len(moments))]
        distances.append(float(np.mean(pairs)))
    if not distances:
        raise DataError("ccfv: no foreground class has at least 2 pixels in at least 2 images")
    consistency = float(np.mean(distances))
    images = np.unique(groups)
    if len(images) < 2:
        raise DataError("ccfv: needs pixels of at least 2 images")
    centres = np.stack([f[groups == image].mean(axis=0) for image in images])
    squared = ((centres[:, None] - centres[None]) ** 2).sum(-1)[np.triu_indices(len(images), k=1)]
    variety = float(np.mean(1.0 / np.sqrt(squared + CCFV_VARIETY_EPS)))
    if consistency <= 0:
        raise DataError("ccfv: every foreground class has identical Gaussians in every image (consistency 0)")
    return math.log(variety / consistency)


def cc_fv_ratio(features: np.ndarray, labels: np.ndarray, image_index: np.ndarray) -> float:
    """medxfer's earlier CC-FV variant (``ccfv_ratio``), kept under its own name; it is not the paper's.

    Class consistency: for each class, background included, a diagonal Gaussian of its pixel features in each
    image (images with at least 2 pixels of the class), and the mean 2-Wasserstein distance between the
    Gaussians of two images, ``sqrt(|mu_a - mu_b|^2 + |sigma_a - sigma_b|^2)``, over all pairs of images;
    averaged over classes (0 = the class looks the same in every image). Feature variety: the spread of all
    sampled features, ``sqrt(trace(cov))`` (0 = collapsed features). Score = ``-consistency / variety``:
    higher = better, 0 at best, free of the feature scale.

    Differences from the paper (:func:`cc_fv`): diagonal instead of full covariances, background included,
    variety as the spread of the pixels rather than the inverse distances between the images' mean features,
    and minus a ratio instead of a log-ratio.
    """
    f, y, groups = _check_samples("ccfv_ratio", features, labels, image_index)
    distances = []
    for cls in np.unique(y):
        samples = _class_image_samples(f, y, groups, cls)
        if len(samples) < 2:
            continue
        mu = np.stack([rows.mean(axis=0) for rows in samples])
        sd = np.stack([rows.std(axis=0) for rows in samples])
        upper = np.triu_indices(len(samples), k=1)
        pair = (((mu[:, None] - mu[None]) ** 2).sum(-1) + ((sd[:, None] - sd[None]) ** 2).sum(-1))[upper]
        distances.append(float(np.sqrt(pair).mean()))
    if not distances:
        raise DataError("ccfv_ratio: no class has at least 2 pixels in at least 2 images")
    variety = float(np.sqrt(f.var(axis=0).sum()))
    if variety <= 0:
        raise DataError("ccfv_ratio: the features are constant (no variety)")
    return -float(np.mean(distances)) / variety


# --------------------------------------------------------------------------------------------------
# Per-pixel features


def _device(name) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batch_features(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    in_channels = int(getattr(encoder, "in_channels", images.shape[1]))
    x = images.to(device)
    if x.shape[1] != in_channels:
        if x.shape[1] != 1:
            raise DataError(f"cannot feed {x.shape[1]}-channel images to an encoder with {in_channels} input channels")
        x = x.expand(-1, in_channels, *x.shape[2:])
    return encoder(x)


def _labels_at(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of ``(B, *S)`` label maps to ``size``."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _balanced_choice(rng: np.random.Generator, pixel_labels: np.ndarray, quota: int) -> np.ndarray:
    """Positions of up to ``quota`` pixels, split as evenly as the counts allow over the classes present
    (a class with fewer pixels than its share gives the rest to the others)."""
    classes, counts = np.unique(pixel_labels, return_counts=True)
    chosen, left = [], int(quota)
    for rank, index in enumerate(np.argsort(counts, kind="stable")):
        take = min(int(counts[index]), left // (len(classes) - rank))
        positions = np.flatnonzero(pixel_labels == classes[index])
        chosen.append(rng.choice(positions, size=take, replace=False))
        left -= take
    return np.sort(np.concatenate(chosen))


@torch.inference_mode()
def pixel_features(encoder: torch.nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                   levels: Sequence[int], max_pixels: int = 20000, seed: int = 0, batch_size: int = 16,
                   device="auto", balanced: bool = False, with_images: bool = False) -> dict[int, tuple]:
    """``level -> (features (n, C), labels (n,))`` of a seeded sample of annotated pixels
    (``with_images``: also the image index of each pixel, ``(n,)``).

    Each image contributes at most ``ceil(max_pixels / N)`` pixels per level, drawn uniformly among its
    annotated pixels at that level's resolution, or (``balanced``) split evenly over its classes.
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = images.shape[0]
    per_image = max(1, math.ceil(max_pixels / n))
    dev = _device(device)
    was_training = encoder.training
    encoder.eval()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), n, 17]))
    collected: dict[int, tuple[list, list, list]] = {level: ([], [], []) for level in levels}
    try:
        for start in range(0, n, batch_size):
            features = _batch_features(encoder, images[start:start + batch_size], dev)
            for level in levels:
                fmap = features[level]
                small = _labels_at(labels[start:start + batch_size], fmap.shape[2:]).to(fmap.device)
                for j in range(fmap.shape[0]):
                    flat_labels = small[j].reshape(-1)
                    valid = torch.nonzero(flat_labels != IGNORE_INDEX).reshape(-1).cpu().numpy()
                    if len(valid) == 0:
                        continue
                    if balanced:
                        chosen = valid[_balanced_choice(rng, flat_labels[valid].cpu().numpy(), per_image)]
                    else:
                        chosen = rng.choice(valid, size=min(per_image, len(valid)), replace=False)
                    chosen_t = torch.as_tensor(chosen, device=fmap.device)
                    rows = fmap[j].reshape(fmap.shape[1], -1)[:, chosen_t].T
                    collected[level][0].append(rows.double().cpu().numpy())
                    collected[level][1].append(flat_labels[chosen_t].cpu().numpy())
                    collected[level][2].append(np.full(len(chosen), start + j, dtype=np.int64))
    finally:
        encoder.train(was_training)
    out = {}
    for level, (feats, labs, owners) in collected.items():
        if not feats:
            raise DataError("no annotated pixels to score: every sampled label is unannotated (255)")
        out[level] = (np.concatenate(feats), np.concatenate(labs))
        if with_images:
            out[level] += (np.concatenate(owners),)
    return out


# --------------------------------------------------------------------------------------------------
# Linear probe


def default_probe_level(strides: Sequence[int]) -> int:
    """The level whose stride is closest to 4 (fine enough for masks, coarse enough to be semantic)."""
    return int(np.argmin([abs(math.log2(max(s, 1)) - 2.0) for s in strides]))


def _foreground_dice(prediction: torch.Tensor, target: torch.Tensor, n_classes: int) -> float:
    """Mean over foreground classes of the Dice pooled over all held-out pixels (annotated ones);
    a class absent from both prediction and target counts as 1."""
    valid = target != IGNORE_INDEX
    scores = []
    for cls in range(1, n_classes):
        p = (prediction == cls) & valid
        t = (target == cls) & valid
        total = int(p.sum() + t.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return float(np.mean(scores)) if scores else math.nan


def linear_probe_dice(encoder: torch.nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                      n_classes: int, level: Optional[int] = None, steps: int = 300, lr: float = 0.01,
                      held_out: float = 0.25, seed: int = 0, batch_size: int = 16, device="auto") -> float:
    """Dice of a 1x1 convolution trained on the frozen features of ``level`` (bilinearly upsampled to the
    mask), for ``steps`` full-batch Adam steps on cross-entropy; evaluated on a seeded ``held_out`` share
    of the images (at least one)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = images.shape[0]
    if n < 2:
        raise DataError(f"linear probe: needs at least 2 images (train + held out), got {n}")
    if level is None:
        level = default_probe_level(encoder.strides)
    dev = _device(device)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            feats = torch.cat([_batch_features(encoder, images[s:s + batch_size], dev)[level].float()
                               for s in range(0, n, batch_size)])
    finally:
        encoder.train(was_training)
    feats = feats.clone()  # a normal tensor (inference tensors cannot enter autograd)
    # Standardise channels on the training images so that one learning rate suits every encoder.
    order = np.random.default_rng(np.random.SeedSequence([int(seed), n, 19])).permutation(n)
    n_test = min(n - 1, max(1, int(round(held_out * n))))
    test_idx, train_idx = torch.as_tensor(order[:n_test]), torch.as_tensor(order[n_test:])
    dims = [0] + list(range(2, feats.ndim))
    mean = feats[train_idx].mean(dim=dims, keepdim=True)
    std = feats[train_idx].std(dim=dims, keepdim=True).clamp_min(1e-6)
    feats = (feats - mean) / std
    conv = (torch.nn.Conv2d if feats.ndim == 4 else torch.nn.Conv3d)(feats.shape[1], n_classes, kernel_size=1)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.01, generator=gen)
        conv.bias.zero_()
    conv = conv.to(dev)
    mode = "bilinear" if feats.ndim == 4 else "trilinear"
    size = tuple(labels.shape[1:])
    x_train, y_train = feats[train_idx].to(dev), labels[train_idx].to(dev)
    optimizer = torch.optim.Adam(conv.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = F.interpolate(conv(x_train), size=size, mode=mode, align_corners=False)
            loss = F.cross_entropy(logits, y_train, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = F.interpolate(conv(feats[test_idx].to(dev)), size=size, mode=mode, align_corners=False)
        prediction = logits.argmax(dim=1)
    return _foreground_dice(prediction.cpu(), labels[test_idx], n_classes)


# --------------------------------------------------------------------------------------------------
# All baselines for one checkpoint


def _pixel_estimate(method: str, feats: np.ndarray, labs: np.ndarray, owners: np.ndarray, *, knn_k: int,
                    seed: int) -> float:
    if method == "logme":
        return logme(feats, labs)
    if method == "hscore":
        return h_score(feats, labs)
    if method == "knn":
        return knn_accuracy(feats, labs, owners, k=knn_k, seed=seed)
    if method in ("gbc", "gbc_diagonal"):
        return gbc(feats, labs, seed=seed, covariance="diagonal" if method == "gbc_diagonal" else "spherical")
    if method == "ccfv_ratio":
        return cc_fv_ratio(feats, labs, owners)
    return cc_fv(feats, labs, owners)


def baseline_scores(encoder: torch.nn.Module, images: np.ndarray, labels: np.ndarray, n_classes: int, *,
                    methods: Sequence[str] = ("logme", "hscore", "linear_probe"),
                    levels: Optional[Sequence[int]] = None, max_pixels: int = 20000, probe_steps: int = 300,
                    probe_level: Optional[int] = None, knn_k: int = 20, seed: int = 0, batch_size: int = 16,
                    device="auto") -> list[dict]:
    """Rows ``{metric, level, score, higher_is_better, n_samples, time_s}``: the pixel estimators (LogME,
    H-score, kNN, GBC, CC-FV) at every level in ``levels`` (None = all), the linear probe at
    ``probe_level``. ``time_s`` is each estimator's own time, its share of the encoder pass included
    (the pass is timed once per pixel sample and split evenly over the estimators that use it)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ConfigError(f"baselines: unknown method(s) {sorted(unknown)}; use {', '.join(METHODS)}")
    n_levels = len(encoder.channels)
    chosen = list(range(n_levels)) if levels is None else [lv + n_levels if lv < 0 else lv for lv in levels]
    rows = []
    uniform = [m for m in methods if m in ("logme", "hscore")]
    balanced = [m for m in methods if m in BALANCED_METHODS]
    for group, is_balanced in ((uniform, False), (balanced, True)):
        if not group:
            continue
        started = time.perf_counter()
        samples = pixel_features(encoder, images, labels, chosen, max_pixels=max_pixels, seed=seed,
                                 batch_size=batch_size, device=device, balanced=is_balanced, with_images=True)
        pass_share = (time.perf_counter() - started) / (len(group) * len(samples))
        for level, (feats, labs, owners) in samples.items():
            for method in group:
                started = time.perf_counter()
                try:
                    value = _pixel_estimate(method, feats, labs, owners, knn_k=knn_k, seed=seed)
                except DataError as exc:
                    log.warning("%s at level %d: %s", method, level, exc)
                    value = math.nan
                rows.append({"metric": PIXEL_METHODS[method], "level": level, "score": value,
                             "higher_is_better": True, "n_samples": len(labs),
                             "time_s": time.perf_counter() - started + pass_share})
    if "linear_probe" in methods:
        level = default_probe_level(encoder.strides) if probe_level is None else probe_level
        level = level + n_levels if level < 0 else level
        started = time.perf_counter()
        value = linear_probe_dice(encoder, images, labels, n_classes, level=level, steps=probe_steps, seed=seed,
                                  batch_size=batch_size, device=device)
        rows.append({"metric": "linear_probe_dice", "level": level, "score": value, "higher_is_better": True,
                     "n_samples": len(images), "time_s": time.perf_counter() - started})
    return rows
