"""The metric suite: hand-computed values, edge cases, and agreement with independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist
from sklearn import metrics as skm

from medxfer.errors import DataError
from medxfer.evaluation import metrics as metrics_module
from medxfer.evaluation.metrics import (
    METRIC_NAMES,
    MetricAccumulator,
    binary_metrics,
    boundary,
    hd95,
    modified_hausdorff,
    roc_auc_and_average_precision,
    segmentation_metrics,
    surface_distances,
)

nan = float("nan")


def _check(metrics: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(metrics[key]), f"{key}: expected NaN, got {metrics[key]}"
        else:
            assert metrics[key] == pytest.approx(value, abs=1e-12), key


def _reference_distances(pred, gt, spacing=None):
    """Brute force: boundary by scipy's binary_erosion (cross element, outside = background), then all
    pairwise distances between boundary points."""
    scale = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, float)
    cross = ndimage.generate_binary_structure(pred.ndim, 1)
    bp = np.argwhere(pred & ~ndimage.binary_erosion(pred, cross)) * scale
    bg = np.argwhere(gt & ~ndimage.binary_erosion(gt, cross)) * scale
    d = cdist(bp, bg)
    return d.min(axis=1), d.min(axis=0)


def _random_blobs(rng, shape, sigma, fraction):
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


# ----------------------------------------------------------------------------- hand-computed values
def test_hand_computed_confusion_metrics():
    # 4x4 image: gt = left half (8 px); prediction = left 3 columns of the top 2 rows + 1 stray pixel.
    target = np.zeros((4, 4), int)
    target[:, :2] = 1
    prob = np.full((4, 4), 0.2)
    prob[:2, :3] = 0.9
    prob[3, 3] = 0.7
    m = binary_metrics(prob, target)
    tp, fp, fn, tn = 4, 3, 4, 5
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    _check(m, {"accuracy": 9 / 16, "sensitivity": 0.5, "specificity": 5 / 8, "precision": 4 / 7,
               "balanced accuracy": (0.5 + 5 / 8) / 2, "dice index": 8 / 15, "jaccard index": 4 / 11,
               "mcc": mcc})
    assert set(m) == set(METRIC_NAMES)


def test_threshold_is_strict():
    target = np.array([[1, 0]])
    m = binary_metrics(np.array([[0.5, 0.0]]), target)  # 0.5 is not above 0.5: nothing predicted
    assert m["dice index"] == 0.0
    m = binary_metrics(np.array([[0.5, 0.0]]), target, threshold=0.4)
    assert m["dice index"] == 1.0
    # a two-channel softmax tie is background, as argmax would say
    probs = np.array([[[0.5, 1.0]], [[0.5, 0.0]]])
    assert probs.argmax(0)[0, 0] == 0
    assert segmentation_metrics(probs, target, n_classes=2)["confusion"]["class_1"]["fn"] == 1


def test_auc_and_ap_by_hand():
    # positives 0.9, 0.4; negatives 0.8, 0.4 (tie), 0.1.
    scores = np.array([0.9, 0.4, 0.8, 0.4, 0.1])
    labels = np.array([1, 1, 0, 0, 0], bool)
    auc, ap = roc_auc_and_average_precision(scores, labels)
    # pairs (pos, neg): 0.9 beats all 3; 0.4 beats 0.1, ties 0.4, loses to 0.8 -> (3 + 1.5) / 6
    assert auc == pytest.approx(4.5 / 6)
    # thresholds 0.9 (P=1, R=1/2), 0.8 (R unchanged), 0.4 (P=2/4, R=1): AP = 1/2*1 + 1/2*1/2
    assert ap == pytest.approx(0.75)


# -------------------------------------------------------------------------------------- edge cases
def test_both_empty():
    m = binary_metrics(np.full((6, 6), 0.1), np.zeros((6, 6), int))
    _check(m, {"dice index": 1.0, "jaccard index": 1.0, "hd95": 0.0, "modified hausdorff distance": 0.0,
               "accuracy": 1.0, "specificity": 1.0, "balanced accuracy": 1.0, "mcc": 1.0,
               "sensitivity": nan, "precision": nan, "area under roc": nan, "average precision score": nan})


def test_empty_ground_truth_nonempty_prediction():
    prob = np.zeros((6, 6))
    prob[2, 2] = 0.8
    m = binary_metrics(prob, np.zeros((6, 6), int))
    _check(m, {"dice index": 0.0, "jaccard index": 0.0, "precision": 0.0, "sensitivity": nan,
               "specificity": 35 / 36, "balanced accuracy": 35 / 36, "mcc": 0.0,
               "hd95": nan, "modified hausdorff distance": nan,
               "area under roc": nan, "average precision score": nan})


def test_empty_prediction_nonempty_ground_truth():
    target = np.zeros((4, 4), int)
    target[0, :2] = 1  # 2 positives
    prob = np.zeros((4, 4))
    prob[0, 0] = 0.3  # below threshold but the highest score
    prob[0, 1] = 0.2  # ties with 1 negative
    prob[3, 3] = 0.2
    m = binary_metrics(prob, target)
    # 14 negatives: 13 at 0.0 and one at 0.2; positive 0.3 beats 14, positive 0.2 beats 13, ties 1
    # AP: threshold 0.3 -> P=1, R=1/2; threshold 0.2 -> P=2/3, R=1
    _check(m, {"dice index": 0.0, "jaccard index": 0.0, "sensitivity": 0.0, "precision": nan,
               "mcc": 0.0, "hd95": nan, "modified hausdorff distance": nan,
               "area under roc": (14 + 13.5) / 28, "average precision score": 0.5 + 0.5 * 2 / 3})


def test_single_class_ground_truth_and_mcc_zero_denominator():
    target = np.ones((3, 3), int)
    exact = binary_metrics(np.full((3, 3), 0.9), target)
    _check(exact, {"mcc": 1.0, "dice index": 1.0, "specificity": nan, "balanced accuracy": 1.0,
                   "area under roc": nan, "average precision score": nan, "hd95": 0.0})
    prob = np.full((3, 3), 0.9)
    prob[1, 1] = 0.1
    partial = binary_metrics(prob, target)  # tn + fp = 0: denominator 0, not exact -> 0
    _check(partial, {"mcc": 0.0, "sensitivity": 8 / 9, "dice index": 16 / 17})
    # compare with sklearn where it is defined: it returns 0 for every zero denominator
    assert skm.matthews_corrcoef(target.ravel(), (prob > 0.5).ravel()) == 0.0


def test_single_pixel_objects():
    pred = np.zeros((10, 10), bool)
    gt = np.zeros((10, 10), bool)
    pred[2, 3] = True
    gt[5, 7] = True  # a 3-4-5 triangle away
    assert hd95(pred, gt) == pytest.approx(5.0)
    assert modified_hausdorff(pred, gt) == pytest.approx(5.0)
    assert hd95(pred, gt, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(6, 4))
    assert boundary(pred).sum() == 1  # a single pixel is its own boundary
    m = binary_metrics(pred.astype(float), pred)
    _check(m, {"dice index": 1.0, "hd95": 0.0, "modified hausdorff distance": 0.0})


def test_no_annotated_pixel_gives_nan_everywhere():
    target = np.full((4, 4), 255)
    result = segmentation_metrics(np.full((4, 4), 0.9), target, n_classes=2)
    assert all(math.isnan(result[name]) for name in METRIC_NAMES)


# ------------------------------------------------------------------------------ known geometry
def test_offset_squares_hand_computed():
    # 6x6 squares, the second shifted by k=2 columns. A->B: the left column (6 px) is 2 away, the two
    # top/bottom pixels of column 1 are 1 away, the 8 pixels of the top/bottom rows from column 2 on
    # lie on B's boundary (0), and the 4 inner pixels of the right column are 1, 2, 2, 1 from B's
    # top/bottom/right edges: mean (12 + 2 + 6) / 20 = 1; B->A by symmetry. 16 of 40 distances are 2.
    a = np.zeros((12, 14), bool)
    a[3:9, 3:9] = True
    b = np.roll(a, 2, axis=1)
    d_ab, d_ba = surface_distances(a, b)
    assert len(d_ab) == len(d_ba) == 20
    assert d_ab.mean() == pytest.approx(1.0) and d_ba.mean() == pytest.approx(1.0)
    assert hd95(a, b) == pytest.approx(2.0)
    assert modified_hausdorff(a, b) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_offset_squares_hd95_equals_offset(k):
    a = np.zeros((40, 40), bool)
    a[5:25, 5:25] = True
    b = np.roll(a, k, axis=0)
    assert hd95(a, b) == pytest.approx(k)
    ref_ab, ref_ba = _reference_distances(a, b)
    assert modified_hausdorff(a, b) == pytest.approx(max(ref_ab.mean(), ref_ba.mean()))


def test_anisotropic_3d_offset_scales_with_spacing():
    a = np.zeros((16, 20, 20), bool)
    a[4:10, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=0)  # 2 slices along the anisotropic axis
    spacing = (3.0, 0.7, 0.7)
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing) == pytest.approx(6.0)
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(6.0)
    ref_ab, ref_ba = _reference_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(ref_ab))
    np.testing.assert_allclose(np.sort(d_ba), np.sort(ref_ba))
    # a shift along an in-plane axis scales by the in-plane spacing instead
    c = np.roll(a, 2, axis=2)
    assert hd95(a, c, spacing) == pytest.approx(1.4)


def test_touching_image_border_counts_as_boundary():
    a = np.ones((5, 5), bool)
    assert boundary(a).sum() == 16  # outside the image is background (medpy's convention)


# --------------------------------------------------------------------- independent implementations
@pytest.mark.parametrize("seed", range(4))
def test_confusion_and_ranking_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    target = _random_blobs(rng, (48, 40), 3, 0.25).astype(int)
    prob = np.clip(ndimage.gaussian_filter(target + rng.normal(0, 0.8, target.shape), 1.5), 0, 1)
    if seed % 2:
        prob = np.round(prob, 1)  # many ties
    m = binary_metrics(prob, target)
    y, p = target.ravel(), (prob > 0.5).ravel().astype(int)
    _check(m, {
        "accuracy": skm.accuracy_score(y, p),
        "balanced accuracy": skm.balanced_accuracy_score(y, p),
        "sensitivity": skm.recall_score(y, p),
        "specificity": skm.recall_score(y, p, pos_label=0),
        "precision": skm.precision_score(y, p),
        "dice index": skm.f1_score(y, p),
        "jaccard index": skm.jaccard_score(y, p),
        "mcc": skm.matthews_corrcoef(y, p),
    })
    assert m["area under roc"] == pytest.approx(skm.roc_auc_score(y, prob.ravel()), abs=1e-12)
    assert m["average precision score"] == pytest.approx(skm.average_precision_score(y, prob.ravel()),
                                                         abs=1e-12)


@pytest.mark.parametrize("split_max_size", [0, 10**9])  # all scores sorted at once / negatives apart
@pytest.mark.parametrize("rounding", [None, 1, 2])  # continuous scores, and many ties
def test_auc_and_ap_both_sort_strategies_match_sklearn(monkeypatch, split_max_size, rounding):
    monkeypatch.setattr(metrics_module, "_SPLIT_SORT_MAX_SIZE", split_max_size)
    rng = np.random.default_rng(7)
    labels = rng.random(3000) < 0.3
    scores = np.clip(labels * 0.3 + rng.normal(0.35, 0.25, labels.size), 0, 1).astype(np.float32)
    if rounding is not None:
        scores = np.round(scores, rounding)
    auc, ap = roc_auc_and_average_precision(scores, labels)
    assert auc == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert ap == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    if seed < 3:
        shape, spacing = (40, 48), [None, (1.0, 1.0), (0.5, 1.3)][seed]
    else:
        shape, spacing = (14, 18, 16), [None, (2.5, 1.0, 1.0), (1.0, 0.6, 0.9)][seed - 3]
    gt = _random_blobs(rng, shape, 2.5, 0.2)
    pred = _random_blobs(rng, shape, 2.5, 0.15) if seed % 2 else ndimage.binary_dilation(gt) ^ (
        rng.random(shape) < 0.02)
    pred[(0,) * len(shape)] = True  # an isolated pixel in a corner, far from gt: reaches the KD-tree
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    ref_pg, ref_gp = _reference_distances(pred, gt, spacing)
    np.testing.assert_allclose(np.sort(d_pg), np.sort(ref_pg), rtol=1e-9)
    np.testing.assert_allclose(np.sort(d_gp), np.sort(ref_gp), rtol=1e-9)
    assert hd95(pred, gt, spacing) == pytest.approx(np.percentile(np.r_[ref_pg, ref_gp], 95))
    assert modified_hausdorff(pred, gt, spacing) == pytest.approx(max(ref_pg.mean(), ref_gp.mean()))


def test_far_apart_objects_use_exact_fallback():
    a = np.zeros((30, 60), bool)
    b = np.zeros((30, 60), bool)
    a[5:15, 2:10] = True
    b[10:25, 40:58] = True
    ref_ab, ref_ba = _reference_distances(a, b)
    d_ab, d_ba = surface_distances(a, b)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(ref_ab))
    np.testing.assert_allclose(np.sort(d_ba), np.sort(ref_ba))


def test_hd95_matches_medpy():
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(7)
    for shape, spacing in [((50, 50), None), ((12, 20, 20), (3.0, 1.0, 0.8))]:
        for _ in range(2):
            gt = _random_blobs(rng, shape, 2.0, 0.2)
            pred = _random_blobs(rng, shape, 2.0, 0.2) | gt & (rng.random(shape) < 0.5)
            assert hd95(pred, gt, spacing) == pytest.approx(binary.hd95(pred, gt, spacing))
            assert modified_hausdorff(pred, gt, spacing) == pytest.approx(
                max(binary.asd(pred, gt, spacing), binary.asd(gt, pred, spacing)))


# ------------------------------------------------------------------------ segmentation_metrics
def test_binary_input_forms_agree():
    rng = np.random.default_rng(3)
    target = _random_blobs(rng, (20, 24), 2, 0.3).astype(np.int64)
    fg = np.clip(target * 0.7 + rng.random(target.shape) * 0.4, 0, 1)
    two_channel = np.stack([1 - fg, fg])
    a = segmentation_metrics(fg, target, n_classes=2)
    b = segmentation_metrics(fg[None], target, n_classes=2)
    c = segmentation_metrics(two_channel, target, n_classes=2)
    direct = binary_metrics(fg, target)
    for name in METRIC_NAMES:
        assert a[name] == b[name] == pytest.approx(c[name]) == pytest.approx(direct[name])
    assert a["mean dice index"] == a["dice index"] and a["mean jaccard index"] == a["jaccard index"]
    tp = int(((fg > 0.5) & (target == 1)).sum())
    assert a["confusion"]["class_1"]["tp"] == tp


def test_multiclass_per_class_and_mean():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 3, size=(16, 18))
    target[:4] = 0
    logits = rng.normal(size=(3, 16, 18)) + 2.0 * np.eye(3)[target].transpose(2, 0, 1)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    result = segmentation_metrics(probs, target, n_classes=3)
    argmax = probs.argmax(0)
    for c in (1, 2):
        y, p = (target == c).ravel(), (argmax == c).ravel()
        assert result[f"dice index/class_{c}"] == pytest.approx(skm.f1_score(y, p))
        assert result[f"jaccard index/class_{c}"] == pytest.approx(skm.jaccard_score(y, p))
        assert result[f"mcc/class_{c}"] == pytest.approx(skm.matthews_corrcoef(y, p))
        assert result[f"area under roc/class_{c}"] == pytest.approx(skm.roc_auc_score(y, probs[c].ravel()))
        assert result[f"hd95/class_{c}"] == pytest.approx(hd95(argmax == c, target == c))
    for name in METRIC_NAMES:
        assert result[f"mean {name}"] == pytest.approx(
            (result[f"{name}/class_1"] + result[f"{name}/class_2"]) / 2)
    assert "dice index" not in result and "dice index/class_0" not in result


def test_ignore_index_excludes_pixels():
    rng = np.random.default_rng(11)
    target = _random_blobs(rng, (24, 24), 2, 0.3).astype(np.int64)
    prob = np.clip(target * 0.6 + rng.random(target.shape) * 0.5, 0, 1)
    ignored = np.zeros_like(target, bool)
    ignored[:, 16:] = True
    labelled = np.where(ignored, 255, target)
    result = segmentation_metrics(prob, labelled, n_classes=2)
    # whatever is predicted in the ignored region changes nothing
    other = prob.copy()
    other[ignored] = rng.random(int(ignored.sum()))
    assert segmentation_metrics(other, labelled, n_classes=2) == result
    # confusion/ranking metrics equal those over the annotated pixels only
    keep = ~ignored
    y, p = target[keep], (prob[keep] > 0.5).astype(int)
    assert result["dice index"] == pytest.approx(skm.f1_score(y, p))
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert result["area under roc"] == pytest.approx(skm.roc_auc_score(y, prob[keep]))
    counts = result["confusion"]["class_1"]
    assert sum(counts.values()) == keep.sum()
    # distances: masks restricted to the annotated pixels
    assert result["hd95"] == pytest.approx(hd95((prob > 0.5) & keep, (target == 1) & keep))


def test_3d_anisotropic_segmentation():
    target = np.zeros((10, 16, 16), np.int64)
    target[3:7, 4:12, 4:12] = 1
    prob = np.roll(target, 1, axis=0).astype(np.float32) * 0.9
    m = segmentation_metrics(prob, target, n_classes=2, spacing=(2.5, 0.8, 0.8))
    assert m["hd95"] == pytest.approx(2.5)
    assert m["dice index"] == pytest.approx(2 * 3 * 64 / (2 * 4 * 64))


def test_bad_inputs_raise_data_error():
    target = np.zeros((4, 4), np.int64)
    with pytest.raises(DataError):
        segmentation_metrics(np.zeros((3, 4)), target, n_classes=2)  # shape mismatch
    with pytest.raises(DataError):
        segmentation_metrics(np.full((4, 4), 3.0), target, n_classes=2)  # logits, not probabilities
    with pytest.raises(DataError, match=r"labels \[4\] outside 0..1"):
        segmentation_metrics(np.zeros((4, 4)), target + 4, n_classes=2)  # label out of range
    with pytest.raises(DataError, match=r"labels \[-1\] outside"):
        segmentation_metrics(np.zeros((4, 4)), target - 1, n_classes=2)
    mixed = target.copy()
    mixed[0, 0], mixed[1, 1] = 255, 7  # ignored pixels do not hide a bad label
    with pytest.raises(DataError, match=r"labels \[7\] outside"):
        segmentation_metrics(np.zeros((4, 4)), mixed, n_classes=2)
    mixed[1, 1] = 1
    assert sum(segmentation_metrics(np.zeros((4, 4)), mixed, n_classes=2)["confusion"]["class_1"].values()) == 15
    with pytest.raises(DataError):
        segmentation_metrics(np.zeros((2, 4, 4)), target, n_classes=3)  # wrong channel count
    with pytest.raises(DataError):
        binary_metrics(np.zeros((4, 4)), target, spacing=(1.0, 1.0, 1.0))  # spacing per axis
    with pytest.raises(DataError, match="NaN or infinite"):
        binary_metrics(np.full((4, 4), np.nan), target)
    with pytest.raises(DataError, match="NaN or infinite"):
        binary_metrics(np.where(np.eye(4) > 0, np.inf, 0.5), target)


# ------------------------------------------------------------------------------- aggregation
def test_accumulator_pooled_per_image_and_nan_counts():
    acc = MetricAccumulator()
    target_a = np.zeros((4, 4), np.int64)
    target_a[:2] = 1  # 8 positives, predicted exactly
    acc.add(segmentation_metrics(target_a * 0.9, target_a, n_classes=2))
    target_b = np.zeros((4, 4), np.int64)
    prob_b = np.zeros((4, 4))
    prob_b[0, 0] = 0.9  # gt empty, 1 false positive: hd95 NaN, dice 0
    acc.add(segmentation_metrics(prob_b, target_b, n_classes=2))
    summary = acc.summary()
    assert summary["n_images"] == 2
    assert summary["per_image_mean"]["dice index"] == pytest.approx(0.5)
    assert summary["per_image_mean"]["hd95"] == 0.0  # only the first image has one
    assert summary["nan_counts"]["hd95"] == 1 and summary["nan_counts"]["dice index"] == 0
    assert summary["nan_counts"]["sensitivity"] == 1
    # pooled: tp=8, fp=1, fn=0, tn=7+15
    pooled = summary["pooled"]
    assert pooled["dice index"] == pytest.approx(16 / 17)
    assert pooled["precision"] == pytest.approx(8 / 9)
    assert pooled["accuracy"] == pytest.approx(31 / 32)
    assert "hd95" not in pooled and "area under roc" not in pooled


def test_accumulator_multiclass_pooled_keys_and_all_nan():
    acc = MetricAccumulator()
    target = np.zeros((6, 6), np.int64)
    target[:3, :3] = 1
    probs = np.eye(3)[target].transpose(2, 0, 1) * 0.8 + 0.2 / 3
    for _ in range(2):
        acc.add(segmentation_metrics(probs, target, n_classes=3))
    summary = acc.summary()
    # class 2 is absent in both images: Dice 1 by convention, sensitivity undefined everywhere
    assert summary["per_image_mean"]["dice index/class_2"] == 1.0
    assert math.isnan(summary["per_image_mean"]["sensitivity/class_2"])
    assert summary["nan_counts"]["sensitivity/class_2"] == 2
    assert summary["pooled"]["dice index/class_1"] == 1.0
    assert summary["pooled"]["mean dice index"] == 1.0
    with pytest.raises(DataError):
        acc.add(segmentation_metrics(target * 0.9, target.clip(0, 1), n_classes=2))
