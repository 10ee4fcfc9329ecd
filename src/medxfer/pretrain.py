"""Pretraining with a checkpoint schedule: encoder weights saved at several pretraining lengths.

Two tasks (``PretrainConfig.task``):

- ``classification``: the encoder of ``model.preset`` + a pooled linear head
  (:func:`medxfer.models.build_classifier`) trained on the embedded natural-image stand-in
  (``classification.source: natural``, offline) or an ImageNet copy stored as ``.npy`` files
  (``source: imagenet``, see :mod:`medxfer.data.imagenet`). The validation accuracy of the current
  weights is recorded in every checkpoint.
- ``segmentation``: the whole ``model.preset`` (2D or 3D U-Net family) trained on any medxfer dataset
  (``data``: MSD layout, folders, demo, ...) whose cases may each annotate only some classes
  (``Case.annotated``, filled by the loaders). The default loss ``partial_dice_ce`` is the marginal loss
  of :mod:`medxfer.training.losses`: in a case, the unannotated classes are merged into background, so
  a missing annotation is never counted as background. The validation Dice counts, in each case, only
  the classes that case annotates.

Schemes (``scheme``; every value can be overridden in ``train``; ``None`` there = the scheme's value):

==================  ===============================  ==========================================
                    simple                           advanced
==================  ===============================  ==========================================
optimizer, lr       SGD (momentum 0.9), 0.05         AdamW, 0.002
weight decay        0                                0.05 (conv/linear weights only)
schedule            cosine to 0, no warm-up          linear warm-up (5% of steps), cosine to 0
label smoothing     0                                0.1
augmentation        horizontal flip + random crop    RandomResizedCrop (area 0.25-1) + flip +
                    of the image padded by 1/8       TrivialAugmentWide + ColorJitter 0.4
==================  ===============================  ==========================================

``train.scheduler: step`` gives x0.1 at 50% and 75% of the steps; ``train.optimizer: adam`` plain Adam.
For segmentation the scheme sets the optimizer and schedule only (augmentation comes from ``data``).

Checkpoint schedule (``schedule: {unit: epoch|step, lengths: [0, 1, 2, 5]}``): after exactly
``length`` epochs (at the end of the epoch) or optimizer steps, the :class:`ScheduledCheckpoints`
callback saves the encoder with :func:`medxfer.models.weights.save_encoder`; length 0 is the random
initialisation, saved before the first step. Training runs to the largest length; the learning-rate
schedule spans the whole run, so a checkpoint of length 2 in a [0, 2, 5] run is "2 epochs into a
5-epoch run", not a finished 2-epoch run.

Output folder::

    OUT/checkpoints/encoder_lenNNNN.pt + .json   one encoder checkpoint + manifest per length
                                                 (``weights.list_checkpoints`` reads this folder)
    OUT/models/model_lenNNNN.pt + .json          segmentation only: the whole segmenter per length
    OUT/lightning/last.ckpt                      Lightning's resume checkpoint (removed when done)
    OUT/pretrain_config.json                     the resolved config; another config in OUT is an error
    OUT/pretrain.json                            the run record, written last: the run is done when it exists

Manifest fields beside save_encoder's own (arch, channels, strides, length, source, ...):
``pretraining_length``, ``length_unit``, ``val_accuracy`` (classification; ``None`` for segmentation),
``val_dice`` (segmentation), ``val_loss``, ``train_loss``, ``epoch``, ``step``, ``scheme``, ``task``,
``architecture`` (the model preset), ``dataset``, ``seed``, ``run_name``, ``config_hash``, and whatever
the checkpoint hooks return.

Resume: an interrupted run (same config, same ``OUT``) resumes from ``OUT/lightning/last.ckpt``,
saved at every epoch end (unit ``epoch``) or every ``train.resume_every_n_steps`` steps (unit
``step``). The schedule stays exact: a length whose checkpoint already exists is never rewritten
(nor are its hooks called again), and a length passed again after resuming is saved if it is missing.

Checkpoint hooks (the online slot for the transferability score): a hook is a callable
``on_checkpoint(length: int, encoder: Encoder, manifest: dict) -> dict | None``, called at every
scheduled length, after the validation score and before the files are written, with the encoder in
eval mode (restored afterwards; a hook must not change the weights). Hooks are the ``hooks=`` argument
of :func:`run_pretraining`, plus every object in ``callbacks=`` that has an ``on_checkpoint`` method
(so one Lightning Callback can be both). A returned dict is merged into the manifest (JSON-able
values; names of existing manifest fields are refused) and into the run record; the key ``"stop":
True`` is consumed and ends pretraining after this checkpoint (``stop_requested`` is recorded). A hook
that is a Lightning Callback may also set ``trainer.should_stop`` itself.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch

from medxfer.config import PretrainConfig, TrainConfig, config_to_dict
from medxfer.errors import ConfigError, DataError
from medxfer.io import atomic_write_json, environment_info, seed_everything, stable_hash

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "models"
LIGHTNING_DIR = "lightning"
CONFIG_FILE = "pretrain_config.json"
RECORD_FILE = "pretrain.json"

SCHEMES: dict[str, dict[str, Any]] = {
    "simple": {
        "optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0, "scheduler": "cosine", "warmup_fraction": 0.0,
        "label_smoothing": 0.0, "augmentation": "simple", "crop_scale": (0.25, 1.0), "color_jitter": 0.0,
        "auto_augment": "none",
    },
    "advanced": {
        "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "scheduler": "cosine", "warmup_fraction": 0.05,
        "label_smoothing": 0.1, "augmentation": "advanced", "crop_scale": (0.25, 1.0), "color_jitter": 0.4,
        "auto_augment": "trivial",
    },
}
_RECIPE_FIELDS = ("optimizer", "lr", "weight_decay", "scheduler", "warmup_fraction", "label_smoothing",
                  "crop_scale", "color_jitter", "auto_augment")
# Settings that do not change the result: a resumed run may differ in them.
_RUNTIME_FIELDS = ("num_workers", "accelerator", "log_every_n_steps", "resume_every_n_steps")

CheckpointHook = Callable[[int, Any, dict], Optional[dict]]


@dataclass
class CheckpointInfo:
    """One saved checkpoint: its pretraining length, the encoder ``.pt`` file and its manifest."""

    length: int
    path: Path
    manifest: dict[str, Any]

    @property
    def val_accuracy(self) -> Optional[float]:
        return self.manifest.get("val_accuracy")


@dataclass
class PretrainResult:
    """The run folder, its encoder checkpoints (by length) and its record."""

    out_dir: Path
    checkpoint_dir: Path
    checkpoints: list[CheckpointInfo]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return [c.length for c in self.checkpoints]

    @property
    def model_dir(self) -> Optional[Path]:
        folder = self.out_dir / MODEL_DIR
        return folder if folder.is_dir() else None


# --------------------------------------------------------------------------------------------------
# Recipe


def resolve_recipe(config: PretrainConfig) -> dict[str, Any]:
    """The scheme's settings with every non-``None`` ``train`` field applied over them."""
    recipe = dict(SCHEMES[config.scheme])
    for name in _RECIPE_FIELDS:
        value = getattr(config.train, name)
        if value is not None:
            recipe[name] = tuple(value) if name == "crop_scale" else value
    low, high = recipe["crop_scale"]
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"train.crop_scale: need 0 < min <= max <= 1, got {recipe['crop_scale']}")
    recipe["momentum"] = config.train.momentum
    return recipe


def config_identity(config: PretrainConfig) -> str:
    """Hash of everything that changes the checkpoints (not workers, accelerator or logging)."""
    data = config_to_dict(config)
    for name in _RUNTIME_FIELDS:
        data["train"].pop(name, None)
    data.pop("name", None)
    return stable_hash(data)


# --------------------------------------------------------------------------------------------------
# The checkpoint callback


class ScheduledCheckpoints(L.Callback):
    """Saves a checkpoint at each scheduled pretraining length (epochs or optimizer steps).

    ``score(module) -> dict`` gives the validation values recorded in the manifest; ``save(length,
    module, manifest) -> Path`` writes the files; ``exists(length) -> Path | None`` finds an existing
    checkpoint (never rewritten). ``hooks`` follow the protocol in the module docstring.
    """

    def __init__(self, unit: str, lengths: Sequence[int], *, save: Callable, score: Callable, exists: Callable,
                 base_manifest: dict[str, Any], hooks: Sequence[CheckpointHook] = ()):
        super().__init__()
        if unit not in ("epoch", "step"):
            raise ConfigError(f"schedule.unit must be 'epoch' or 'step', got {unit!r}")
        self.unit = unit
        self.lengths = sorted(set(int(n) for n in lengths))
        self.save_fn, self.score_fn, self.exists_fn = save, score, exists
        self.base_manifest = dict(base_manifest)
        self.hooks = list(hooks)
        self.saved: list[int] = []  # written by this process
        self.skipped: list[int] = []  # already on disk
        self.hook_values: dict[int, dict[str, Any]] = {}
        self.stop_requested_at: Optional[int] = None

    # Lightning hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0 and trainer.current_epoch == 0 and 0 in self.lengths:
            self.checkpoint(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps and is already incremented here.
        if self.unit == "step" and trainer.global_step in self.lengths:
            self.checkpoint(trainer, pl_module, int(trainer.global_step))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # current_epoch is still the 0-based index of the epoch that just ended.
        if self.unit == "epoch" and trainer.current_epoch + 1 in self.lengths:
            self.checkpoint(trainer, pl_module, int(trainer.current_epoch + 1))

    # The work ----------------------------------------------------------------------------------------
    def checkpoint(self, trainer, pl_module, length: int) -> Optional[Path]:
        """Score, run the hooks and save the checkpoint of ``length`` unless it already exists."""
        from medxfer.models.weights import get_encoder

        if self.exists_fn(length) is not None:
            log.info("checkpoint of length %d %s exists; kept as is", length, self.unit)
            if length not in self.skipped:
                self.skipped.append(length)
            return None
        manifest = {
            **self.base_manifest,
            "pretraining_length": length,
            "length_unit": self.unit,
            "epoch": int(trainer.current_epoch + (1 if self.unit == "epoch" and length > 0 else 0)) if trainer else 0,
            "step": int(trainer.global_step) if trainer else 0,
            # epoch unit: mean training loss of the epoch; step unit: loss of the last batch
            "train_loss": (_metric(trainer, "train_loss_epoch" if self.unit == "epoch" else "train_loss_step")
                           if trainer and length > 0 else None),
        }
        manifest.update(self.score_fn(pl_module))
        encoder = get_encoder(pl_module)
        was_training = encoder.training
        encoder.eval()
        stop = False
        try:
            for hook in self.hooks:
                returned = hook(length, encoder, dict(manifest))
                if not returned:
                    continue
                if not isinstance(returned, dict):
                    raise ConfigError(f"checkpoint hook {_hook_name(hook)} returned a {type(returned).__name__}, "
                                      "expected a dict or None")
                returned = dict(returned)
                stop = bool(returned.pop("stop", False)) or stop
                clashing = sorted(set(returned) & (set(manifest) | _SAVE_ENCODER_FIELDS))
                if clashing:
                    raise ConfigError(f"checkpoint hook {_hook_name(hook)} returned field(s) {', '.join(clashing)} "
                                      "that the manifest already has; use other names")
                try:
                    json.dumps(returned)
                except (TypeError, ValueError):
                    raise ConfigError(f"checkpoint hook {_hook_name(hook)} returned values that are not "
                                      "JSON-able") from None
                manifest.update(returned)
                self.hook_values.setdefault(length, {}).update(returned)
        finally:
            encoder.train(was_training)
        if stop:
            manifest["stop_requested"] = True
        path = self.save_fn(length, pl_module, manifest)
        self.saved.append(length)
        log.info("saved checkpoint of length %d %s: %s", length, self.unit,
                 {k: manifest.get(k) for k in ("val_accuracy", "val_dice") if manifest.get(k) is not None})
        if stop:
            self.stop_requested_at = length
            if trainer is not None:
                trainer.should_stop = True
        return path


# Fields save_encoder writes itself (its ``extra`` must not reuse them).
_SAVE_ENCODER_FIELDS = frozenset({"format", "format_version", "state_dict", "arch", "channels", "strides",
                                  "spatial_dims", "in_channels", "length", "source", "n_parameters", "created"})


def _hook_name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(getattr(hook, "__self__", hook)).__name__


def _metric(trainer, name: str) -> Optional[float]:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def collect_hooks(callbacks: Sequence[Any], hooks: Sequence[CheckpointHook]) -> list[CheckpointHook]:
    """The hooks of a run: ``hooks`` plus the ``on_checkpoint`` method of every callback that has one."""
    found = list(hooks)
    for callback in callbacks:
        method = getattr(callback, "on_checkpoint", None)
        if callable(method):
            found.append(method)
    for hook in found:
        if not callable(hook):
            raise ConfigError(f"checkpoint hook {hook!r} is not callable")
    return found


# --------------------------------------------------------------------------------------------------
# Task setups: module, loaders, scorer and saver for each task


@dataclass
class PretrainSetup:
    """What a run trains: the Lightning module, its loaders, the checkpoint scorer, and what to record."""

    module: Any
    train_loader: Any
    val_loader: Any
    score: Callable
    dataset: str
    n_train: int
    n_val: int
    save_full_model: bool
    record: dict[str, Any]


def _steps_per_epoch(loader) -> int:
    return max(1, len(loader))


def _total_steps(config: PretrainConfig, steps_per_epoch: int) -> int:
    longest = max(config.schedule.lengths)
    return longest * steps_per_epoch if config.schedule.unit == "epoch" else longest


def _classification_setup(config: PretrainConfig, recipe: dict[str, Any], data=None) -> PretrainSetup:
    from torch.utils.data import DataLoader

    from medxfer.data.imagenet import AugmentationRecipe, load_imagenet, load_natural
    from medxfer.models import build_classifier, build_segmenter
    from medxfer.training.tasks import ClassificationTask

    c = config.classification
    augmentation = AugmentationRecipe(kind=recipe["augmentation"], crop_scale=tuple(recipe["crop_scale"]),
                                      color_jitter=float(recipe["color_jitter"]),
                                      auto_augment=recipe["auto_augment"])
    if data is None:
        if c.source == "imagenet":
            if c.root is None:
                raise ConfigError("classification.root: required for source 'imagenet' (the folder with labels.json)")
            data = load_imagenet(c.root, input_size=c.input_size, recipe=augmentation, labels_file=c.labels_file,
                                 n_classes=c.n_classes, train_images=c.train_images, val_images=c.val_images,
                                 seed=config.seed)
        else:
            data = load_natural(input_size=c.input_size, recipe=augmentation, n_per_class=c.n_per_class,
                                val_per_class=c.val_per_class, image_size=c.image_size, data_seed=c.data_seed)
    if config.model.in_channels not in (None, data.in_channels):
        raise ConfigError(f"model.in_channels={config.model.in_channels} but the {data.name} images have "
                          f"{data.in_channels} channels")
    # The preset's own encoder, so that the checkpoints fit the downstream model exactly.
    spec = config.model.model_copy(update={"in_channels": data.in_channels, "n_classes": 2})
    encoder = build_segmenter(spec).encoder
    if encoder.spatial_dims != 2:
        raise ConfigError(f"model.preset {config.model.preset!r} is 3D; classification pretraining needs a 2D preset")
    classifier = build_classifier(encoder, data.n_classes)

    t = config.train
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(t.batch_size, len(data.train))
    train_loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=len(data.train) > batch_size,
                              num_workers=t.num_workers, generator=generator,
                              persistent_workers=t.num_workers > 0)
    val_loader = DataLoader(data.val, batch_size=max(t.batch_size, 64), shuffle=False, num_workers=t.num_workers)
    total = _total_steps(config, _steps_per_epoch(train_loader))
    module = ClassificationTask(
        classifier, optimizer=recipe["optimizer"], lr=recipe["lr"], momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"], scheduler=recipe["scheduler"],
        warmup_steps=int(round(recipe["warmup_fraction"] * total)), total_steps=total,
        label_smoothing=recipe["label_smoothing"],
    )

    def score(pl_module) -> dict[str, Any]:
        result = pl_module.evaluate(val_loader)
        return {"val_accuracy": result["accuracy"], "val_loss": result["loss"]}

    return PretrainSetup(module, train_loader, val_loader, score, data.name, len(data.train), len(data.val), False,
                  {"n_classes": data.n_classes, "class_names": data.class_names})


def sparse_dice(model, loader, n_classes: int, patch_size=None, size_multiple: int = 1,
                overlap: float = 0.25) -> float:
    """Pooled Dice per foreground class over the cases that annotate it (ignore-index pixels left out),
    averaged over the classes with any annotated voxel; NaN when there are none."""
    from medxfer.data.base import IGNORE_INDEX
    from medxfer.data.patches import predict_logits

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
    from medxfer.data.base import check_case

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


def _segmentation_setup(config: PretrainConfig, recipe: dict[str, Any], data=None) -> PretrainSetup:
    from monai.data import DataLoader

    from medxfer.data import load_data, select_subset
    from medxfer.data.transforms import CaseDataset, training_augmentation
    from medxfer.models import build_segmenter
    from medxfer.training.losses import PARTIAL_PREFIX, build_loss
    from medxfer.training.tasks import SegmentationTask, scheduled_lr_factor

    d = config.data
    assert d is not None  # the config validator guarantees it
    data = data if data is not None else load_data(d)
    if data.spatial_dims != d.spatial_dims:
        raise ConfigError(f"data.spatial_dims={d.spatial_dims} but {data.name} is {data.spatial_dims}D")
    train_cases = select_subset(data.train, d.train_images, config.seed, d.subset)
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
    common = dict(n_classes=data.n_classes, normalization=d.normalization, percentiles=d.percentile_clip,
                  in_channels=model.in_channels)
    train_ds = CaseDataset(train_cases, transform=augmentation, **common)
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(t.batch_size, len(train_ds))
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=t.num_workers,
                              generator=generator)
    val_loader = (DataLoader(CaseDataset(data.val, **common), batch_size=1, shuffle=False, num_workers=t.num_workers)
                  if data.val else None)
    total = _total_steps(config, _steps_per_epoch(train_loader))
    warmup = int(round(recipe["warmup_fraction"] * total))
    train_cfg = TrainConfig(strategy="full", optimizer=recipe["optimizer"], lr=recipe["lr"],
                            weight_decay=recipe["weight_decay"], momentum=recipe["momentum"],
                            scheduler=recipe["scheduler"], batch_size=t.batch_size)
    size_multiple = int(max(model.encoder.strides))

    class SparseSegmentationTask(SegmentationTask):
        """SegmentationTask with the pretraining schedule (warm-up + cosine/step)."""

        def configure_optimizers(self):
            from medxfer.training.strategies import apply_strategy, build_optimizer

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


# --------------------------------------------------------------------------------------------------
# Saving and reading checkpoint folders


def _checkpoint_path(out: Path, length: int) -> Path:
    from medxfer.models.weights import checkpoint_filename

    return out / CHECKPOINT_DIR / checkpoint_filename(length)


def _model_path(out: Path, length: int) -> Path:
    return out / MODEL_DIR / f"model_len{int(length):04d}.pt"


def _make_saver(out: Path, config: PretrainConfig, save_full_model: bool) -> Callable:
    from medxfer.models.weights import save_encoder

    def save(length: int, pl_module, manifest: dict[str, Any]) -> Path:
        model = pl_module.model
        source = f"pretrain:{manifest['task']}:{manifest['dataset']}"
        if save_full_model:
            # The whole segmenter first: the encoder file is what marks the length as done.
            from medxfer.models import weights

            save_model = getattr(weights, "save_model_weights", None)
            if save_model is None:
                raise ConfigError("segmentation pretraining needs medxfer.models.weights.save_model_weights "
                                  "(to save the whole segmenter); it is not available")
            save_model(model, _model_path(out, length), manifest={
                **manifest, "length": length, "source": source,
                "model": config_to_dict(config.model.model_copy(update={
                    "in_channels": model.in_channels, "n_classes": model.n_classes})),
            })
        return save_encoder(model, _checkpoint_path(out, length), length=length, source=source, **manifest)

    return save


def _existing(out: Path) -> Callable[[int], Optional[Path]]:
    def exists(length: int) -> Optional[Path]:
        path = _checkpoint_path(out, length)
        return path if path.is_file() and path.with_suffix(".json").is_file() else None

    return exists


def read_checkpoints(out_dir: str | Path) -> list[CheckpointInfo]:
    """The encoder checkpoints of a pretraining folder, by length."""
    from medxfer.models.weights import list_checkpoints

    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return [CheckpointInfo(length, path, manifest) for length, path, manifest in list_checkpoints(folder)]


def resolve_model_checkpoint(path: str | Path, length: Optional[int]) -> Path:
    """The whole-segmenter checkpoint of ``length`` of a segmentation pretraining run, for a downstream
    ``pretrained.load`` of ``full`` or ``encoder_decoder``. ``path``: a model file (returned as is), the
    run folder, or its ``checkpoints/`` or ``models/`` folder."""
    from medxfer.errors import CheckpointError

    path = Path(path)
    if path.is_file():
        return path
    run = path.parent if path.name in (CHECKPOINT_DIR, MODEL_DIR) else path
    folder = run / MODEL_DIR
    available = sorted(int(p.stem[len("model_len"):]) for p in folder.glob("model_len*.pt")
                       if p.stem[len("model_len"):].isdigit()) if folder.is_dir() else []
    if not available:
        raise CheckpointError(f"{path}: no whole-model checkpoints (segmentation pretraining saves them in "
                              f"{MODEL_DIR}/; classification pretraining saves encoders only)")
    if length is None or length not in available:
        raise CheckpointError(f"{folder}: no whole-model checkpoint of length {length} "
                              f"(available: {', '.join(map(str, available))})")
    return _model_path(run, length)


def _guard_folder(out: Path, config: PretrainConfig, identity: str) -> None:
    """One folder, one pretraining config: refuse to mix checkpoints of different runs."""
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable ({type(exc).__name__}); remove it or use another output folder") from None
        if saved.get("config_hash") != identity:
            raise ConfigError(f"{out}: holds a pretraining run with another config (see {path}); "
                              "use another output folder")
    elif (out / CHECKPOINT_DIR).is_dir() and any((out / CHECKPOINT_DIR).glob("*.pt")):
        raise ConfigError(f"{out / CHECKPOINT_DIR}: holds checkpoints of an unknown run; use another output folder")
    else:
        atomic_write_json(path, {"config_hash": identity, "config": config_to_dict(config)})


# --------------------------------------------------------------------------------------------------
# The run


def prepare_pretraining(config: PretrainConfig, data: Any = None) -> PretrainSetup:
    """Seed, load the data and build the Lightning module of ``config`` (``data`` as in run_pretraining)."""
    seed_everything(config.seed)
    recipe = resolve_recipe(config)
    setup = _classification_setup if config.task == "classification" else _segmentation_setup
    return setup(config, recipe, data)


ONLINE_SCORE_FILE = "robustness_online.csv"


def _online_score_hook(config: PretrainConfig, out: Path) -> CheckpointHook:
    """The checkpoint hook that ``config.online_score`` asks for: the robustness score of each checkpoint
    goes into its manifest and ``robustness_online.csv``; pretraining stops when the patience rule fires,
    unless ``stop_early`` is off (then the score is only recorded)."""
    from medxfer.config import ScoreConfig, parse_config
    from medxfer.transferability.scoring import RobustnessEarlyStopping

    online = config.online_score
    settings = {"bootstrap": 0, "seed": config.seed, **online.settings,
                "data": config_to_dict(online.data), "checkpoints": str(out / CHECKPOINT_DIR), "out": str(out)}
    score_config = parse_config(settings, ScoreConfig, source=f"{config.name}: online_score")
    scorer = RobustnessEarlyStopping.from_config(score_config, pretraining_scheme=config.scheme,
                                                 csv_path=out / ONLINE_SCORE_FILE)

    def hook(length: int, encoder, manifest: dict) -> dict:
        returned = dict(scorer.on_checkpoint(length, encoder, manifest) or {})
        if not online.stop_early:
            returned.pop("stop", None)
        return returned

    return hook


def run_pretraining(config: PretrainConfig, out_dir: str | Path, callbacks: Optional[Sequence[Any]] = None,
                    progress: bool = False, *, hooks: Optional[Sequence[CheckpointHook]] = None,
                    data: Any = None) -> PretrainResult:
    """Pretrain as ``config`` says, saving the scheduled checkpoints under ``out_dir`` (see the module
    docstring for the layout); resume an interrupted run; return a finished one as it is.

    ``callbacks``: extra Lightning callbacks (those with an ``on_checkpoint`` method are also hooks);
    ``hooks``: extra checkpoint hooks; ``data``: an already loaded dataset to use instead of the
    configured one (a ``SegmentationData`` for segmentation, a ``ClassificationData`` for classification).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medxfer.training.strategies import prefers_channels_last, resolve_precision

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = config_identity(config)
    _guard_folder(out, config, identity)
    record_path = out / RECORD_FILE
    if record_path.is_file():
        log.info("pretraining in %s already done; reusing it", out)
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return PretrainResult(out, out / CHECKPOINT_DIR, read_checkpoints(out), record)

    started = time.perf_counter()
    recipe = resolve_recipe(config)
    setup = prepare_pretraining(config, data)
    if prefers_channels_last(setup.module.model.encoder.spatial_dims):
        setup.module.model.to(memory_format=torch.channels_last)  # cuDNN's fastest 2D kernels
    callbacks = list(callbacks or [])
    hooks = list(hooks or [])
    if config.online_score is not None:
        hooks.append(_online_score_hook(config, out))
    base_manifest = {
        "task": config.task, "scheme": config.scheme, "architecture": config.model.preset,
        "dataset": setup.dataset, "seed": config.seed, "run_name": config.name, "config_hash": identity,
    }
    scheduled = ScheduledCheckpoints(
        config.schedule.unit, config.schedule.lengths, save=_make_saver(out, config, setup.save_full_model),
        score=setup.score, exists=_existing(out), base_manifest=base_manifest,
        hooks=collect_hooks(callbacks, hooks),
    )
    longest = max(config.schedule.lengths)
    lightning_dir = out / LIGHTNING_DIR
    last = lightning_dir / "last.ckpt"
    epochs_trained = steps_trained = 0
    train_started = time.perf_counter()
    if longest == 0:
        scheduled.checkpoint(None, setup.module, 0)
    else:
        t = config.train
        by_epoch = config.schedule.unit == "epoch"
        # Overwrites one file ("last.ckpt"): at each epoch end, or every resume_every_n_steps steps.
        resume = ModelCheckpoint(dirpath=lightning_dir, filename="last", save_top_k=1, monitor=None,
                                 every_n_epochs=1 if by_epoch else None,
                                 every_n_train_steps=None if by_epoch else t.resume_every_n_steps,
                                 enable_version_counter=False, save_on_train_epoch_end=True)
        trainer = L.Trainer(
            default_root_dir=out, max_epochs=longest if by_epoch else -1, max_steps=-1 if by_epoch else longest,
            accelerator=t.accelerator, devices=1, precision=resolve_precision(t.precision),
            callbacks=[scheduled, *callbacks, resume],
            logger=False, enable_progress_bar=progress, enable_model_summary=False,
            log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0, limit_val_batches=0,
            deterministic=False,
        )
        if last.is_file():
            log.info("resuming pretraining from %s", last)
        with warnings.catch_warnings():
            # Expected here, not a problem: validation is done by the checkpoint callback, and the resume
            # folder is meant to be reused.
            warnings.filterwarnings("ignore", message=".*validation_step.* but have no `val_dataloader`")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            trainer.fit(setup.module, setup.train_loader, ckpt_path=str(last) if last.is_file() else None)
        epochs_trained, steps_trained = int(trainer.current_epoch), int(trainer.global_step)
        if scheduled.stop_requested_at is None and not _schedule_done(out, config):
            # A callback set trainer.should_stop itself (allowed by the hook protocol): a stop, like "stop".
            saved = [n for n in config.schedule.lengths if _existing(out)(n) is not None]
            scheduled.stop_requested_at = max(saved) if saved else 0
            log.info("pretraining stopped by a callback after %d %s(s)", scheduled.stop_requested_at,
                     config.schedule.unit)
    train_s = time.perf_counter() - train_started

    checkpoints = read_checkpoints(out)
    record = {
        "kind": "pretrain",
        "status": "stopped" if scheduled.stop_requested_at is not None else "done",
        "name": config.name,
        "config": config_to_dict(config),
        "config_hash": identity,
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
        "task": config.task,
        "scheme": config.scheme,
        "architecture": config.model.preset,
        "dataset": setup.dataset,
        "seed": config.seed,
        "n_train_images": setup.n_train,
        "n_val_images": setup.n_val,
        "schedule": {"unit": config.schedule.unit, "lengths": list(config.schedule.lengths)},
        "stopped_at": scheduled.stop_requested_at,
        "checkpoints": [
            {"length": c.length, "path": str(c.path.relative_to(out)),
             **{k: c.manifest.get(k) for k in ("val_accuracy", "val_dice", "val_loss", "train_loss", "epoch", "step")},
             "hooks": scheduled.hook_values.get(c.length, {})}
            for c in checkpoints
        ],
        "epochs_trained": epochs_trained,
        "steps_trained": steps_trained,
        "timings": {"train_s": train_s, "total_s": time.perf_counter() - started},
        "environment": environment_info(),
        "finished": datetime.now(timezone.utc).isoformat(),
        **setup.record,
    }
    atomic_write_json(record_path, record)
    shutil.rmtree(lightning_dir, ignore_errors=True)  # the checkpoints and the record are what a finished run keeps
    return PretrainResult(out, out / CHECKPOINT_DIR, checkpoints, record)


def _schedule_done(out: Path, config: PretrainConfig) -> bool:
    exists = _existing(out)
    return all(exists(n) is not None for n in config.schedule.lengths)
