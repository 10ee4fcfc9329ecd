"""The pretraining run: seed, set up the task, train with the checkpoint schedule, resume, record."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from medxfer.config import PretrainConfig, config_to_dict
from medxfer.errors import TrainingDiverged
from medxfer.io import atomic_write_json, environment_info, folder_lock, seed_everything, set_aside
from medxfer.models.weights import load_encoder_weights, resolve_checkpoint
from medxfer.pretraining.checkpoints import (
    CHECKPOINT_DIR, LIGHTNING_DIR, MODEL_DIR, RECORD_FILE, CheckpointInfo, existing_checkpoint, guard_folder,
    make_saver, read_checkpoints,
)
from medxfer.pretraining.classification import classification_setup
from medxfer.pretraining.history import TrainingHistory
from medxfer.pretraining.online import online_score_hook
from medxfer.pretraining.recipes import PretrainSetup, config_identity, resolve_recipe, steps_per_epoch, total_steps
from medxfer.progress import training_progress_callback
from medxfer.pretraining.schedule import CheckpointHook, ScheduledCheckpoints, collect_hooks
from medxfer.pretraining.segmentation import segmentation_setup
from medxfer.records import load_record, remove_partial_files
from medxfer.training.resume import AtomicCheckpointIO, fit, usable_resume_checkpoint
from medxfer.training.strategies import prefers_channels_last, resolve_accelerator, resolve_precision

log = logging.getLogger(__name__)


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




def prepare_pretraining(config: PretrainConfig, data: Any = None) -> PretrainSetup:
    """Seed, load the data and build the Lightning module of ``config`` (``data`` as in run_pretraining)."""
    seed_everything(config.seed)
    recipe = resolve_recipe(config)
    setup = classification_setup if config.task == "classification" else segmentation_setup
    prepared = setup(config, recipe, data)
    if config.pretrained is not None:
        path = resolve_checkpoint(config.pretrained.checkpoint, config.pretrained.length)
        manifest = load_encoder_weights(prepared.module.model, path)
        prepared.record["started_from"] = {"checkpoint": str(path), "source": manifest.get("source"),
                                           "length": manifest.get("length")}
        log.info("pretraining continues from %s", path)
    return prepared



def run_pretraining(config: PretrainConfig, out_dir: str | Path, callbacks: Optional[Sequence[Any]] = None,
                    progress: bool = False, *, hooks: Optional[Sequence[CheckpointHook]] = None,
                    data: Any = None) -> PretrainResult:
    """Pretrain as ``config`` says, saving the scheduled checkpoints under ``out_dir`` (see the module
    docstring for the layout); resume an interrupted run; return a finished one as it is.

    ``callbacks``: extra Lightning callbacks (those with an ``on_checkpoint`` method are also hooks);
    ``hooks``: extra checkpoint hooks; ``data``: an already loaded dataset to use instead of the
    configured one (a ``SegmentationData`` for segmentation, a ``ClassificationData`` for classification).
    """
    accelerator = resolve_accelerator(config.train.accelerator)  # before any folder or work
    out = Path(out_dir)
    # One process per folder: a second one would train the same run again and resume from our live files.
    with folder_lock(out, "pretraining folder"):
        identity = config_identity(config)
        guard_folder(out, config, identity)
        record_path = out / RECORD_FILE
        record = load_record(record_path)
        if record is not None:
            log.info("pretraining in %s already done; reusing it", out)
            shutil.rmtree(out / LIGHTNING_DIR, ignore_errors=True)  # left if killed right after the record
            return PretrainResult(out, out / CHECKPOINT_DIR, read_checkpoints(out), record)
        if record_path.exists():  # damaged from outside (named in the warning above): recorded again
            set_aside(record_path)
        remove_partial_files(out, recursive=True)  # temp files of a killed attempt; no one else writes here
        try:
            return _pretrain(config, out, identity, accelerator, callbacks, progress, hooks, data)
        except TrainingDiverged as exc:
            raise TrainingDiverged(f"pretraining {config.name} in {out}: {exc}") from None


def _pretrain(config: PretrainConfig, out: Path, identity: str, accelerator: str,
              callbacks: Optional[Sequence[Any]], progress: bool, hooks: Optional[Sequence[CheckpointHook]],
              data: Any) -> PretrainResult:
    record_path = out / RECORD_FILE
    started = time.perf_counter()
    recipe = resolve_recipe(config)
    setup = prepare_pretraining(config, data)
    if prefers_channels_last(setup.module.model.encoder.spatial_dims):
        setup.module.model.to(memory_format=torch.channels_last)  # cuDNN's fastest 2D kernels
    callbacks = list(callbacks or [])
    hooks = list(hooks or [])
    if config.online_score is not None:
        hooks.append(online_score_hook(config, out))
    base_manifest = {
        "task": config.task, "scheme": config.scheme, "architecture": config.model.preset,
        "dataset": setup.dataset, "seed": config.seed, "run_name": config.name, "config_hash": identity,
    }
    if "started_from" in setup.record:  # every checkpoint says which encoder its pretraining began with
        base_manifest["started_from"] = setup.record["started_from"]
    scheduled = ScheduledCheckpoints(
        config.schedule.unit, config.schedule.lengths, save=make_saver(out, config, setup.save_full_model),
        score=setup.score, exists=existing_checkpoint(out), base_manifest=base_manifest,
        hooks=collect_hooks(callbacks, hooks),
    )
    longest = max(config.schedule.lengths)
    lightning_dir = out / LIGHTNING_DIR
    last = usable_resume_checkpoint(lightning_dir / "last.ckpt")
    epochs_trained = steps_trained = 0
    history = TrainingHistory(config.train.log_every_n_steps)
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
        watchers = [history]
        if not progress:  # no bar: plain "step i/N loss x" lines, shown when the CLI's stdout is a file or pipe
            watchers.append(training_progress_callback(
                f"pretraining {config.name}", total_steps(config, steps_per_epoch(setup.train_loader))))
        trainer = L.Trainer(
            default_root_dir=out, max_epochs=longest if by_epoch else -1, max_steps=-1 if by_epoch else longest,
            accelerator=accelerator, devices=1, precision=resolve_precision(t.precision),
            callbacks=[scheduled, *callbacks, *watchers, resume],
            logger=False, enable_progress_bar=progress, enable_model_summary=False,
            log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0, limit_val_batches=0,
            deterministic=False, plugins=[AtomicCheckpointIO()],
        )
        if last is not None:
            log.info("resuming pretraining from %s", last)
        with warnings.catch_warnings():
            # Expected here, not a problem: validation is done by the checkpoint callback, and the resume
            # folder is meant to be reused.
            warnings.filterwarnings("ignore", message=".*validation_step.* but have no `val_dataloader`")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            fit(trainer, setup.module, setup.train_loader, ckpt_path=None if last is None else str(last))
        epochs_trained, steps_trained = int(trainer.current_epoch), int(trainer.global_step)
        if scheduled.stop_requested_at is None and not _schedule_done(out, config):
            # A callback set trainer.should_stop itself (allowed by the hook protocol): a stop, like "stop".
            saved = [n for n in config.schedule.lengths if existing_checkpoint(out)(n) is not None]
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
        # train_s: training time of every invocation of this run (resumes included); total_s: this process
        "timings": {"train_s": history.train_s, "invocations": history.invocations,
                    "train_s_this_invocation": train_s, "total_s": time.perf_counter() - started},
        "train_loss_curve": history.curve,  # mean training loss per train.log_every_n_steps optimizer steps
        "environment": environment_info(),
        "finished": datetime.now(timezone.utc).isoformat(),
        **setup.record,
    }
    atomic_write_json(record_path, record)
    shutil.rmtree(lightning_dir, ignore_errors=True)  # the checkpoints and the record are what a finished run keeps
    return PretrainResult(out, out / CHECKPOINT_DIR, checkpoints, record)


def _schedule_done(out: Path, config: PretrainConfig) -> bool:
    exists = existing_checkpoint(out)
    return all(exists(n) is not None for n in config.schedule.lengths)
