"""LightningModules: the training loops of medxfer (Lightning does checkpointing, resume, precision)."""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import lightning as L
import torch

from medxfer.config import TrainConfig
from medxfer.data.base import IGNORE_INDEX
from medxfer.data.patches import predict_logits
from medxfer.errors import TrainingDiverged
from medxfer.evaluation.metrics import headline_score
from medxfer.training.losses.deep_supervision import deep_supervision_loss
from medxfer.training.strategies import (apply_strategy, build_optimizer, build_scheduler, make_optimizer,
                                         unfreeze_if_due)

log = logging.getLogger(__name__)


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


class BestWeights(L.Callback):
    """Keeps, in memory, the model weights of the epoch with the best ``monitor`` value.

    Cheaper than writing a best-model file at every improvement; its state (score + weights, plain
    tensors) goes into Lightning's resume checkpoint, so a resumed run keeps the best weights seen so far.
    """

    def __init__(self, monitor: str = "val_dice"):
        self.monitor = monitor
        self.best_score: Optional[float] = None
        self.best_state: Optional[dict[str, torch.Tensor]] = None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        value = float(value)
        if math.isnan(value):  # undefined (nothing present or predicted): never the best
            return
        if self.best_score is None or value > self.best_score:
            self.best_score = value
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_state = state_dict.get("best_state")


def first_non_finite(module: torch.nn.Module) -> Optional[str]:
    """The name of the first parameter or normalisation statistic (BatchNorm's ``running_mean`` /
    ``running_var``) of ``module`` that holds a NaN or an infinity; None when all are finite. Other buffers
    are left out: a model may keep infinities on purpose (e.g. an attention mask)."""
    named = [(name, t) for name, t in module.named_parameters() if t.is_floating_point()]
    named += [(name, t) for name, t in module.named_buffers()
              if t.is_floating_point() and name.rsplit(".", 1)[-1].startswith("running_")]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class TrainingTask(L.LightningModule):
    """What every medxfer LightningModule shares: gradients released when a batch starts, and divergence
    stops the run.

    Gradients: Lightning sets them to None after the forward pass (inside its optimizer closure), so the
    last step's gradients sit in memory beside the new activations. Releasing them first, as a plain PyTorch
    loop does, lowers the training peak by their size (benchmarks/bench_memory.py, unet 256x256 batch 2:
    workload peak 687 MB before, 580 MB after; the plain loop 612 MB). Not while gradients accumulate
    over several batches.

    Divergence: a NaN or infinite training loss (noted at every step on the device, no synchronisation),
    or weights or normalisation statistics, checked every ``log_every_n_steps`` steps, before every
    checkpoint and when training ends, raise :class:`medxfer.errors.TrainingDiverged` ("diverged at step
    N"): such a run must never be recorded as done, nor its weights saved.
    """

    _first_bad_step: Optional[torch.Tensor] = None  # device scalar: first step with a non-finite loss, or -1

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.accumulate_grad_batches == 1:
            for optimizer in self.trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)

    def check_loss(self, loss: torch.Tensor) -> None:
        """Note the step if ``loss`` (the loss of the step about to be taken) is not finite. On the device,
        without waiting for it: :meth:`check_divergence` reads it every ``log_every_n_steps`` steps."""
        bad = ~torch.isfinite(loss.detach()).all()
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first_bad_step.masked_fill_(bad & (self._first_bad_step < 0), self.trainer.global_step + 1)

    def check_divergence(self) -> None:
        """Raise TrainingDiverged if a loss so far was not finite, or a weight or statistic is not now."""
        if self._first_bad_step is not None:
            step = int(self._first_bad_step)
            if step >= 0:
                raise TrainingDiverged(f"training diverged at step {step}: the loss is NaN or infinite; lower "
                                       "train.lr (or check the data)")
        name = first_non_finite(self.model)
        if name is not None:
            raise TrainingDiverged(f"training diverged at step {self.trainer.global_step}: {name} holds NaN or "
                                   "infinite values; lower train.lr (or check the data)")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_divergence()

    def on_save_checkpoint(self, checkpoint):
        self.check_divergence()  # a resume checkpoint never holds a diverged model

    def on_train_end(self):
        self.check_divergence()


class SegmentationTask(TrainingTask):
    """Trains a segmenter with the run's loss and strategy; logs ``val_dice``: the headline metric
    (``headline``, a convention of ``medxfer.evaluation.metrics.HEADLINES``, computed by the same function
    as at test time) over the validation images, inferred whole as at test time, counting only the
    classes annotated in each image."""

    def __init__(self, model: torch.nn.Module, loss: Callable, train: TrainConfig, n_classes: int,
                 patch_size: Optional[Sequence[int]] = None, size_multiple: int = 1,
                 sw_overlap: float = 0.25, total_steps: int = 1, headline: str = "pooled",
                 pretrained_encoder: bool = False):
        super().__init__()
        self.model = model
        self.pretrained_encoder = pretrained_encoder  # weights were loaded: the encoder lr of the strategy
        self.loss_fn = loss
        self.train_cfg = train
        self.n_classes = n_classes
        self.patch_size = patch_size
        self.size_multiple = size_multiple
        self.sw_overlap = sw_overlap
        self.total_steps = total_steps
        self.headline = headline
        self._val_counts: list[torch.Tensor] = []  # per validation image: (K, 3) tp, fp, fn
        self._val_counted: list[torch.Tensor] = []  # per validation image: (K,) bool, the classes that count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        if unfreeze_if_due(self.model, self.train_cfg, int(self.trainer.global_step)):
            log.info("gradual: encoder unfrozen at step %d", self.trainer.global_step)

    def training_step(self, batch, batch_idx):
        if getattr(self.model, "deep_supervision", False):
            outputs = self.model.forward_deep_supervision(batch["image"])
            logits = outputs[0]
            loss = deep_supervision_loss(self.loss_fn, outputs, batch["label"], annotated=batch.get("annotated"))
        else:
            logits = self.model(batch["image"])
            loss = self.loss_fn(logits, batch["label"], annotated=batch.get("annotated"))
        self.check_loss(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = predict_logits(self.model, batch["image"], self.patch_size, self.size_multiple, self.sw_overlap)
        annotated = batch.get("annotated")
        for i in range(len(logits)):
            self._val_counts.append(foreground_dice_counts(logits[i:i + 1], batch["label"][i:i + 1], self.n_classes))
            self._val_counted.append(torch.ones(self.n_classes - 1, dtype=torch.bool) if annotated is None
                                     else annotated[i, 1:].detach().cpu().bool())

    def on_validation_epoch_end(self):
        if not self._val_counts:
            return
        score = headline_score(torch.stack(self._val_counts).numpy(), torch.stack(self._val_counted).numpy(),
                               self.headline)
        # NaN (no class present or predicted anywhere) never counts as an improvement
        self.log("val_dice", torch.tensor(score, dtype=torch.float32), prog_bar=True)
        self._val_counts.clear()
        self._val_counted.clear()

    def configure_optimizers(self):
        groups = apply_strategy(self.model, self.train_cfg, pretrained=self.pretrained_encoder)
        optimizer = build_optimizer(groups, self.train_cfg)
        scheduler = build_scheduler(optimizer, self.train_cfg, self.total_steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def scheduled_lr_factor(step: int, total_steps: int, scheduler: str = "cosine", warmup_steps: int = 0) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total_steps``.

    A linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    ``cosine`` (half a cosine from 1 to 0 over the remaining steps), ``step`` (x0.1 at 50% and again at
    75% of the remaining steps) or ``none`` (constant).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "none":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    raise ValueError(f"unknown scheduler {scheduler!r} (none, step, cosine)")


class ClassificationTask(TrainingTask):
    """Classification pretraining of an encoder + pooled linear head (``medxfer.models.Classifier``).

    Cross-entropy with optional label smoothing; SGD (momentum, Nesterov off), Adam or AdamW; the
    per-step schedule of :func:`scheduled_lr_factor`. Weight decay applies to conv/linear weights only
    (never to biases or normalisation parameters, as usual for ImageNet recipes). Batches are
    ``(images float (N, C, H, W), labels int64 (N,))``. ``evaluate(loader)`` gives the accuracy of the
    current weights on a loader without touching the training state (what checkpoint callbacks record).
    """

    def __init__(self, model: torch.nn.Module, *, optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0, scheduler: str = "cosine", warmup_steps: int = 0, total_steps: int = 1,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.scheduler_name = scheduler
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(1, int(total_steps))
        self.label_smoothing = label_smoothing
        self._val_correct = 0
        self._val_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images)
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.check_loss(loss)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train_accuracy", accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        predictions = self.model(images).argmax(1)
        self._val_correct += int((predictions == labels).sum())
        self._val_count += len(labels)

    def on_validation_epoch_end(self):
        if self._val_count:
            self.log("val_accuracy", self._val_correct / self._val_count, prog_bar=True)
        self._val_correct, self._val_count = 0, 0

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """``{"accuracy", "loss"}`` (loss without label smoothing) of the current weights over ``loader``;
        the model is put in eval mode for it and returned to its previous mode."""
        was_training = self.model.training
        self.model.eval()
        correct, count, loss_sum = 0, 0, 0.0
        try:
            for images, labels in loader:
                images, labels = images.to(self.device), labels.to(self.device)
                logits = self.model(images)
                loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                count += len(labels)
        finally:
            self.model.train(was_training)
        if count == 0:
            return {"accuracy": float("nan"), "loss": float("nan")}
        return {"accuracy": correct / count, "loss": loss_sum / count}

    def configure_optimizers(self):
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for _, p in trainable if p.ndim >= 2]
        no_decay = [p for _, p in trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        optimizer = make_optimizer(self.optimizer_name, groups, self.lr, self.momentum)
        total, scheduler, warmup = self.total_steps, self.scheduler_name, self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: scheduled_lr_factor(step, total, scheduler, warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
