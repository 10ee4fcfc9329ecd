"""The pretraining run: seed, set up the task, train with the checkpoint schedule, resume, record."""

from __future__ import annotations

import logging
import os
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

from medxfer.config import PretrainConfig, config_to_dict, parse_config
from medxfer.errors import CheckpointError, ConfigError, TrainingDiverged
from medxfer.io import atomic_path, atomic_write_json, environment_info, folder_lock, seed_everything, set_aside
from medxfer.models.weights import load_encoder_weights, load_model_weights, resolve_checkpoint
from medxfer.pretraining.checkpoints import (
    CHECKPOINT_DIR, FINAL_STATE_FILE as FINAL_STATE_NAME, LIGHTNING_DIR, MODEL_DIR, RECORD_FILE, CheckpointInfo, existing_checkpoint, final_state_path,
    guard_folder, make_saver, read_checkpoints, read_folder_config, resolve_model_checkpoint, write_folder_config,
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
from medxfer.threads import resolve_threads, threads_record, threads_source, torch_threads

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
    pre = config.pretrained
    if pre is not None:
        if pre.load == "encoder":
            path = resolve_checkpoint(pre.checkpoint, pre.length)
            manifest = load_encoder_weights(prepared.module.model, path)
        else:
            path = resolve_model_checkpoint(pre.checkpoint, pre.length)
            manifest = load_model_weights(prepared.module.model, path, head=pre.load == "full")
        started = {"checkpoint": str(path), "source": manifest.get("source"), "length": manifest.get("length"),
                   "load": pre.load}
        if pre.load == "full":
            state_file, prepared.optimizer_state = final_optimizer_state(path, manifest)
            started["optimizer_state"] = None if state_file is None else str(state_file)
        prepared.record["started_from"] = started
        log.info("pretraining continues from %s (%s)", path, pre.load)
    return prepared


def final_optimizer_state(model_file: Path, manifest: dict[str, Any]) -> tuple[Optional[Path], Optional[dict]]:
    """The optimizer state of a whole-model checkpoint ``models/model_lenNNNN.pt``: from its run's final
    state when that run ended at this checkpoint's step (only the end state is kept), else none."""
    state_file = final_state_path(Path(model_file).parent.parent)
    if not state_file.is_file():
        log.warning("%s: no final state beside it; pretraining continues with a fresh optimizer", model_file)
        return None, None
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: one line naming it
        raise CheckpointError(f"{state_file}: unreadable ({type(exc).__name__}: {exc})") from None
    if state.get("global_step") != manifest.get("step") or not state.get("optimizer_states"):
        log.warning("%s: its run ended at step %s, not at this checkpoint's step %s; only the end state is kept, "
                    "so pretraining continues with a fresh optimizer", model_file, state.get("global_step"),
                    manifest.get("step"))
        return None, None
    return state_file, state["optimizer_states"][0]


class LoadOptimizerState(L.Callback):
    """Loads a saved optimizer state (``final_optimizer_state``) before the first step of a new run (not when
    resuming, where Lightning restores the run's own). The saved groups must match the optimizer's: same model,
    same parameter grouping; hyperparameters (lr, weight decay) stay those of this run."""

    def __init__(self, state: dict[str, Any], source: str) -> None:
        super().__init__()
        self.state, self.source = state, source

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step != 0:
            return
        optimizer = trainer.optimizers[0]
        current = optimizer.state_dict()
        saved_groups = [len(g["params"]) for g in self.state.get("param_groups", [])]
        groups = [len(g["params"]) for g in current["param_groups"]]
        if saved_groups != groups:
            raise CheckpointError(f"{self.source}: its optimizer state has parameter groups of sizes {saved_groups}, "
                                  f"this run's optimizer {groups}; use the same model and optimizer settings")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, values in self.state.get("state", {}).items():
            for name, value in values.items():
                if torch.is_tensor(value) and value.ndim and tuple(value.shape) != tuple(params[int(index)].shape):
                    raise CheckpointError(f"{self.source}: optimizer state {name} of parameter {index} has shape "
                                          f"{tuple(value.shape)}, the parameter {tuple(params[int(index)].shape)}")
        optimizer.load_state_dict({"state": self.state["state"], "param_groups": current["param_groups"]})



def start_extension(out: Path, config: PretrainConfig, identity: str, base_identity: str,
                    previous: dict[str, Any], record: Optional[dict[str, Any]]) -> None:
    """Turn the finished run in ``out`` into the start of ``config``, the same run with later lengths added:
    its final state becomes the resume checkpoint, its record is kept as ``pretrain_lenNNNN.json`` and the
    folder's config becomes ``config``. Anything else (a length dropped or added inside the finished
    schedule, an unfinished or stopped run, no final state) is a one-line ``ConfigError``."""
    old = parse_config(previous.get("config"), PretrainConfig, source=str(out / "pretrain_config.json"))
    old_lengths, new_lengths = set(old.schedule.lengths), set(config.schedule.lengths)
    longest = max(old_lengths)
    unit = config.schedule.unit
    dropped = sorted(old_lengths - new_lengths)
    if dropped:
        raise ConfigError(f"{out}: schedule.lengths leaves out {dropped} of the run in this folder "
                          f"({sorted(old_lengths)}); an extension keeps every length and adds later ones")
    inside = sorted(n for n in new_lengths - old_lengths if n <= longest)
    if inside:
        raise ConfigError(f"{out}: schedule.lengths adds {inside} inside the schedule of the run in this folder "
                          f"(up to {longest} {unit}s); pretraining has passed them, only later lengths can be added")
    if record is None:
        raise ConfigError(f"{out}: the run in this folder (lengths {sorted(old_lengths)}) is not finished; finish "
                          "it with its own config before adding lengths")
    if record.get("status") != "done":
        raise ConfigError(f"{out}: the run in this folder was stopped at {record.get('stopped_at')} {unit}s by a "
                          "stop rule or callback; it cannot be extended")
    state = final_state_path(out)
    if longest > 0 and not state.is_file():
        raise ConfigError(f"{state}: missing, so the run in this folder cannot be extended (it kept no final "
                          f"state); continue it in another folder with pretrained: {{checkpoint: {out}, "
                          f"length: {longest}, load: full}}")
    # Order: the resume state first, then the old record aside, then the new config; a kill in between
    # leaves a folder that its old config finishes at once (no training left) or this call redoes.
    if longest > 0:
        with atomic_path(out / LIGHTNING_DIR / "last.ckpt") as tmp:
            shutil.copyfile(state, tmp)
    kept = f"pretrain_len{longest:04d}.json"
    os.replace(out / RECORD_FILE, out / kept)
    extensions = list(previous.get("extensions", [])) + [{"lengths": sorted(old_lengths), "record": kept}]
    write_folder_config(out, config, identity, base_hash=base_identity, extensions=extensions)
    log.info("extending the pretraining in %s from %d to %d %ss", out, longest, max(new_lengths), unit)


def run_pretraining(config: PretrainConfig, out_dir: str | Path, callbacks: Optional[Sequence[Any]] = None,
                    progress: bool = False, *, hooks: Optional[Sequence[CheckpointHook]] = None,
                    data: Any = None, threads: Optional[int] = None) -> PretrainResult:
    """Pretrain as ``config`` says, saving the scheduled checkpoints under ``out_dir`` (see the module
    docstring for the layout); resume an interrupted run; return a finished one as it is.

    ``callbacks``: extra Lightning callbacks (those with an ``on_checkpoint`` method are also hooks);
    ``hooks``: extra checkpoint hooks; ``data``: an already loaded dataset to use instead of the
    configured one (a ``SegmentationData`` for segmentation, a ``ClassificationData`` for classification);
    ``threads``: intra-op threads (a sweep worker's share), None = resolved as for a fine-tune
    (:func:`medxfer.threads.resolve_threads`; not part of the folder's identity, recorded in ``pretrain.json``).
    """
    accelerator = resolve_accelerator(config.train.accelerator)  # before any folder or work
    out = Path(out_dir)
    # One process per folder: a second one would train the same run again and resume from our live files.
    with folder_lock(out, "pretraining folder"):
        identity = config_identity(config)
        base_identity = config_identity(config, with_lengths=False)
        previous = guard_folder(out, config, identity, base_identity)
        record_path = out / RECORD_FILE
        record = load_record(record_path)
        if previous is not None:  # the same run with other lengths: an extension of its ladder, or an error
            start_extension(out, config, identity, base_identity, previous, record)
            record = None
        if record is not None:
            log.info("pretraining in %s already done; reusing it", out)
            shutil.rmtree(out / LIGHTNING_DIR, ignore_errors=True)  # left if killed right after the record
            return PretrainResult(out, out / CHECKPOINT_DIR, read_checkpoints(out), record)
        if record_path.exists():  # damaged from outside (named in the warning above): recorded again
            set_aside(record_path)
        remove_partial_files(out, recursive=True)  # temp files of a killed attempt; no one else writes here
        source = threads_source(threads)
        threads = resolve_threads(threads)
        try:
            with torch_threads(threads):
                return _pretrain(config, out, identity, accelerator, callbacks, progress, hooks, data,
                                 threads_record(threads, source))
        except TrainingDiverged as exc:
            raise TrainingDiverged(f"pretraining {config.name} in {out}: {exc}") from None


def _pretrain(config: PretrainConfig, out: Path, identity: str, accelerator: str,
              callbacks: Optional[Sequence[Any]], progress: bool, hooks: Optional[Sequence[CheckpointHook]],
              data: Any, threads_info: dict[str, Any]) -> PretrainResult:
    record_path = out / RECORD_FILE
    started = time.perf_counter()
    recipe = resolve_recipe(config)
    setup = prepare_pretraining(config, data)
    if prefers_channels_last(setup.module.model, setup.module.model.encoder.spatial_dims):
        setup.module.model.to(memory_format=torch.channels_last)
    callbacks = list(callbacks or [])
    if setup.optimizer_state is not None:
        callbacks.append(LoadOptimizerState(setup.optimizer_state, setup.record["started_from"]["optimizer_state"]))
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
        # weights, optimizer, LR schedule, counters: what extending this ladder (or pretrained: {load: full})
        # continues from
        trainer.save_checkpoint(final_state_path(out))
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
        # earlier ladders this run extended (their lengths and the record each one wrote), oldest first
        "extensions": (read_folder_config(out) or {}).get("extensions", []),
        "final_state": FINAL_STATE_NAME if (out / FINAL_STATE_NAME).is_file() else None,
        "environment": environment_info(),
        "threads": threads_info,  # intra-op threads, where the count came from, OpenMP's wait policy
        "finished": datetime.now(timezone.utc).isoformat(),
        **setup.record,
    }
    atomic_write_json(record_path, record)
    shutil.rmtree(lightning_dir, ignore_errors=True)  # the checkpoints and the record are what a finished run keeps
    return PretrainResult(out, out / CHECKPOINT_DIR, checkpoints, record)


def _schedule_done(out: Path, config: PretrainConfig) -> bool:
    exists = existing_checkpoint(out)
    return all(exists(n) is not None for n in config.schedule.lengths)
