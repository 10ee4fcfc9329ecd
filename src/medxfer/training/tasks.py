"""LightningModules: the training loops of medxfer (Lightning does checkpointing, resume, precision)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import lightning as L
import torch

from medxfer.config import TrainConfig
from medxfer.data.base import IGNORE_INDEX
from medxfer.data.patches import predict_logits
from medxfer.training.strategies import apply_strategy, build_optimizer, build_scheduler


def foreground_dice_counts(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(tp, fp, fn) summed per foreground class from argmax predictions, ignoring IGNORE_INDEX pixels."""
    pred = logits.argmax(1)
    valid = target != IGNORE_INDEX
    counts = torch.zeros(n_classes - 1, 3, dtype=torch.float64)
    for k in range(1, n_classes):
        p, t = (pred == k) & valid, (target == k) & valid
        counts[k - 1, 0] = (p & t).sum()
        counts[k - 1, 1] = (p & ~t).sum()
        counts[k - 1, 2] = (~p & t).sum()
    return counts


class SegmentationTask(L.LightningModule):
    """Trains a segmenter with the run's loss and strategy; logs ``val_dice`` (pooled mean foreground
    Dice over the validation images, inferred whole as at test time)."""

    def __init__(self, model: torch.nn.Module, loss: Callable, train: TrainConfig, n_classes: int,
                 patch_size: Optional[Sequence[int]] = None, size_multiple: int = 1,
                 sw_overlap: float = 0.25, total_steps: int = 1):
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.train_cfg = train
        self.n_classes = n_classes
        self.patch_size = patch_size
        self.size_multiple = size_multiple
        self.sw_overlap = sw_overlap
        self.total_steps = total_steps
        self._val_counts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["image"])
        loss = self.loss_fn(logits, batch["label"], annotated=batch.get("annotated"))
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = predict_logits(self.model, batch["image"], self.patch_size, self.size_multiple, self.sw_overlap)
        self._val_counts.append(foreground_dice_counts(logits, batch["label"], self.n_classes))

    def on_validation_epoch_end(self):
        if not self._val_counts:
            return
        tp, fp, fn = torch.stack(self._val_counts).sum(0).unbind(-1)
        denom = 2 * tp + fp + fn
        dice = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(tp))
        self.log("val_dice", dice.mean().float(), prog_bar=True)
        self._val_counts.clear()

    def configure_optimizers(self):
        groups = apply_strategy(self.model, self.train_cfg)
        optimizer = build_optimizer(groups, self.train_cfg)
        scheduler = build_scheduler(optimizer, self.train_cfg, self.total_steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
