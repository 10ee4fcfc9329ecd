"""LogME, H-score and the linear probe: agreement with the closed-form evidence, and informative features
ranked above random ones."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from medxfer.errors import DataError
from medxfer.transferability.baselines import (
    IGNORE_INDEX,
    baseline_scores,
    h_score,
    linear_probe_dice,
    logme,
    pixel_features,
)


def _evidence_by_matrices(features, labels, iterations=300):
    """LogME written directly from the paper's matrix formulas (no SVD tricks), for comparison."""
    n, dim = features.shape
    values = []
    for cls in np.unique(labels):
        y = (labels == cls).astype(float)
        alpha = beta = 1.0
        for _ in range(iterations):
            a = alpha * np.eye(dim) + beta * features.T @ features
            m = beta * np.linalg.solve(a, features.T @ y)
            eig = np.linalg.eigvalsh(beta * features.T @ features)
            gamma = float((eig / (alpha + eig)).sum())
            alpha, beta = gamma / (m @ m), (n - gamma) / np.sum((features @ m - y) ** 2)
        a = alpha * np.eye(dim) + beta * features.T @ features
        m = beta * np.linalg.solve(a, features.T @ y)
        evidence = (n / 2 * math.log(beta) + dim / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                    - beta / 2 * np.sum((features @ m - y) ** 2) - alpha / 2 * m @ m
                    - 0.5 * np.linalg.slogdet(a)[1])
        values.append(evidence / n)
    return float(np.mean(values))


@pytest.mark.parametrize("n,dim", [(120, 6), (15, 30)])  # more samples than features, and fewer
def test_logme_equals_the_evidence_computed_with_full_matrices(n, dim):
    rng = np.random.default_rng(n)
    features = rng.normal(size=(n, dim))
    labels = (features[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    assert logme(features, labels, max_iter=1000, tol=1e-12) == pytest.approx(
        _evidence_by_matrices(features, labels), abs=1e-6)


def _toy(n=1500, dim=12, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    informative = rng.normal(size=(n, dim))
    labels = np.argmax(informative @ rng.normal(size=(dim, n_classes)), axis=1)  # linear in the features
    random = rng.normal(size=(n, dim))
    return informative, random, labels


def test_logme_ranks_linearly_informative_features_above_random_ones():
    informative, random, labels = _toy()
    assert logme(informative, labels) > logme(random, labels) + 0.05


@pytest.mark.parametrize("shrinkage", [True, False])
def test_h_score_ranks_informative_features_above_random_ones(shrinkage):
    informative, random, labels = _toy()
    assert h_score(informative, labels, shrinkage) > 10 * h_score(random, labels, shrinkage)


def test_logme_needs_two_classes():
    with pytest.raises(DataError, match="one class"):
        logme(np.ones((5, 2)), np.zeros(5, int))


class MaskEncoder(nn.Module):
    """Two levels derived from the image, so that the test controls how informative they are."""

    channels, strides, in_channels = [2, 2], [1, 2], 1

    def forward(self, x):
        level0 = torch.cat([x, torch.ones_like(x)], dim=1)
        return [level0, nn.functional.avg_pool2d(level0, 2)]


def _segmentation_toy(informative: bool, n=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        r, c = rng.integers(2, size - 8, size=2)
        labels[i, r:r + 6, c:c + 6] = 1
    labels[:, 0, :] = IGNORE_INDEX  # unannotated row: never sampled
    noise = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    images = (labels[:, None] == 1).astype(np.float32) * 3.0 + 0.3 * noise if informative else noise
    return images, labels


def test_pixel_features_follow_the_downsampled_mask_and_skip_unannotated_pixels():
    images, labels = _segmentation_toy(True)
    samples = pixel_features(MaskEncoder(), images, labels, levels=[0, 1], max_pixels=400, device="cpu")
    feats, labs = samples[0]
    assert len(labs) == 400 and set(np.unique(labs)) <= {0, 1}
    # Level 0 features are the image: foreground pixels are bright.
    assert feats[labs == 1, 0].mean() > 2.0 > feats[labs == 0, 0].mean() + 1.5
    assert samples[1][0].shape[1] == 2 and len(samples[1][1]) <= 400


def test_pixel_estimators_and_linear_probe_prefer_informative_features():
    good_images, labels = _segmentation_toy(True)
    bad_images, _ = _segmentation_toy(False)
    good = {(r["metric"], r["level"]): r["score"] for r in baseline_scores(
        MaskEncoder(), good_images, labels, 2, levels=[0], max_pixels=1500, probe_steps=150, device="cpu")}
    bad = {(r["metric"], r["level"]): r["score"] for r in baseline_scores(
        MaskEncoder(), bad_images, labels, 2, levels=[0], max_pixels=1500, probe_steps=150, device="cpu")}
    # the probe defaults to the level whose stride is closest to 4: level 1 (stride 2) here
    assert set(good) == {("logme", 0), ("hscore", 0), ("linear_probe_dice", 1)}
    assert good[("logme", 0)] > bad[("logme", 0)]
    assert good[("hscore", 0)] > bad[("hscore", 0)]
    assert good[("linear_probe_dice", 1)] > 0.9 > 0.5 > bad[("linear_probe_dice", 1)]


def test_linear_probe_is_seeded():
    images, labels = _segmentation_toy(True, seed=1)
    first = linear_probe_dice(MaskEncoder(), images, labels, 2, level=1, steps=30, seed=4, device="cpu")
    again = linear_probe_dice(MaskEncoder(), images, labels, 2, level=1, steps=30, seed=4, device="cpu")
    assert first == again and 0.0 <= first <= 1.0
