"""Inference over a test set -> the metric suite per image, averaged and pooled; predictions kept on request."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from medxfer.config import DataConfig, EvalConfig
from medxfer.data.base import Case
from medxfer.data.patches import predict_logits
from medxfer.data.preprocess import image_normalization
from medxfer.data.transforms import match_channels, normalize_image
from medxfer.evaluation.metrics import (DEFAULT_NSD_TOLERANCE, MetricAccumulator, class_keys, metric_provenance,
                                        segmentation_metrics)

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    summary: dict  # {"per_image_mean", "pooled", "nan_counts", "n_images", "class_aggregated", "headline", "provenance"}
    per_image: list[dict] = field(default_factory=list)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # case_id -> label map


def predict_probabilities(model: torch.nn.Module, case: Case, *, normalization: str = "zscore",
                          percentiles: tuple[float, float] = (0.5, 99.5), in_channels: Optional[int] = None,
                          patch_size: Optional[Sequence[int]] = None, size_multiple: int = 1,
                          overlap: float = 0.25, sw_batch_size: int = 4) -> np.ndarray:
    """Softmax probabilities ``(n_classes, *S)`` for one case, preprocessed as in training."""
    image = match_channels(normalize_image(case.image, normalization, percentiles), in_channels)
    x = torch.from_numpy(image)[None].to(next(model.parameters()).device)
    logits = predict_logits(model, x, patch_size, size_multiple, overlap, sw_batch_size)
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


def evaluate_cases(model: torch.nn.Module, cases: Sequence[Case], n_classes: int, *,
                   threshold: float = 0.5, keep_predictions: int = 0, nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
                   class_names: Optional[Sequence[str]] = None, headline: str = "pooled",
                   **predict_kwargs) -> Evaluation:
    """Run the model on each case and compute the metric suite (distances in mm when spacing is known).

    Only the classes a case annotates (``Case.annotated``) are scored in it (see
    ``medxfer.evaluation.metrics``, "Sparse annotation"); its ``per_image`` row then lists them.

    ``class_names`` (background first) name the per-class metric keys; ``headline`` is the convention of
    ``summary["headline"]`` (``metrics.HEADLINES``); ``summary["provenance"]`` says which implementation
    and convention produced each metric."""
    was_training = model.training
    model.eval()
    class_keys(n_classes, class_names)  # bad names fail before any inference
    accumulator = MetricAccumulator(class_names)
    per_image, predictions = [], {}
    try:
        for i, case in enumerate(cases):
            if case.label is None:
                raise ValueError(f"case {case.case_id} has no label; cannot evaluate")
            probs = predict_probabilities(model, case, **predict_kwargs)
            result = segmentation_metrics(probs, case.label, n_classes=n_classes, spacing=case.spacing,
                                          threshold=threshold, nsd_tolerance=nsd_tolerance,
                                          class_names=class_names, annotated=case.annotated)
            accumulator.add(result)
            per_image.append({"case_id": case.case_id, **_flat(result), **_annotation(case, n_classes, class_names)})
            if i < keep_predictions:
                predictions[case.case_id] = _label_map(probs, threshold)
    finally:
        model.train(was_training)
    spacing_known = bool(cases) and all(case.spacing is not None for case in cases)
    summary = {**accumulator.summary(headline), "provenance": metric_provenance(nsd_tolerance, spacing_known)}
    return Evaluation(summary=summary, per_image=per_image, predictions=predictions)


def evaluate_test_set(model: torch.nn.Module, cases: Sequence[Case], n_classes: int,
                      class_names: Optional[Sequence[str]], data_config: DataConfig,
                      eval_config: EvalConfig, in_channels: Optional[int] = None,
                      size_multiple: Optional[int] = None) -> dict:
    """The metrics entry of a run record (``summary`` + ``per_image``) for ``cases``, preprocessed as
    ``data_config`` says and evaluated as ``eval_config`` says: what fine-tuning writes for its test sets and
    ``medxfer evaluate`` for a model on its own. ``in_channels`` / ``size_multiple`` default to the model's
    encoder input channels and total stride."""
    evaluation = evaluate_cases(
        model, cases, n_classes, threshold=eval_config.threshold, nsd_tolerance=eval_config.nsd_tolerance,
        class_names=class_names, headline=eval_config.headline, normalization=image_normalization(data_config),
        percentiles=data_config.percentile_clip, in_channels=model.encoder.in_channels if in_channels is None else in_channels,
        patch_size=data_config.patch_size,
        size_multiple=int(model.required_multiple) if size_multiple is None else size_multiple, overlap=eval_config.sw_overlap,
        sw_batch_size=eval_config.sw_batch_size)
    return {**evaluation.summary, "per_image": evaluation.per_image}


def _label_map(probs: np.ndarray, threshold: float) -> np.ndarray:
    if probs.shape[0] == 2:
        return (probs[1] > threshold).astype(np.int64)  # strict, as in the metric suite
    return probs.argmax(0).astype(np.int64)


def _annotation(case: Case, n_classes: int, class_names: Optional[Sequence[str]]) -> dict:
    """A sparsely annotated case names the classes it annotates (the only ones scored in it)."""
    if case.annotated is None:
        return {}
    keys = class_keys(n_classes, class_names)
    return {"annotated": [keys[c] for c in sorted(int(c) for c in case.annotated)]}


def _flat(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}
