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


# ----------------------------------------------------------------------------- kNN, GBC, CC-FV
def _pixels_with_known_separability(separation: float, n_images=10, per_class=60, dim=16, n_classes=3, seed=0):
    """Pixel features = class signal (``separation`` along a class direction) + a per-image offset (the
    nuisance an encoder may or may not suppress) + pixel noise. Large separation: classes apart and
    alike across images; small: classes overlap and each image shifts them its own way."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_classes, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    feats, labels, owners = [], [], []
    for image in range(n_images):
        offset = rng.normal(size=dim) * 1.0
        for cls in range(n_classes):
            feats.append(separation * directions[cls] + offset + 0.5 * rng.normal(size=(per_class, dim)))
            labels.append(np.full(per_class, cls))
            owners.append(np.full(per_class, image))
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(owners)


@pytest.mark.parametrize("estimator", ["knn", "gbc", "gbc_diagonal", "ccfv_ratio"])
def test_new_estimators_rank_separated_classes_above_overlapping_ones(estimator):
    from medxfer.transferability.baselines import cc_fv_ratio, gbc, knn_accuracy

    score = {"knn": lambda f, y, g: knn_accuracy(f, y, g, k=10),
             "gbc": lambda f, y, g: gbc(f, y),
             "gbc_diagonal": lambda f, y, g: gbc(f, y, covariance="diagonal"),
             "ccfv_ratio": lambda f, y, g: cc_fv_ratio(f, y, g)}[estimator]
    separated = score(*_pixels_with_known_separability(6.0))
    middle = score(*_pixels_with_known_separability(1.5))
    overlapping = score(*_pixels_with_known_separability(0.0))
    assert separated > middle > overlapping


def test_knn_accuracy_known_values_and_held_out_by_image():
    from medxfer.transferability.baselines import knn_accuracy

    feats, labels, owners = _pixels_with_known_separability(6.0)
    assert knn_accuracy(feats, labels, owners, k=5) == 1.0
    rng = np.random.default_rng(1)
    chance = knn_accuracy(rng.normal(size=(3000, 8)), rng.integers(0, 3, 3000), np.repeat(np.arange(10), 300))
    assert chance == pytest.approx(1 / 3, abs=0.06)
    with pytest.raises(DataError, match="2 images"):
        knn_accuracy(feats, labels, np.zeros(len(labels), int))


def test_gbc_is_zero_for_far_apart_classes_and_minus_two_for_identical_ones():
    from medxfer.transferability.baselines import gbc

    rng = np.random.default_rng(2)
    base = rng.normal(size=(400, 4))
    labels = np.repeat([0, 1], 200)
    far = base + np.where(labels[:, None] == 1, 1e3, 0.0)
    assert gbc(far, labels) == pytest.approx(0.0, abs=1e-9)
    same = np.concatenate([base[:200], base[:200]])  # both classes the same sample: BC = 1 per ordered pair
    assert gbc(same, labels) == pytest.approx(-2.0)


def test_cc_fv_ratio_by_hand_and_free_of_the_feature_scale():
    from medxfer.transferability.baselines import cc_fv_ratio as cc_fv

    # Two images. Class 1 is e0 in image 0 and e1 in image 1 (Gaussians sqrt(2) apart, no spread);
    # class 0 is e2 in both (distance 0): consistency = sqrt(2) / 2.
    e = np.eye(3)
    feats = np.concatenate([np.repeat(e[[0]], 4, 0), np.repeat(e[[2]], 4, 0),
                            np.repeat(e[[1]], 4, 0), np.repeat(e[[2]], 4, 0)])
    labels = np.array([1] * 4 + [0] * 4 + [1] * 4 + [0] * 4)
    owners = np.repeat([0, 1], 8)
    # Variety: per-axis variances 1/4 * 3/4, 1/4 * 3/4 and 1/2 * 1/2 (shares 4, 4 and 8 of 16 rows).
    variety = math.sqrt(2 * 0.25 * 0.75 + 0.25)
    assert cc_fv(feats, labels, owners) == pytest.approx(-(math.sqrt(2) / 2) / variety)
    assert cc_fv(1000 * feats, labels, owners) == pytest.approx(cc_fv(feats, labels, owners))
    with pytest.raises(DataError, match="at least 2 images"):
        cc_fv(feats, labels, np.zeros(16, int))


# Independent implementations of the papers' formulas (matrix square roots, determinants, explicit sums).
def _regularised_h_score_by_formula(features, labels):
    """Ibrahim et al.: tr(((1 - a) S + a mu I)^-1 (1 - a) S_between), a from sklearn's ledoit_wolf_shrinkage."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    f = features - features.mean(axis=0)
    n, dim = f.shape
    sample = f.T @ f / n
    alpha = ledoit_wolf_shrinkage(f, assume_centered=True)
    shrunk = (1 - alpha) * sample + alpha * np.trace(sample) / dim * np.eye(dim)
    between = sum((labels == c).mean() * np.outer(f[labels == c].mean(0), f[labels == c].mean(0))
                  for c in np.unique(labels))
    return float(np.trace(np.linalg.inv(shrunk) @ ((1 - alpha) * between))), alpha


def test_h_score_with_shrinkage_is_ibrahim_et_al_regularised_h_score():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 120)
    # few samples for 40 dimensions: a large shrinkage, where the (1 - alpha) factor matters
    features = rng.normal(size=(120, 40)) + 0.8 * np.eye(40)[labels * 7] + rng.normal(size=40)
    expected, alpha = _regularised_h_score_by_formula(features, labels)
    assert alpha > 0.1
    assert h_score(features, labels, shrinkage=True) == pytest.approx(expected, rel=1e-8)
    plain = np.cov(features.T, bias=True)
    between = np.cov(np.stack([features[labels == c].mean(0) for c in labels]).T, bias=True)
    assert h_score(features, labels, shrinkage=False) == pytest.approx(np.trace(np.linalg.pinv(plain) @ between),
                                                                       rel=1e-6)


def _bhattacharyya_by_formula(mean_a, cov_a, mean_b, cov_b):
    pooled = (cov_a + cov_b) / 2
    diff = mean_a - mean_b
    return (diff @ np.linalg.solve(pooled, diff) / 8
            + 0.5 * (np.linalg.slogdet(pooled)[1] - 0.5 * (np.linalg.slogdet(cov_a)[1] + np.linalg.slogdet(cov_b)[1])))


@pytest.mark.parametrize("covariance", ["spherical", "diagonal"])
def test_gbc_follows_the_papers_bhattacharyya_distance(covariance):
    from medxfer.transferability.baselines import gbc

    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1, 2], 80)
    features = rng.normal(size=(240, 5)) * (1 + labels[:, None] * np.arange(5)) / 2 + 1.5 * labels[:, None]
    stats = []
    for c in range(3):
        rows = features[labels == c]
        var = rows.var(axis=0)
        cov = np.eye(5) * (var.mean() if covariance == "spherical" else var)
        stats.append((rows.mean(axis=0), cov))
    expected = -sum(math.exp(-_bhattacharyya_by_formula(*stats[i], *stats[j]))
                    for i in range(3) for j in range(3) if i != j)
    assert gbc(features, labels, covariance=covariance) == pytest.approx(expected, rel=1e-9)
    assert gbc(features, labels, covariance="spherical") != pytest.approx(gbc(features, labels, covariance="diagonal"))
    with pytest.raises(Exception, match="unknown covariance"):
        gbc(features, labels, covariance="full")


def _w2_by_formula(rows_a, rows_b):
    from scipy.linalg import sqrtm

    cov_a, cov_b = np.cov(rows_a.T), np.cov(rows_b.T)
    root_a = sqrtm(cov_a)
    cross = np.real(np.trace(sqrtm(root_a @ cov_b @ root_a)))
    squared = np.sum((rows_a.mean(0) - rows_b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    return math.sqrt(max(squared, 0.0))


def _cc_fv_by_formula(features, labels, owners):
    """Yang et al.: log(F_v / C_cons), C_cons over foreground classes, F_v from the images' mean features."""
    images = np.unique(owners)
    consistency = []
    for c in np.unique(labels[labels != 0]):
        per_image = [features[(labels == c) & (owners == i)] for i in images]
        consistency.append(np.mean([_w2_by_formula(a, b) for k, a in enumerate(per_image) for b in per_image[k + 1:]]))
    centres = [features[owners == i].mean(0) for i in images]
    variety = np.mean([1 / math.sqrt(np.sum((a - b) ** 2) + 1e-3) for k, a in enumerate(centres)
                       for b in centres[k + 1:]])
    return math.log(variety / np.mean(consistency))


@pytest.mark.parametrize("per_class", [6, 30])  # fewer rows than dimensions (low-rank covariances), and more
def test_cc_fv_is_the_papers_log_ratio(per_class):
    from medxfer.transferability.baselines import cc_fv

    feats, labels, owners = _pixels_with_known_separability(1.5, n_images=5, per_class=per_class, dim=12)
    assert cc_fv(feats, labels, owners) == pytest.approx(_cc_fv_by_formula(feats, labels, owners), rel=1e-6)


def test_cc_fv_rewards_classes_that_look_alike_across_images():
    from medxfer.transferability.baselines import cc_fv

    rng = np.random.default_rng(7)
    labels = np.tile(np.repeat([0, 1], 40), 6)
    owners = np.repeat(np.arange(6), 80)
    signal = np.where(labels[:, None] == 1, 3.0, 0.0) * np.eye(8)[0] + 0.3 * rng.normal(size=(480, 8))
    shift = rng.normal(size=(6, 8))[owners] * np.where(labels[:, None] == 1, 1.0, 0.0)  # foreground moves per image
    consistent, shifted = cc_fv(signal, labels, owners), cc_fv(signal + shift, labels, owners)
    assert consistent > shifted
    # background is left out of the consistency: moving it alone changes only the variety term
    background_only = signal + rng.normal(size=(6, 8))[owners] * np.where(labels[:, None] == 0, 1.0, 0.0)
    assert _cc_fv_by_formula(background_only, labels, owners) == pytest.approx(cc_fv(background_only, labels, owners))
    with pytest.raises(DataError, match="foreground class"):
        cc_fv(signal, np.where(owners == 0, labels, 0), owners)  # the foreground class in one image only


def test_balanced_sampling_gives_each_class_its_share():
    images, labels = _segmentation_toy(True)
    uniform = pixel_features(MaskEncoder(), images, labels, levels=[0], max_pixels=400, device="cpu")[0][1]
    balanced, owners = pixel_features(MaskEncoder(), images, labels, levels=[0], max_pixels=400, device="cpu",
                                      balanced=True, with_images=True)[0][1:]
    assert np.mean(uniform == 1) < 0.3  # foreground is 36 of 240 annotated pixels
    assert np.mean(balanced == 1) == pytest.approx(0.5)
    assert sorted(np.unique(owners)) == list(range(len(images)))


def test_baseline_scores_rows_for_the_new_estimators():
    good_images, labels = _segmentation_toy(True)
    bad_images, _ = _segmentation_toy(False)
    kwargs = dict(methods=("knn", "gbc", "gbc_diagonal", "ccfv_ratio", "ccfv"), levels=[0], max_pixels=800,
                  device="cpu")
    good = {r["metric"]: r for r in baseline_scores(MaskEncoder(), good_images, labels, 2, **kwargs)}
    bad = {r["metric"]: r for r in baseline_scores(MaskEncoder(), bad_images, labels, 2, **kwargs)}
    assert set(good) == {"knn_accuracy", "gbc", "gbc_diagonal", "cc_fv_ratio", "cc_fv"}
    for metric in set(good) - {"cc_fv"}:  # CC-FV measures consistency across images, not class separation
        assert good[metric]["score"] > bad[metric]["score"], metric
        assert good[metric]["time_s"] > 0 and good[metric]["higher_is_better"]
    with pytest.raises(Exception, match="unknown method"):
        baseline_scores(MaskEncoder(), good_images, labels, 2, methods=("leep",))
