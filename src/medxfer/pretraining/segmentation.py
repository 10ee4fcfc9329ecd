"""Segmentation pretraining set-up: a whole U-Net on sparsely annotated cases with the partial-label loss."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from monai.data import DataLoader

from medxfer.config import PretrainConfig, TrainConfig
from medxfer.data import load_data, select_subset
from medxfer.data.base import IGNORE_INDEX, check_case
from medxfer.data.patches import predict_logits
from medxfer.data.preprocess import image_normalization
from medxfer.data.transforms import CaseDataset, training_augmentation
from medxfer.errors import ConfigError, DataError
from medxfer.models import build_segmenter
from medxfer.pretraining.recipes import PretrainSetup, steps_per_epoch, total_steps
from medxfer.training.losses import PARTIAL_PREFIX, build_loss
from medxfer.training.strategies import apply_strategy, build_optimizer
from medxfer.training.tasks import SegmentationTask, scheduled_lr_factor

log = logging.getLogger(__name__)

def sparse_dice(model, loader, n_classes: int, patch_size=None, size_multiple: int = 1,
                overlap: float = 0.25) -> float:
    """Pooled Dice per foreground class over the cases that annotate it (ignore-index pixels left out),
    averaged over the classes with any annotated voxel; NaN when there are none."""
    device = next(model.parameters()).device
    counts = torch.zeros(n_classes, 3, dtype=torch.float64)  # tp, fp, fn per class
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            annotated = batch["annotated"].to(device)  # (N, C) bool
            pred = predict_logits(model, image, patch_size, size_multiple, overlap).argmax(1)
            valid = label != IGNORE_INDEX
            for k in range(1, n_classes):
                case_mask = annotated[:, k].view(-1, *([1] * (label.ndim - 1))) & valid
                p, t = (pred == k) & case_mask, (label == k) & case_mask
                counts[k, 0] += float((p & t).sum())
                counts[k, 1] += float((p & ~t).sum())
                counts[k, 2] += float((~p & t).sum())
    finally:
        model.train(was_training)
    tp, fp, fn = counts[1:].unbind(-1)
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    if not bool(present.any()):
        return float("nan")
    return float((2 * tp[present] / denominator[present]).mean())


def check_sparse_cases(data, train_cases) -> dict[str, Any]:
    """Check every case (annotated classes valid, no label outside them) and summarise the annotation."""
    for case in list(train_cases) + list(data.val):
        check_case(case, f"{data.name}:{case.case_id}", data.n_classes)
        if case.label is None:
            raise DataError(f"{data.name}:{case.case_id}: segmentation pretraining needs labelled cases")
    per_class = {k: sum(1 for c in train_cases if c.annotated is None or k in c.annotated)
                 for k in range(1, data.n_classes)}
    never = [k for k, n in per_class.items() if n == 0]
    if never:
        names = [data.class_names[k] if k < len(data.class_names) else str(k) for k in never]
        log.warning("%s: class(es) %s are annotated in no training case; they cannot be learned", data.name, names)
    partial = sum(1 for c in train_cases if c.annotated is not None and len(c.annotated) < data.n_classes - 1)
    return {"cases_annotating_class": {str(k): n for k, n in per_class.items()},
            "partially_annotated_cases": partial}


def segmentation_setup(config: PretrainConfig, recipe: dict[str, Any], data=None) -> PretrainSetup:


    d = config.data
    assert d is not None  # the config validator guarantees it
    data = data if data is not None else load_data(d)
    if data.spatial_dims != d.spatial_dims:
        raise ConfigError(f"data.spatial_dims={d.spatial_dims} but {data.name} is {data.spatial_dims}D")
    train_cases = select_subset(data.train, d.train_images, config.subset_seed, d.subset)
    annotation = check_sparse_cases(data, train_cases)
    t = config.train
    loss = build_loss(t.loss)
    if annotation["partially_annotated_cases"] and not t.loss.strip().lower().startswith(PARTIAL_PREFIX):
        raise ConfigError(f"train.loss={t.loss!r}: {annotation['partially_annotated_cases']} training case(s) annotate "
                          f"only some classes; use a partial loss (e.g. 'partial_dice_ce') so that missing "
                          "annotations are not counted as background")
    spec = config.model.model_copy(update={"in_channels": config.model.in_channels or data.in_channels,
                                           "n_classes": config.model.n_classes or data.n_classes})
    if spec.n_classes != data.n_classes:
        raise ConfigError(f"model.n_classes={spec.n_classes} but dataset {data.name} has {data.n_classes} classes")
    model = build_segmenter(spec)
    if model.spatial_dims != data.spatial_dims:
        raise ConfigError(f"model.preset {config.model.preset!r} is {model.spatial_dims}D but {data.name} is "
                          f"{data.spatial_dims}D")
    if d.patch_size is None and len({c.spatial_shape for c in train_cases}) > 1:
        raise ConfigError("data: training images differ in size; set data.patch_size or data.resize")

    augmentation = training_augmentation(d.spatial_dims, d.patch_size, d.foreground_ratio, d.augment)
    common = dict(n_classes=data.n_classes, normalization=image_normalization(d), percentiles=d.percentile_clip,
                  in_channels=model.in_channels)
    train_ds = CaseDataset(train_cases, transform=augmentation, **common)
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(t.batch_size, len(train_ds))
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=t.num_workers,
                              generator=generator)
    val_loader = (DataLoader(CaseDataset(data.val, **common), batch_size=1, shuffle=False, num_workers=t.num_workers)
                  if data.val else None)
    total = total_steps(config, steps_per_epoch(train_loader))
    warmup = int(round(recipe["warmup_fraction"] * total))
    train_cfg = TrainConfig(strategy="full", optimizer=recipe["optimizer"], lr=recipe["lr"],
                            weight_decay=recipe["weight_decay"], momentum=recipe["momentum"],
                            scheduler=recipe["scheduler"], batch_size=t.batch_size)
    size_multiple = int(max(model.encoder.strides))

    class SparseSegmentationTask(SegmentationTask):
        """SegmentationTask with the pretraining schedule (warm-up + cosine/step)."""

        def configure_optimizers(self):
            optimizer = build_optimizer(apply_strategy(self.model, self.train_cfg), self.train_cfg)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: scheduled_lr_factor(step, total, recipe["scheduler"], warmup))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    module = SparseSegmentationTask(model, loss, train_cfg, data.n_classes, patch_size=d.patch_size,
                                    size_multiple=size_multiple, total_steps=total)

    def score(pl_module) -> dict[str, Any]:
        if val_loader is None:
            return {"val_accuracy": None, "val_dice": None}
        dice = sparse_dice(pl_module.model, val_loader, data.n_classes, d.patch_size, size_multiple)
        return {"val_accuracy": None, "val_dice": None if math.isnan(dice) else dice}

    return PretrainSetup(module, train_loader, val_loader, score, data.name, len(train_cases), len(data.val), True,
                  {"n_classes": data.n_classes, "class_names": list(data.class_names), "annotation": annotation,
                   "loss": t.loss, "train_case_ids": [c.case_id for c in train_cases]})

