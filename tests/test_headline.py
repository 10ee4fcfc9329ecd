"""The headline metric cannot reward emptiness: "predict nothing" and "predict everything" score ~0, the old
per-image convention stays available by name, and validation selects on the same number as the test."""

import math

import numpy as np
import pytest
import torch

from medxfer.config import RunConfig, TrainConfig
from medxfer.errors import DataError
from medxfer.evaluation.metrics import (ABSENT_FP_RATE, HEADLINES, POOLED_DICE, PRESENT_DICE, MetricAccumulator,
                                        class_aggregated_dice, headline_score, segmentation_metrics)
from medxfer.records import CLASS_AGGREGATED_COLUMNS, OLD_HEADLINE, OWN_COLUMNS, record_rows
from medxfer.training.tasks import SegmentationTask

N_CLASSES = 4


def sparse_study(n_images: int = 9, side: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Label maps like the demo's: three small structures, each absent from about a third of the images."""
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(n_images):
        label = np.zeros((side, side), dtype=np.int64)
        for c in range(1, N_CLASSES):
            if (i + c) % 3 == 0:  # absent here
                continue
            size = int(rng.integers(2, 5))
            y, x = rng.integers(0, side - size, 2)
            label[y:y + size, x:x + size] = c
        labels.append(label)
    return labels


def one_hot(prediction: np.ndarray) -> np.ndarray:
    return np.eye(N_CLASSES, dtype=np.float32)[prediction].transpose(2, 0, 1)


def summarise(labels, predictions, headline="pooled") -> dict:
    accumulator = MetricAccumulator()
    for label, prediction in zip(labels, predictions):
        accumulator.add(segmentation_metrics(one_hot(prediction), label, N_CLASSES))
    return accumulator.summary(headline)


def test_predict_nothing_and_predict_everything_score_near_zero_on_the_headline():
    labels = sparse_study()
    nothing = summarise(labels, [np.zeros_like(label) for label in labels])
    assert nothing["headline"] == {"convention": "pooled", "metric": POOLED_DICE, "value": 0.0}
    # the old convention rewards the empty prediction on the same images: absent classes score 1
    old = summarise(labels, [np.zeros_like(label) for label in labels], headline="per_image")
    assert old["headline"]["metric"] == HEADLINES["per_image"]
    assert old["headline"]["value"] == pytest.approx(old["per_image_mean"]["mean dice index"])
    assert old["headline"]["value"] > 0.3
    for c in range(1, N_CLASSES):  # every class everywhere, one at a time (argmax gives one class per pixel)
        everything = summarise(labels, [np.full_like(label, c) for label in labels])
        assert 0.0 <= everything["headline"]["value"] < 0.02
        assert everything["class_aggregated"][ABSENT_FP_RATE] == pytest.approx(1 / (N_CLASSES - 1))
    perfect = summarise(labels, labels)
    assert perfect["headline"]["value"] == 1.0
    assert perfect["class_aggregated"][ABSENT_FP_RATE] == 0.0


def test_class_aggregated_values_by_hand():
    # 3 images x 2 classes, [tp, fp, fn]: class 1 present in images 0 and 1, absent in 2 (with a stray pixel);
    # class 2 absent everywhere and never predicted (undefined: left out of the class mean).
    counts = np.array([[[3, 1, 0], [0, 0, 0]],
                       [[1, 0, 3], [0, 0, 0]],
                       [[0, 2, 0], [0, 0, 0]]])
    values = class_aggregated_dice(counts)
    assert values["pooled"][0] == pytest.approx(2 * 4 / (2 * 4 + 3 + 3))
    assert math.isnan(values["pooled"][1])
    assert values["present"][0] == pytest.approx((6 / 7 + 2 / 5) / 2)
    assert math.isnan(values["present"][1])
    assert values["absent_fp_rate"].tolist() == [1.0, 0.0]
    assert values["n_present"].tolist() == [2, 0] and values["n_absent"].tolist() == [1, 3]
    assert headline_score(counts) == pytest.approx(8 / 14)
    # per_image: image means over classes with both-empty = 1, then over images
    assert headline_score(counts, convention="per_image") == pytest.approx(((6 / 7 + 1) / 2 + (2 / 5 + 1) / 2 + 0.5) / 3)
    # an unannotated cell does not count: image 2's class 1 left out removes the stray pixel
    counted = np.array([[True, True], [True, True], [False, True]])
    assert class_aggregated_dice(counts, counted)["pooled"][0] == pytest.approx(8 / 12)
    assert math.isnan(class_aggregated_dice(counts, counted)["absent_fp_rate"][0])
    with pytest.raises(DataError, match="unknown headline convention"):
        headline_score(counts, convention="mean")


def test_accumulator_honours_counted_cells_and_names_classes():
    labels = sparse_study(3)
    accumulator = MetricAccumulator(["bg", "a", "b", "c"])
    for i, label in enumerate(labels):
        accumulator.add(segmentation_metrics(one_hot(np.full_like(label, 1)), label, N_CLASSES),
                        counted=[i != 2, True, True])
    summary = accumulator.summary()
    counts, counted = accumulator.image_counts()
    assert counts.shape == (3, 3, 4) and counted[:, 0].tolist() == [True, True, False]
    aggregated = summary["class_aggregated"]
    assert aggregated[f"{POOLED_DICE}/a"] == pytest.approx(headline_score(counts[:, :1], counted[:, :1]))
    assert aggregated[f"{POOLED_DICE}/b"] == 0.0  # b is predicted nowhere
    assert f"{PRESENT_DICE}/c" in aggregated and "n absent images/a" in aggregated
    # a class the case does not annotate (Case.annotated) never counts: its stray prediction is no false positive
    sparse = MetricAccumulator()
    sparse.add(segmentation_metrics(one_hot(np.full_like(labels[0], 3)), labels[0], N_CLASSES, annotated=(1, 2)))
    assert sparse.image_counts()[1].tolist() == [[True, True, False]]
    assert math.isnan(sparse.summary()["class_aggregated"][f"{ABSENT_FP_RATE}/class_3"])
    with pytest.raises(DataError, match="one flag per foreground class"):
        accumulator.add(segmentation_metrics(one_hot(labels[0]), labels[0], N_CLASSES), counted=[True])


class Threshold(torch.nn.Module):
    """Class 1 wherever the image exceeds 0.5: the validation predictions are set by the images."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), (x - 0.5) * 10], dim=1) + 0 * self.weight


def validation_score(headline: str, images, labels) -> float:
    task = SegmentationTask(Threshold(), lambda *a, **k: 0, TrainConfig(), n_classes=2, headline=headline)
    logged = {}
    task.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    for image, label in zip(images, labels):
        task.validation_step({"image": image[None, None], "label": label[None],
                              "annotated": torch.ones(1, 2, dtype=torch.bool)}, 0)
    task.on_validation_epoch_end()
    return logged["val_dice"]


def test_validation_selects_on_the_headline_metric():
    labels = [torch.zeros(8, 8, dtype=torch.long) for _ in range(3)]
    labels[0][2:5, 2:5] = 1  # class present in one image of three
    empty = [torch.zeros(8, 8) for _ in labels]
    segmenting = [label.float() for label in labels]
    segmenting[1][0, 0] = 1.0  # one stray pixel where the class is absent
    # per-image: the empty model ties the segmenting one (2/3 each), so selection could keep it ...
    assert validation_score("per_image", empty, labels) == pytest.approx(2 / 3)
    assert validation_score("per_image", segmenting, labels) == pytest.approx(2 / 3)
    # ... pooled: the empty model scores 0, the segmenting one 18/19
    assert validation_score("pooled", empty, labels) == 0.0
    assert validation_score("pooled", segmenting, labels) == pytest.approx(18 / 19)


def test_record_rows_name_the_headline_and_old_records_keep_theirs():
    new = {"run_id": "a", "metrics": {"target": {
        "per_image_mean": {"dice index": 0.9}, "nan_counts": {},
        "headline": {"convention": "pooled", "metric": POOLED_DICE, "value": 0.1},
        "class_aggregated": {POOLED_DICE: 0.1, PRESENT_DICE: 0.4, ABSENT_FP_RATE: 0.5, f"{POOLED_DICE}/LV": 0.1}}}}
    row = record_rows(new)[0]
    assert (row["headline metric"], row["headline dice"]) == (POOLED_DICE, 0.1)
    assert row["dice index"] == 0.9 and row[PRESENT_DICE] == 0.4 and row[f"{POOLED_DICE}/LV"] == 0.1
    old = {"run_id": "b", "metrics": {"target": {"per_image_mean": {"mean dice index": 0.7}, "nan_counts": {}}}}
    row = record_rows(old)[0]
    assert (row["headline metric"], row["headline dice"]) == (OLD_HEADLINE, 0.7) == ("per-image mean dice index", 0.7)
    assert OLD_HEADLINE == HEADLINES["per_image"]
    assert math.isnan(row[POOLED_DICE])
    assert CLASS_AGGREGATED_COLUMNS == (POOLED_DICE, PRESENT_DICE, ABSENT_FP_RATE)
    assert {"headline metric", "headline dice", *CLASS_AGGREGATED_COLUMNS} <= set(OWN_COLUMNS)


def test_headline_is_a_config_choice_that_changes_the_run_id():
    from medxfer.finetune import run_id_for

    assert RunConfig().evaluation.headline == "pooled"
    old = RunConfig.model_validate({"evaluation": {"headline": "per_image"}})
    assert run_id_for(old) != run_id_for(RunConfig())
