"""The metric suite against medpy + scikit-learn, as the published reference code computes it.

medxfer: ``segmentation_metrics`` (all fifteen metrics: HD95, Hausdorff, ASSD, modified Hausdorff, NSD,
AUC and AP included) plus ``MetricAccumulator.add`` per image. Reference: ``medpy.metric.binary`` dc, jc, hd95, sensitivity,
specificity, precision on the thresholded mask, and scikit-learn ``roc_auc_score`` /
``average_precision_score`` on the probabilities. The reference computes 8 metrics, medxfer 15, so the
ratio is conservative. A second comparison: medxfer's NSD (``surface_dice``) against MONAI's
``compute_surface_dice(use_subvoxels=True)`` (the same area-weighted definition) on the same masks. Inputs: seeded blob masks with an imperfect blurred "prediction" (Dice ~0.8).
Shared metrics must agree (allclose).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from common import NOTES_KEY, blob_pair, in_turn, row, write_result

TARGET = 10.0
SHARED = {"dice index": "dc", "jaccard index": "jc", "hd95": "hd95", "sensitivity": "sensitivity",
          "specificity": "specificity", "precision": "precision", "area under roc": "roc_auc",
          "average precision score": "average_precision"}
CASES = [("100 masks 256x256", (256, 256), 100, 4), ("10 volumes 128^3", (128, 128, 128), 10, 2)]


def make_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return [blob_pair(shape, seed * 10_000 + i) for i in range(n)]


def medxfer_suite(prob: np.ndarray, gt: np.ndarray, accumulator=None) -> dict[str, Any]:
    from medxfer.evaluation.metrics import segmentation_metrics

    result = segmentation_metrics(prob, gt, n_classes=2)  # the same boolean mask the reference gets
    if accumulator is not None:
        accumulator.add(result)
    return result


def reference_suite(prob: np.ndarray, gt: np.ndarray, parts: dict[str, float] | None = None) -> dict[str, float]:
    """What the published reference code computes per image (medpy + scikit-learn)."""
    from medpy.metric import binary
    from sklearn.metrics import average_precision_score, roc_auc_score

    clock = time.perf_counter
    t0 = clock()
    pred = prob > 0.5
    out = {"dc": binary.dc(pred, gt), "jc": binary.jc(pred, gt), "sensitivity": binary.sensitivity(pred, gt),
           "specificity": binary.specificity(pred, gt), "precision": binary.precision(pred, gt)}
    t1 = clock()
    out["hd95"] = binary.hd95(pred, gt)
    t2 = clock()
    labels, scores = gt.ravel(), prob.ravel()
    out["roc_auc"] = roc_auc_score(labels, scores)
    out["average_precision"] = average_precision_score(labels, scores)
    t3 = clock()
    if parts is not None:
        parts["confusion (dc, jc, sens, spec, prec)"] += t1 - t0
        parts["hd95 (2 x distance_transform_edt)"] += t2 - t1
        parts["roc_auc + average_precision (sklearn)"] += t3 - t2
    return out


def medxfer_breakdown(inputs) -> dict[str, float]:
    """Time of each part of medxfer's suite, called through its public functions (one pass)."""
    from medxfer.evaluation import metrics as m

    parts: dict[str, float] = defaultdict(float)
    clock = time.perf_counter
    for prob, gt in inputs:
        t0 = clock()
        scores = m._as_scores(prob)  # the input checks segmentation_metrics does (finite, in [0, 1])
        _ = int(gt.min()), int(gt.max())
        pred, mask = scores > 0.5, gt == 1
        t1 = clock()
        m.confusion_counts(pred, mask)
        t2 = clock()
        m.surface_distances(pred, mask)
        t3 = clock()
        m.roc_auc_and_average_precision(scores, mask)
        t4 = clock()
        m.surface_dice(pred, mask)
        t5 = clock()
        parts["input checks + masks"] += t1 - t0
        parts["confusion"] += t2 - t1
        parts["surface distances (HD95, HD, ASSD, MHD)"] += t3 - t2
        parts["AUC + AP"] += t4 - t3
        parts["NSD"] += t5 - t4
    return dict(parts)


def compare(inputs, repeat: int) -> dict[str, Any]:
    """Both suites over ``inputs``, interleaved per image (A B A B), best time per image and side."""
    from medxfer.evaluation.metrics import MetricAccumulator

    best_medxfer = np.full(len(inputs), np.inf)
    best_reference = np.full(len(inputs), np.inf)
    reference_parts: dict[str, float] = defaultdict(float)
    accumulator = MetricAccumulator()
    max_diff: dict[str, float] = defaultdict(float)
    agree = True
    for i, (prob, gt) in enumerate(inputs):
        for r in range(repeat):
            for side in in_turn("medxfer", "reference", r):
                start = time.perf_counter()
                if side == "medxfer":
                    ours = medxfer_suite(prob, gt, accumulator if r == 0 else None)
                    best_medxfer[i] = min(best_medxfer[i], time.perf_counter() - start)
                else:
                    theirs = reference_suite(prob, gt, reference_parts if r == 0 else None)
                    best_reference[i] = min(best_reference[i], time.perf_counter() - start)
        for key, ref_key in SHARED.items():
            diff = abs(float(ours[key]) - float(theirs[ref_key]))
            max_diff[key] = max(max_diff[key], diff)
            agree &= bool(np.isclose(ours[key], theirs[ref_key], rtol=1e-6, atol=1e-6))
    summary = accumulator.summary()
    return {"medxfer_s": float(best_medxfer.sum()), "reference_s": float(best_reference.sum()),
            "agree": agree, "max_abs_diff": dict(max_diff), "reference_parts_s": dict(reference_parts),
            "medxfer_parts_s": medxfer_breakdown(inputs), "n_images": summary["n_images"],
            "mean_dice": summary["per_image_mean"]["dice index"], "mean_hd95": summary["per_image_mean"]["hd95"]}


def compare_nsd(inputs, repeat: int) -> dict[str, Any]:
    """medxfer's NSD against MONAI's on the thresholded masks (tau 1 pixel), best time per image and side."""
    import warnings

    import torch
    from monai.metrics import compute_surface_dice

    from medxfer.evaluation.metrics import surface_dice

    best = {"medxfer": np.full(len(inputs), np.inf), "monai": np.full(len(inputs), np.inf)}
    max_diff = 0.0
    for i, (prob, gt) in enumerate(inputs):
        pred = prob > 0.5
        for r in range(repeat):
            for side in in_turn("medxfer", "monai", r):
                start = time.perf_counter()
                if side == "medxfer":
                    ours = surface_dice(pred, gt, tolerance=1.0)
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # MONAI's deprecation notice inside its own call
                        theirs = float(compute_surface_dice(torch.from_numpy(pred)[None, None],
                                                            torch.from_numpy(gt)[None, None], [1.0],
                                                            include_background=True, use_subvoxels=True)[0, 0])
                best[side][i] = min(best[side][i], time.perf_counter() - start)
        max_diff = max(max_diff, abs(ours - theirs))
    return {"medxfer_s": float(best["medxfer"].sum()), "monai_s": float(best["monai"].sum()),
            "max_abs_diff": max_diff, "agree": bool(max_diff <= 1e-5)}


def _parts(parts: dict[str, float]) -> str:
    total = sum(parts.values()) or 1.0
    return ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))


def main(cases=CASES) -> list[dict[str, Any]]:
    rows, results, notes = [], {}, []
    for label, shape, n, repeat in cases:
        inputs = make_inputs(shape, n)
        result = compare(inputs, repeat)
        results[label] = result
        speedup = result["reference_s"] / result["medxfer_s"]
        met = bool(speedup >= TARGET and result["agree"])
        print(f"   {label}: medxfer {result['medxfer_s']:.2f} s, medpy+sklearn {result['reference_s']:.2f} s, "
              f"x{speedup:.1f}, same answers: {result['agree']}", flush=True)
        rows.append(row(f"metric suite incl. HD95, AUC, AP on {label} (ratio = speed-up; same answers: "
                        f"{result['agree']})", "medpy.metric.binary + sklearn", result["medxfer_s"],
                        result["reference_s"], "s", speedup, f">= {TARGET:g}", met))
        notes.append(f"{label}: medxfer parts: {_parts(result['medxfer_parts_s'])}; reference parts: "
                     f"{_parts(result['reference_parts_s'])}; largest |difference| per shared metric: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff"].items())
                     + f"; mean Dice {result['mean_dice']:.3f}, mean HD95 {result['mean_hd95']:.2f} px.")
        nsd = compare_nsd(inputs, repeat)
        results[label]["nsd"] = nsd
        nsd_speedup = nsd["monai_s"] / nsd["medxfer_s"]
        print(f"   {label}: NSD medxfer {nsd['medxfer_s']:.2f} s, MONAI {nsd['monai_s']:.2f} s, x{nsd_speedup:.1f}, "
              f"largest |difference| {nsd['max_abs_diff']:.1e}", flush=True)
        rows.append(row(f"NSD (tau 1 px) on {label} (ratio = speed-up; same answers: {nsd['agree']})",
                        "MONAI compute_surface_dice(use_subvoxels=True)", nsd["medxfer_s"], nsd["monai_s"], "s",
                        nsd_speedup))
    notes.append("Times are per image best of the repeats (A B, B A per image), summed over the images. medxfer "
                 "computes 15 metrics (also accuracy, balanced accuracy, MCC, Hausdorff, ASSD, modified Hausdorff, "
                 "NSD) against the reference's 8.")
    write_result("metrics", rows, {"results": results, NOTES_KEY: notes})
    return rows


if __name__ == "__main__":
    main()
