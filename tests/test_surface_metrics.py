"""Hausdorff, ASSD and the normalised surface Dice (NSD); class names in metric keys; input checks;
the provenance each record carries. Known answers first, then the libraries whose conventions agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medxfer.errors import DataError
from medxfer.evaluation.metrics import (
    METRIC_NAMES,
    MetricAccumulator,
    assd,
    binary_metrics,
    class_keys,
    hausdorff,
    metric_provenance,
    segmentation_metrics,
    surface_dice,
    surface_distances,
)


def _square(shape, top_left, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(t, t + s) for t, s in zip(top_left, size))] = True
    return mask


def _ball(shape, centre, radius, spacing=None):
    scale = np.ones(len(shape)) if spacing is None else np.asarray(spacing, float)
    grids = np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, scale)], indexing="ij")
    return sum((g - c * h) ** 2 for g, c, h in zip(grids, centre, scale)) <= radius**2


def _random_blobs(rng, shape, sigma, fraction):
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


# --------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("shift", [1, 3])
def test_shifted_square_hausdorff_and_assd_by_hand(shift):
    a = _square((30, 30), (8, 8), (10, 10))
    b = _square((30, 30), (8, 8 + shift), (10, 10))
    # Every boundary pixel of a moved by `shift` lies on b's boundary: no distance exceeds the shift,
    # and the left column of a (10 pixels) is exactly `shift` from b.
    assert hausdorff(a, b) == pytest.approx(shift)
    d_ab, d_ba = surface_distances(a, b)
    both = np.concatenate([d_ab, d_ba])
    assert assd(a, b) == pytest.approx(both.mean())
    assert assd(a, b) == pytest.approx(assd(b, a))  # symmetric
    assert 0 < assd(a, b) < shift


def test_anisotropic_shift_scales_hausdorff_and_nsd():
    a = _square((12, 30, 30), (3, 8, 8), (5, 10, 10))
    b = _square((12, 30, 30), (4, 8, 8), (5, 10, 10))  # one slice further along axis 0
    spacing = (2.5, 0.7, 0.7)
    assert hausdorff(a, b, spacing) == pytest.approx(2.5)
    # A shift by one slice moves every surfel by 2.5 mm: inside tau = 2.5, not all inside 2.4.
    assert surface_dice(a, b, spacing, tolerance=2.5) == pytest.approx(1.0)
    assert surface_dice(a, b, spacing, tolerance=2.4) < 1.0
    # The same voxel shift along a fine axis (0.7 mm) is inside a 1 mm tolerance.
    c = _square((12, 30, 30), (3, 9, 8), (5, 10, 10))
    assert surface_dice(a, c, spacing, tolerance=1.0) == pytest.approx(1.0)
    assert surface_dice(a, c, spacing, tolerance=0.6) < 1.0


def test_concentric_spheres():
    spacing = (1.0, 1.0, 1.0)
    inner = _ball((40, 40, 40), (20, 20, 20), 8)
    outer = _ball((40, 40, 40), (20, 20, 20), 13)
    # The boundaries are 5 mm apart up to the voxelisation (a voxel diagonal at most).
    assert hausdorff(inner, outer, spacing) == pytest.approx(5.0, abs=math.sqrt(3))
    assert assd(inner, outer, spacing) == pytest.approx(5.0, abs=1.0)
    assert surface_dice(inner, outer, spacing, tolerance=1.0) == 0.0
    assert surface_dice(inner, outer, spacing, tolerance=7.0) == 1.0
    assert surface_dice(inner, inner, spacing, tolerance=0.0) == 1.0


@pytest.mark.parametrize("shift", [1, 2, 4])
def test_shifted_square_nsd_is_one_exactly_from_tau_equal_shift(shift):
    a = _square((40, 40), (10, 10), (15, 15))
    b = _square((40, 40), (10, 10 + shift), (15, 15))
    assert surface_dice(a, b, tolerance=shift) == pytest.approx(1.0)
    below = surface_dice(a, b, tolerance=shift - 0.5)
    assert 0.0 < below < 1.0


def test_nsd_edge_cases():
    empty = np.zeros((10, 10), bool)
    blob = _square((10, 10), (3, 3), (3, 3))
    assert surface_dice(empty, empty) == 1.0
    assert surface_dice(blob, empty) == 0.0
    assert surface_dice(empty, blob) == 0.0
    with pytest.raises(DataError, match="tolerance"):
        surface_dice(blob, blob, tolerance=-1.0)
    with pytest.raises(DataError, match="2-D or 3-D"):
        surface_dice(np.ones((2, 2, 2, 2), bool), np.ones((2, 2, 2, 2), bool))


def test_distance_edge_cases_in_binary_metrics():
    m = binary_metrics(np.full((6, 6), 0.1), np.zeros((6, 6), int))
    assert (m["hausdorff distance"], m["assd"], m["nsd"]) == (0.0, 0.0, 1.0)
    prob = np.zeros((6, 6))
    prob[2, 2] = 0.8
    m = binary_metrics(prob, np.zeros((6, 6), int))
    assert math.isnan(m["hausdorff distance"]) and math.isnan(m["assd"]) and m["nsd"] == 0.0


def test_nsd_tolerance_reaches_binary_and_segmentation_metrics():
    gt = _square((30, 30), (8, 8), (10, 10))
    prob = _square((30, 30), (8, 10), (10, 10)).astype(float)
    loose = binary_metrics(prob, gt, nsd_tolerance=2.0)["nsd"]
    tight = binary_metrics(prob, gt, nsd_tolerance=0.5)["nsd"]
    assert loose == pytest.approx(1.0) and tight < 1.0
    result = segmentation_metrics(prob, gt.astype(np.int64), n_classes=2, spacing=(0.25, 0.25), nsd_tolerance=0.5)
    assert result["nsd"] == pytest.approx(1.0)  # 2 pixels = 0.5 mm


# --------------------------------------------------------------------------- against the libraries
def test_hausdorff_and_assd_match_medpy():
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(11)
    for shape, spacing in [((48, 48), None), ((12, 22, 20), (3.0, 1.0, 0.8))]:
        for _ in range(2):
            gt = _random_blobs(rng, shape, 2.0, 0.2)
            pred = _random_blobs(rng, shape, 2.0, 0.2) | gt & (rng.random(shape) < 0.5)
            assert hausdorff(pred, gt, spacing) == pytest.approx(binary.hd(pred, gt, spacing))
            assert assd(pred, gt, spacing) == pytest.approx(binary.assd(pred, gt, spacing))


def test_hausdorff_and_assd_match_monai():
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(12)
    for shape, spacing in [((40, 44), (1.0, 1.0)), ((14, 18, 16), (2.0, 1.0, 0.7))]:
        # MONAI's boundary equals medpy's away from the image border; keep the masks inside it
        inside = np.zeros(shape, bool)
        inside[tuple(slice(2, n - 2) for n in shape)] = True
        gt = _random_blobs(rng, shape, 2.0, 0.2) & inside
        pred = _random_blobs(rng, shape, 2.0, 0.2) & inside
        t = [torch.from_numpy(m)[None, None] for m in (pred, gt)]
        hd = float(monai_metrics.compute_hausdorff_distance(*t, include_background=True, spacing=spacing)[0, 0])
        asd = float(monai_metrics.compute_average_surface_distance(
            *t, include_background=True, symmetric=True, spacing=spacing)[0, 0])
        assert hausdorff(pred, gt, spacing) == pytest.approx(hd, rel=1e-5)
        assert assd(pred, gt, spacing) == pytest.approx(asd, rel=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_matches_monai_subvoxel_surface_dice(ndim):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(20 + ndim)
    shape = (36, 40) if ndim == 2 else (16, 20, 18)
    for _ in range(4):
        gt = _random_blobs(rng, shape, 2.0, 0.25)
        pred = _random_blobs(rng, shape, 2.0, 0.25)
        spacing = tuple(float(s) for s in rng.uniform(0.5, 2.5, ndim))
        tau = float(rng.uniform(0.0, 3.0))
        t = [torch.from_numpy(m)[None, None] for m in (pred, gt)]
        expected = float(monai_metrics.compute_surface_dice(*t, [tau], include_background=True, spacing=spacing,
                                                            use_subvoxels=True)[0, 0])
        assert surface_dice(pred, gt, spacing, tau) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------ input validation
@pytest.mark.parametrize("bad", [np.nan, 0.3])
def test_float_targets_must_be_exactly_binary(bad):
    target = np.zeros((8, 8))
    target[2:5, 2:5] = 1.0
    target[0, 0] = bad
    with pytest.raises(DataError, match="binary"):
        binary_metrics(np.zeros((8, 8)), target)
    with pytest.raises(DataError, match="binary"):
        surface_distances(np.zeros((8, 8), bool), target)
    with pytest.raises(DataError, match="binary"):
        surface_dice(target, np.zeros((8, 8), bool))
    target[0, 0] = 0.0  # exact 0.0/1.0 floats are fine
    assert binary_metrics(np.zeros((8, 8)), target)["sensitivity"] == 0.0


# ---------------------------------------------------------------------------------- class names
def test_class_names_name_the_per_class_and_pooled_keys():
    target = np.zeros((12, 12), np.int64)
    target[1:5, 1:5], target[6:10, 6:10] = 1, 2
    probs = np.stack([target == c for c in range(3)]).astype(np.float32)
    result = segmentation_metrics(probs, target, n_classes=3, class_names=["background", "RV", "LV"])
    assert result["dice index/RV"] == 1.0 and result["nsd/LV"] == 1.0
    assert not any(key.endswith("class_1") for key in result if key != "confusion")
    accumulator = MetricAccumulator(["background", "RV", "LV"])
    accumulator.add(result)
    summary = accumulator.summary()
    assert summary["pooled"]["dice index/LV"] == 1.0
    assert "hausdorff distance/RV" in summary["per_image_mean"]
    unnamed = segmentation_metrics(probs, target, n_classes=3)
    assert unnamed["dice index/class_2"] == 1.0


def test_unusable_class_names_are_rejected():
    assert class_keys(3) == ["class_0", "class_1", "class_2"]
    for names in (["bg", "a"], ["bg", "a", "a"], ["bg", "", "b"]):
        with pytest.raises(DataError, match="class_names"):
            class_keys(3, names)


# ----------------------------------------------------------------------------------- provenance
def test_provenance_covers_every_metric():
    provenance = metric_provenance(nsd_tolerance=2.0, spacing_known=False)
    assert set(provenance) == set(METRIC_NAMES)
    assert all(entry["implementation"].startswith("medxfer ") and entry["convention"]
               for entry in provenance.values())
    assert provenance["nsd"]["tolerance"] == 2.0 and "monai" in provenance["nsd"]["implementation"]
    assert provenance["hd95"]["unit"].startswith("pixels")
    assert metric_provenance(spacing_known=True)["assd"]["unit"].startswith("mm")


def test_evaluate_cases_names_classes_and_records_provenance():
    torch = pytest.importorskip("torch")
    from medxfer.data.base import Case
    from medxfer.evaluation.evaluate import evaluate_cases

    class LabelEcho(torch.nn.Module):
        """Logits that reproduce the label map stored in the image: a perfect 3-class model."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(20.0))

        def forward(self, x):
            return self.scale * torch.nn.functional.one_hot(x[:, 0].round().long(), 3).permute(0, 3, 1, 2).float()

    label = np.zeros((16, 16), np.int64)
    label[2:6, 2:6], label[8:14, 8:14] = 1, 2
    cases = [Case(image=label[None].astype(np.float32), label=label, case_id="c0", spacing=(0.5, 0.5))]
    evaluation = evaluate_cases(LabelEcho(), cases, 3, normalization="none", nsd_tolerance=0.25,
                                class_names=["background", "RV", "LV"])
    means = evaluation.summary["per_image_mean"]
    assert means["dice index/LV"] == 1.0 and means["nsd/RV"] == 1.0 and means["hausdorff distance/LV"] == 0.0
    assert evaluation.summary["pooled"]["dice index/RV"] == 1.0
    provenance = evaluation.summary["provenance"]
    assert provenance["nsd"]["tolerance"] == 0.25 and provenance["assd"]["unit"].startswith("mm")
    with pytest.raises(DataError, match="class_names"):
        evaluate_cases(LabelEcho(), cases, 3, normalization="none", class_names=["background", "RV"])


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_matches_deepminds_surface_distance_package(ndim):
    deepmind = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(40 + ndim)
    shape = (36, 40) if ndim == 2 else (16, 20, 18)
    for _ in range(4):
        gt = _random_blobs(rng, shape, 2.0, 0.25)
        pred = _random_blobs(rng, shape, 2.0, 0.25)
        spacing = tuple(float(s) for s in rng.uniform(0.5, 2.5, ndim))
        tau = float(rng.uniform(0.0, 3.0))
        expected = deepmind.compute_surface_dice_at_tolerance(
            deepmind.compute_surface_distances(gt, pred, spacing), tau)
        assert surface_dice(pred, gt, spacing, tau) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("step", [0.3, 0.7])
def test_nsd_matches_deepmind_when_tau_is_a_distance_that_occurs(ndim, step):
    # Boxes several voxels apart: their distances reach past the shell search into the KD-tree, and at
    # spacings that are not binary fractions i * s - j * s differs from (i - j) * s in the last bit; with
    # tau equal to such a distance that bit decides whether whole surfel rows count (3e-3 to 3e-2 here; the
    # tolerance 1e-6 is that of the test above: MONAI's 3-D surfel areas are single precision).
    deepmind = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(int(step * 10) + ndim)
    shape = (30, 32) if ndim == 2 else (14, 16, 15)
    for spacing in ((step,) * ndim, (step, 2 * step) + (step,) * (ndim - 2)):
        gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
        corner = rng.integers(2, 5, ndim)
        gt[tuple(slice(c, c + 6) for c in corner)] = True
        shift = rng.integers(3, 6, ndim)
        pred[tuple(slice(c + s, c + s + 5) for c, s in zip(corner, shift))] = True
        distances = deepmind.compute_surface_distances(gt, pred, spacing)
        occurring = np.unique(np.concatenate([distances["distances_gt_to_pred"], distances["distances_pred_to_gt"]]))
        for tau in occurring[::3]:
            expected = deepmind.compute_surface_dice_at_tolerance(distances, float(tau))
            assert surface_dice(pred, gt, spacing, float(tau)) == pytest.approx(expected, abs=1e-6), (spacing, tau)


def test_single_voxels_apart_exact_answers_with_anisotropic_spacing():
    # Two single voxels two slices apart along an axis of spacing 0.5 mm: both boundaries are one voxel,
    # 1 mm apart. Surfels: the 8 corners of each voxel, all of equal area (one voxel inside each corner
    # neighbourhood); the 4 facing corners of each voxel are 0.5 mm from the other's, the far 4 are 1 mm.
    a = np.zeros((5, 5, 8), bool)
    b = np.zeros((5, 5, 8), bool)
    a[2, 2, 2], b[2, 2, 4] = True, True
    spacing = (1.0, 1.5, 0.5)
    assert hausdorff(a, b, spacing) == pytest.approx(1.0) and assd(a, b, spacing) == pytest.approx(1.0)
    assert surface_dice(a, b, spacing, tolerance=0.4) == pytest.approx(0.0)
    assert surface_dice(a, b, spacing, tolerance=0.5) == pytest.approx(0.5)
    assert surface_dice(a, b, spacing, tolerance=1.0) == pytest.approx(1.0)
