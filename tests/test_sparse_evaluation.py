"""Sparse annotation in evaluation: a (case, class) cell the case does not annotate is never scored."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medxfer.data.base import Case
from medxfer.errors import DataError
from medxfer.evaluation.evaluate import evaluate_cases
from medxfer.evaluation.metrics import MetricAccumulator, segmentation_metrics


def _one_hot(label_map: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[label_map].transpose(2, 0, 1)


def _scene():
    """A 3-class 16x16 image: structure 1 (left block) and structure 2 (right block); the prediction finds
    both exactly. The case annotates only class 1, so its mask shows structure 2 as background."""
    truth = np.zeros((16, 16), dtype=np.int64)
    truth[2:8, 2:8] = 1
    truth[9:14, 9:14] = 2
    probs = _one_hot(truth, 3)
    sparse_label = np.where(truth == 2, 0, truth)  # structure 2 unannotated: background in the mask
    return truth, probs, sparse_label


def test_unannotated_but_predicted_structure_is_not_a_false_positive():
    _, probs, sparse_label = _scene()
    blind = segmentation_metrics(probs, sparse_label, 3)  # what evaluation did before: class 2 "all wrong"
    assert blind["dice index/class_2"] == 0.0 and blind["mean dice index"] == pytest.approx(0.5)

    result = segmentation_metrics(probs, sparse_label, 3, annotated=(1,))
    assert result["dice index/class_1"] == 1.0
    for name in ("dice index", "precision", "accuracy", "hd95", "nsd", "area under roc"):
        assert math.isnan(result[f"{name}/class_2"]), name
    assert result["mean dice index"] == 1.0  # the mean covers the annotated class only
    assert result["confusion"]["class_2"] == {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    assert result["annotated"] == {"class_1": True, "class_2": False}


def test_unannotated_and_missed_structure_does_not_score_one():
    _, probs, sparse_label = _scene()
    probs = _one_hot(np.where(probs.argmax(0) == 2, 0, probs.argmax(0)), 3)  # structure 2 not predicted
    blind = segmentation_metrics(probs, sparse_label, 3)
    assert blind["dice index/class_2"] == 1.0  # "both empty" rewarded a class nobody looked for
    result = segmentation_metrics(probs, sparse_label, 3, annotated=[1])
    assert math.isnan(result["dice index/class_2"])


def test_annotated_classes_still_count_false_positives_on_unannotated_structures():
    truth, _, sparse_label = _scene()
    wrong = np.where(truth == 2, 1, truth)  # structure 2 predicted as class 1: it is not class 1
    result = segmentation_metrics(_one_hot(wrong, 3), sparse_label, 3, annotated=(1,))
    assert result["confusion"]["class_1"]["fp"] == 25
    assert result["dice index/class_1"] == pytest.approx(2 * 36 / (2 * 36 + 25))


def test_binary_case_without_its_class_is_not_scored():
    label = np.zeros((8, 8), dtype=np.int64)
    prob = np.zeros((8, 8), dtype=np.float32)
    prob[2:4, 2:4] = 0.9
    result = segmentation_metrics(prob, label, 2, annotated=())
    assert math.isnan(result["dice index"]) and math.isnan(result["mean dice index"])
    assert result["annotated"] == {"class_1": False}


def test_bad_annotated_classes_are_one_line_errors():
    _, probs, label = _scene()
    with pytest.raises(DataError, match=r"annotated classes must be foreground classes 1\.\.2"):
        segmentation_metrics(probs, label, 3, annotated=(0, 1))
    with pytest.raises(DataError, match="annotated classes"):
        segmentation_metrics(probs, label, 3, annotated=(3,))


def test_accumulator_pools_and_averages_only_annotated_cells():
    truth, probs, sparse_label = _scene()
    accumulator = MetricAccumulator(["background", "caudate", "putamen"])
    accumulator.add(segmentation_metrics(probs, sparse_label, 3, annotated=(1,),
                                         class_names=["background", "caudate", "putamen"]))
    # a fully annotated second case where class 2 is half found
    half = truth.copy()
    half[9:14, 9:11] = 0
    accumulator.add(segmentation_metrics(_one_hot(half, 3), truth, 3,
                                         class_names=["background", "caudate", "putamen"]))
    summary = accumulator.summary()
    expected = 2 * 15 / (2 * 15 + 10)  # from the second case alone: tp 15, fn 10
    assert summary["pooled"]["dice index/putamen"] == pytest.approx(expected)
    assert summary["per_image_mean"]["dice index/putamen"] == pytest.approx(expected)
    assert summary["per_image_mean"]["dice index/caudate"] == 1.0
    assert summary["nan_counts"]["dice index/putamen"] == 0  # not annotated is not "undefined"
    assert summary["annotation"] == {"images_annotating": {"caudate": 2, "putamen": 1},
                                     "partially_annotated_images": 1}


class _Fixed(torch.nn.Module):
    """A "model" that returns the stored logits of each case (matched by its first pixel value)."""

    def __init__(self, logits_by_key: dict[float, torch.Tensor]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.logits_by_key = logits_by_key

    def forward(self, x):
        return torch.stack([self.logits_by_key[round(float(x[i, 0, 0, 0]), 3)] for i in range(x.shape[0])])


def test_evaluate_cases_scores_each_case_on_its_annotated_classes():
    truth, probs, sparse_label = _scene()
    cases, logits = [], {}
    for k, (label, annotated) in enumerate([(sparse_label, (1,)), (truth, None)]):
        image = np.random.default_rng(k).normal(size=(1, 16, 16)).astype(np.float32)
        image[0, 0, 0] = 10.0 + k  # the key the fixed model looks up (normalisation "none")
        cases.append(Case(image=image, label=label, case_id=f"c{k}", annotated=annotated))
        logits[round(10.0 + k, 3)] = torch.from_numpy(probs * 20.0)
    evaluation = evaluate_cases(_Fixed(logits), cases, 3, normalization="none")
    per_image = {row["case_id"]: row for row in evaluation.per_image}
    assert math.isnan(per_image["c0"]["dice index/class_2"]) and per_image["c0"]["annotated"] == ["class_1"]
    assert "annotated" not in per_image["c1"]
    # every annotated cell is predicted exactly: 1.0 everywhere (the blind evaluation said 0.75)
    assert evaluation.summary["per_image_mean"]["mean dice index"] == 1.0
    assert evaluation.summary["pooled"]["mean dice index"] == 1.0
