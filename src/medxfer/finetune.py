"""One downstream run: build the model, load the starting weights, train, evaluate -> a run record."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from medxfer.config import DataConfig, RunConfig, config_to_dict
from medxfer.data import load_data, select_subset
from medxfer.data.base import SegmentationData, content_fingerprint, size_mismatch, spacing_summary
from medxfer.errors import ConfigError, FolderInUse, TrainingDiverged
from medxfer.evaluation.metrics import HEADLINES, class_keys
from medxfer.io import environment_info, folder_lock, seed_everything, set_aside, stable_hash
from medxfer.progress import training_progress_callback
from medxfer.records import (
    RESULT_FILE,
    SOURCE_BEFORE,
    load_record,
    read_record,
    remove_partial_files,
    run_dir as store_run_dir,
    write_error,
    write_record,
)
from medxfer.threads import resolve_threads, threads_record, threads_source, torch_threads

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"  # a run's resume state (last.ckpt); removed when the run is done


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    record: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["metrics"]


def run_id_for(config: RunConfig) -> str:
    """Stable id: the hash of the canonical resolved config. Key order is irrelevant; every default is
    included, so two configs share an id exactly when they describe the same run. Names change no result
    and are left out (``name`` here, ``data.label`` by its field), so one run from ``finetune`` and from a
    sweep is computed once. (Ids from before names were left out differ: such old records are not reused.)"""
    data = {key: value for key, value in config_to_dict(config).items() if key not in ID_EXCLUDED}
    if data.get("data_seed") is None:
        data.pop("data_seed", None)  # None = seed: the same run as before data_seed existed, the same id
    if data["train"].get("unfreeze_after_steps") is None:
        data["train"].pop("unfreeze_after_steps", None)  # as before the gradual strategy existed: the same id
    if data["data"].get("preprocess") is None:
        data["data"].pop("preprocess", None)  # as before data.preprocess existed: the same id
    if data["train"].get("num_workers") is None:
        # auto = 0 for in-memory data, and cache-backed patches are the same for any worker count: the same
        # run as num_workers 0, the same id
        data["train"]["num_workers"] = 0
    # The thread count changes the float sums, so the numbers (docs/finetune.md, "Threads and reproducibility"):
    # always part of the id, resolved as the run will resolve it (never from what medxfer wrote into the
    # environment itself).
    data["train"]["threads"] = resolve_threads(config.train.threads)
    return stable_hash(data)


def with_resolved_threads(config: RunConfig, workers: int = 1) -> RunConfig:
    """``config`` with ``train.threads`` set to the count the run uses (:func:`medxfer.threads.resolve_threads`
    for one of ``workers`` runs at a time)."""
    if config.train.threads is not None:
        return config
    threads = resolve_threads(None, workers)
    return config.model_copy(update={"train": config.train.model_copy(update={"threads": threads})})


ID_EXCLUDED = ("name",)  # RunConfig keys that name a run without changing it


def _load_starting_weights(model: torch.nn.Module, config: RunConfig) -> dict[str, Any]:
    """Load what ``pretrained`` names into ``model``; return what the record says about it."""
    from medxfer.models.importing import weights_label
    from medxfer.models.weights import load_encoder_weights, load_model_weights, resolve_checkpoint

    pre = config.pretrained
    info: dict[str, Any] = {"length": pre.length, "scheme": pre.scheme, "accuracy": None,
                            "checkpoint": None, "load": pre.load}
    if config.train.strategy == "scratch" or pre.checkpoint is None:
        info["load"] = None
        return info
    if pre.load == "encoder":
        path = resolve_checkpoint(pre.checkpoint, pre.length)
    else:
        from medxfer.pretraining.checkpoints import resolve_model_checkpoint

        path = resolve_model_checkpoint(pre.checkpoint, pre.length)
    if pre.load == "encoder":
        manifest = load_encoder_weights(model, path)
    else:
        manifest = load_model_weights(model, path, head=pre.load == "full")
    info["checkpoint"] = str(path)
    from medxfer.pretraining.checkpoints import length_unit

    info["length_unit"] = length_unit(path)  # e.g. {"unit": "step", "data": "fashion-mnist"}: figure axes say it
    if info["length"] is None:
        info["length"] = manifest.get("length")
    info["accuracy"] = manifest.get("val_accuracy")
    # the arm's name in tables: the config's scheme, else the checkpoint's (pretraining), else what imported
    # weights are (their manifest's label, e.g. "ImageNet efficientnet-lite0")
    info["scheme"] = info["scheme"] or manifest.get("scheme") or weights_label(manifest)
    return info


def build_model(config: RunConfig, data: SegmentationData) -> torch.nn.Module:
    from medxfer.models import build_segmenter

    spec = config.model.model_copy(update={
        "in_channels": config.model.in_channels or data.in_channels,
        "n_classes": config.model.n_classes or data.n_classes,
    })
    if spec.n_classes != data.n_classes:
        raise ConfigError(f"model.n_classes={spec.n_classes} but dataset {data.name} has {data.n_classes} classes")
    return build_segmenter(spec)


def _resolve_loss(config: RunConfig, train_cases, n_classes: int):
    from medxfer.training.losses import build_loss, label_statistics, select_loss

    annotated = [c.annotated for c in train_cases]
    stats = label_statistics([c.label for c in train_cases], n_classes, annotated)
    if config.train.loss == "auto":
        name, options, reason = select_loss(stats)
    else:
        name, options, reason = config.train.loss, dict(config.train.loss_options), "set in config"
    info = {"name": name, "options": options, "reason": reason, "label_statistics": stats}
    return build_loss(name, **options), info


def _loaders(config: RunConfig, train_cases, val_cases, n_classes: int, in_channels: int):
    from monai.data import DataLoader

    from medxfer.data.patch_dataset import CachedPatchDataset, default_num_workers
    from medxfer.data.preprocess import image_normalization
    from medxfer.data.sampling import EpochSeededSampler, ResumableDataLoader
    from medxfer.data.transforms import CaseDataset, training_augmentation

    d = config.data
    cached = d.preprocess is not None and d.patch_size is not None
    workers = config.train.num_workers
    if workers is None:
        workers = default_num_workers(cached)
    common = dict(n_classes=n_classes, normalization=image_normalization(d), percentiles=d.percentile_clip,
                  in_channels=in_channels)
    # Every epoch's batches and each item's augmentation seed come from (seed, epoch), and the loader's
    # position is saved in the resume checkpoint: a resumed run trains on exactly the uninterrupted batches.
    batch_size = min(config.train.batch_size, len(train_cases))
    if cached:  # patches read from the on-disk cache
        train_ds = CachedPatchDataset(train_cases, n_classes, d.patch_size, d.foreground_ratio, d.augment,
                                      in_channels)
        sampler = EpochSeededSampler(len(train_ds), config.seed)
        train_loader = ResumableDataLoader(train_ds, sampler, batch_size, num_workers=workers,
                                           persistent_workers=workers > 0)
    else:
        augmentation = training_augmentation(d.spatial_dims, d.patch_size, d.foreground_ratio, d.augment)
        train_ds = CaseDataset(train_cases, transform=augmentation, **common)
        mismatch = size_mismatch(train_cases) if d.patch_size is None else None
        if mismatch:
            raise ConfigError(f"data: {mismatch}")
        if config.train.sampling == "with_replacement":  # fixed-size batches: no batch of one on few images
            batch_size = config.train.batch_size
            sampler = EpochSeededSampler(len(train_ds), config.seed, replacement=True,
                                         num_samples=math.ceil(len(train_ds) / batch_size) * batch_size)
        else:
            sampler = EpochSeededSampler(len(train_ds), config.seed)
        train_loader = ResumableDataLoader(train_ds, sampler, batch_size, num_workers=workers)
    val_loader = None
    if val_cases:
        val_loader = DataLoader(CaseDataset(val_cases, **common), batch_size=1, shuffle=False,
                                num_workers=min(workers, 1))
    return train_loader, val_loader


def _evaluate_on(model, data_config: DataConfig, config: RunConfig, in_channels: int, size_multiple: int,
                 cases=None, n_classes: Optional[int] = None,
                 class_names: Optional[list[str]] = None) -> dict[str, Any]:
    from medxfer.evaluation.evaluate import evaluate_test_set

    if cases is None:
        data = load_data(data_config)
        cases, n_classes, class_names = data.test, data.n_classes, data.class_names
    return evaluate_test_set(model, cases, n_classes, class_names, data_config, config.evaluation,
                             in_channels=in_channels, size_multiple=size_multiple)


def _source_baseline(model, config: RunConfig, data: SegmentationData, in_channels: int,
                     size_multiple: int) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """The starting model on ``evaluation.source_test`` before fine-tuning, when its segmentation head came
    with the weights (``pretrained.load: full``) and fits the source's classes; else None and why not.
    Evaluated through the one evaluation function (as ``medxfer evaluate`` does), with the random state
    kept, so training is the same with or without it."""
    import random

    source = config.evaluation.source_test
    if source is None:
        return None, None
    if config.train.strategy == "scratch" or config.pretrained.checkpoint is None or config.pretrained.load != "full":
        return None, {"computed": False, "reason": "the starting weights carry no segmentation head "
                                                   "(pretrained.load is not full)"}
    source_data = load_data(source)
    if source_data.n_classes != data.n_classes or list(source_data.class_names) != list(data.class_names):
        return None, {"computed": False, "reason": f"the head's classes ({', '.join(data.class_names)}) differ from "
                                                   f"the source test set's ({', '.join(source_data.class_names)})"}
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        was_training = model.training
        evaluation = _evaluate_on(model.eval(), source, config, in_channels, size_multiple, cases=source_data.test,
                                  n_classes=source_data.n_classes, class_names=source_data.class_names)
        model.train(was_training)
    random.setstate(states[0])
    np.random.set_state(states[1])
    return evaluation, {"computed": True, "test_set": SOURCE_BEFORE, "checkpoint": str(config.pretrained.checkpoint)}


def _slice_geometry(train_cases, data: SegmentationData) -> dict[str, Any]:
    """What ``predict`` compares its inputs with: the training images' spatial shapes and, where the dataset
    says, the anatomical plane of its 2D slices (``meta["slice_orientation"]``, e.g. colin27's "axial")."""
    return {"train_shapes": sorted({tuple(int(n) for n in c.spatial_shape) for c in train_cases}),
            "slice_orientation": data.meta.get("slice_orientation")}


def resume_checkpoint(directory: Path, every_s: Optional[float]):
    """The callback that writes ``last.ckpt`` (weights + optimizer state, for resuming an interrupted run):
    every ``every_s`` seconds of training, or at every epoch end when ``every_s`` is None."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=directory, filename="last", save_top_k=1, monitor=None,
                           enable_version_counter=False, save_on_train_epoch_end=True,
                           every_n_epochs=None if every_s else 1,
                           train_time_interval=timedelta(seconds=every_s) if every_s else None)


def run_finetune(config: RunConfig, out_dir: str | Path, *, progress: bool = False,
                 extra_record: Optional[dict[str, Any]] = None, callbacks: Optional[list] = None) -> RunResult:
    """Train and evaluate one run under ``out_dir/runs/<run_id>``; a finished run is returned as is,
    an interrupted one resumes from its last Lightning checkpoint. Torch runs with the run's thread count
    (``train.threads``, resolved) and is given its previous count back afterwards."""
    source = threads_source(config.train.threads)
    config = with_resolved_threads(config)
    with torch_threads(config.train.threads):
        return _run_finetune(config, out_dir, progress, extra_record, callbacks,
                             threads_record(config.train.threads, source))


def _run_finetune(config: RunConfig, out_dir: str | Path, progress: bool, extra_record: Optional[dict[str, Any]],
                  callbacks: Optional[list], threads_info: dict[str, Any]) -> RunResult:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from medxfer.models.weights import save_model_weights
    from medxfer.training.resume import AtomicCheckpointIO, fit, usable_resume_checkpoint
    from medxfer.training.strategies import prefers_channels_last, resolve_accelerator, resolve_precision
    from medxfer.training.curves import TrainingCurves
    from medxfer.training.tasks import BestWeights, SegmentationTask

    run_id = run_id_for(config)
    directory = store_run_dir(out_dir, run_id)
    if load_record(directory / RESULT_FILE, warn=False) is not None:
        return _finished(run_id, directory)
    started = time.perf_counter()
    seed_everything(config.seed)
    accelerator = resolve_accelerator(config.train.accelerator)  # before any work or folder

    data = load_data(config.data)
    class_keys(data.n_classes, data.class_names)  # unusable class names fail now, not after training
    train_cases = select_subset(data.train, config.data.train_images, config.subset_seed, config.data.subset)
    warnings = split_warnings(data, train_cases)
    for warning in warnings:
        log.warning("run %s: %s", run_id, warning)
    model = build_model(config, data)
    pretraining = _load_starting_weights(model, config)
    in_channels = model.encoder.in_channels
    size_multiple = int(model.required_multiple)  # inputs are padded to the total stride
    # The forgetting baseline: the starting model's own score on the source test set, before any training
    # (a fine-tuned run's "source" score is read against it).
    source_before, baseline_info = _source_baseline(model, config, data, in_channels, size_multiple)
    loss, loss_info = _resolve_loss(config, train_cases, data.n_classes)
    train_loader, val_loader = _loaders(config, train_cases, data.val, data.n_classes, in_channels)

    t = config.train
    steps_per_epoch = len(train_loader)
    total_steps = t.max_steps if t.max_steps > 0 else t.max_epochs * steps_per_epoch
    task = SegmentationTask(model, loss, t, data.n_classes, patch_size=config.data.patch_size,
                            size_multiple=size_multiple, sw_overlap=config.evaluation.sw_overlap,
                            total_steps=total_steps, headline=config.evaluation.headline,
                            pretrained_encoder=pretraining["load"] is not None)
    if prefers_channels_last(model, config.data.spatial_dims):
        model = model.to(memory_format=torch.channels_last)
    # Only now the folder: bad data or config leave none behind. The run lock keeps a second process
    # (another sweep, a finetune of the same config) from training the same run or resuming from our files.
    with folder_lock(directory, f"run {run_id}"):
        record = load_record(directory / RESULT_FILE, warn=False)
        if record is not None:  # finished by another process meanwhile
            shutil.rmtree(directory / CHECKPOINT_DIR, ignore_errors=True)
            return RunResult(run_id, directory, record)
        if (directory / RESULT_FILE).exists():  # damaged from outside: set aside, and the run is redone
            moved = set_aside(directory / RESULT_FILE)
            log.warning("run %s: %s is unreadable; set aside as %s, the run is redone", run_id, RESULT_FILE,
                        moved.name)
        remove_partial_files(directory, recursive=True)  # left by a killed attempt; no one else writes here
        checkpoints = directory / CHECKPOINT_DIR
        # last.ckpt (weights + optimizer state) is for resuming only; the weights that are evaluated are the
        # best by the validation headline Dice (val_dice), kept in memory by BestWeights (and inside last.ckpt).
        resume = resume_checkpoint(checkpoints, t.checkpoint_every_s)
        best = BestWeights("val_dice") if val_loader is not None else None
        curves = TrainingCurves("val_dice", t.plateau_steps if val_loader is not None else None, t.plateau_min_delta)
        callbacks = [resume, *([best] if best else []), curves, *(callbacks or [])]
        if not progress:  # no bar: plain lines, shown when the CLI's stdout is a file or a pipe
            callbacks.append(training_progress_callback(f"run {run_id}", total_steps))
        if val_loader is not None and t.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor="val_dice", mode="max", patience=t.early_stopping_patience))
        trainer = L.Trainer(
            default_root_dir=directory, max_epochs=t.max_epochs if t.max_steps <= 0 else -1,
            max_steps=t.max_steps, accelerator=accelerator, devices=1, precision=resolve_precision(t.precision),
            callbacks=callbacks, logger=False, enable_progress_bar=progress, enable_model_summary=False,
            log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0, deterministic=False,
            **({"check_val_every_n_epoch": None, "val_check_interval": t.val_every_n_steps}
               if t.val_every_n_steps else {}),
            plugins=[AtomicCheckpointIO()],
        )
        last = usable_resume_checkpoint(checkpoints / "last.ckpt")
        resumes = note_resume(checkpoints, last)
        train_started = time.perf_counter()
        try:
            fit(trainer, task, train_loader, val_loader, ckpt_path=None if last is None else str(last))
        except TrainingDiverged as exc:
            # A failed run, recorded as such; its resume state would only diverge again.
            shutil.rmtree(checkpoints, ignore_errors=True)
            write_error(directory, {"kind": "finetune", "status": "failed", "run_id": run_id,
                                    "config": config_to_dict(config), "error": f"run {run_id}: {exc}",
                                    "finished": datetime.now(timezone.utc).isoformat()})
            raise TrainingDiverged(f"run {run_id}: {exc}") from None
        train_s = time.perf_counter() - train_started
        if best is not None and best.best_state is not None:
            task.model.load_state_dict(best.best_state)
        model = task.model.cpu().eval()

        eval_started = time.perf_counter()
        metrics = {"target": _evaluate_on(model, config.data, config, in_channels, size_multiple,
                                          cases=data.test, n_classes=data.n_classes, class_names=data.class_names)}
        if config.evaluation.source_test is not None:
            metrics["source"] = _evaluate_on(model, config.evaluation.source_test, config, in_channels,
                                             size_multiple)
        if source_before is not None:
            metrics[SOURCE_BEFORE] = source_before
        eval_s = time.perf_counter() - eval_started

        learning = curves.record(f"{HEADLINES[config.evaluation.headline]} (validation)")
        record = {
            "kind": "finetune",
            "status": "done",
            "run_id": run_id,
            "config": config_to_dict(config),
            "model": config.model.preset,
            "dataset": data.name,  # named by medxfer.config.dataset_name (load_data)
            # what the dataset is (never its name alone): two datasets of one name are told apart by it
            "dataset_identity": {"fingerprint": content_fingerprint(data),
                                 "root": str(Path(config.data.root).resolve()) if config.data.root else None},
            "n_classes": data.n_classes,
            "class_names": list(data.class_names),
            "strategy": t.strategy,
            "freeze_encoder": t.strategy in ("frozen_encoder", "partial"),  # "gradual" ends unfrozen
            "seed": config.seed,
            "data_seed": config.subset_seed,  # chose train_case_ids (= seed unless data_seed was set)
            "n_train_images": len(train_cases),
            "train_case_ids": [c.case_id for c in train_cases],
            "train_spacing": spacing_summary(train_cases),  # mm per spatial axis; predict checks inputs against it
            **_slice_geometry(train_cases, data),  # train_shapes, slice_orientation: predict checks them too
            "preprocess_plan": data.meta.get("plan"),  # data.preprocess: predict resamples and normalises by it
            "pretraining": pretraining,
            "loss": loss_info,
            "forgetting_baseline": baseline_info,
            "epochs_trained": int(trainer.current_epoch),
            "best_val_dice": None if best is None else best.best_score,
            # the headline says whether the run converged (None: no validation curve to tell)
            "headline": {**metrics["target"]["headline"], "test_set": "target",
                         "converged": learning["convergence"]["converged"]},
            **learning,
            "steps_trained": int(trainer.global_step),
            # A resumed run continues with the uninterrupted run's batches and augmentation draws (the loader's
            # position is in last.ckpt): exact on the CPU, within GPU kernel noise on a GPU
            # (docs/troubleshooting.md); null = never interrupted.
            "resumed_at_step": resumes[0] if resumes else None,
            "resumed_at_steps": resumes,
            "metrics": metrics,
            "warnings": warnings,
            "timings": {"train_s": train_s, "eval_s": eval_s, "total_s": time.perf_counter() - started},
            "environment": environment_info(),
            # intra-op threads (part of the run id), where the count came from, OpenMP's wait policy
            "threads": threads_info,
            "finished": datetime.now(timezone.utc).isoformat(),
            **(extra_record or {}),
        }
        try:  # model.pt, model.json and the record are one set: a full disk leaves none of them
            save_model_weights(model, directory / "model.pt", manifest={
                "model": config_to_dict(config.model.model_copy(update={
                    "in_channels": in_channels, "n_classes": data.n_classes})),
                "run_id": run_id, "source": f"finetune:{data.name}", "length": pretraining["length"],
                "data": config_to_dict(config.data), "train_spacing": spacing_summary(train_cases),
                "preprocess_plan": data.meta.get("plan"),
                "class_names": list(data.class_names), **_slice_geometry(train_cases, data),
            })
            write_record(directory, record)
        except Exception:
            for name in ("model.pt", "model.json"):
                (directory / name).unlink(missing_ok=True)
            raise
        shutil.rmtree(checkpoints, ignore_errors=True)  # the record and model.pt are what a finished run keeps
        return RunResult(run_id, directory, record)


RESUMES_FILE = "resumes.json"  # beside last.ckpt: the optimizer steps at which the run was resumed


def note_resume(checkpoints: Path, last: Optional[Path]) -> list[int]:
    """The steps at which this run was resumed so far, this resume (from ``last``) included."""
    import json

    from medxfer.io import atomic_write_json

    path = checkpoints / RESUMES_FILE
    if last is None:  # a fresh start: resumes of an attempt whose checkpoint was set aside no longer apply
        path.unlink(missing_ok=True)
        return []
    try:
        history = [int(step) for step in json.loads(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):  # none yet (or damaged: the resumes before it are not known)
        history = []
    state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    history.append(int(state.get("global_step", 0)))
    del state
    atomic_write_json(path, history)
    return history


def split_warnings(data: SegmentationData, train_cases) -> list[str]:
    """What a run on ``data`` lacks (said before training, and kept in the record): without validation
    images the last weights are evaluated, without labelled test images there is no test metric."""
    found = []
    if not data.val:
        found.append(f"dataset {data.name}: no validation images ({len(train_cases)} training); the last "
                     "weights are evaluated, not the best by validation Dice")
    if not any(case.label is not None for case in data.test):
        found.append(f"dataset {data.name}: no labelled test images; the record will have no test metrics "
                     "(Dice n/a): add test images or more images for the split")
    return found


def _finished(run_id: str, directory: Path) -> RunResult:
    log.info("run %s already done; reusing its record", run_id)
    tidy_finished_run(directory)
    return RunResult(run_id, directory, read_record(directory / RESULT_FILE))


def tidy_finished_run(directory: Path) -> None:
    """Remove the resume checkpoint a finished run still has (the process was killed between writing the
    record and removing it); skipped while another process holds the run."""
    checkpoints = directory / CHECKPOINT_DIR
    if not checkpoints.exists():
        return
    try:
        with folder_lock(directory, "run"):
            shutil.rmtree(checkpoints, ignore_errors=True)
    except FolderInUse:
        pass


def summary_dice(record: dict[str, Any], test_set: str = "target") -> float:
    """The headline number of a test set (``metrics[test_set]["headline"]``, whose ``metric`` names it); records
    written before there was one: per-image mean Dice (binary) or mean Dice over classes (multi-class)."""
    result = record["metrics"][test_set]
    if isinstance(result.get("headline"), dict) and "value" in result["headline"]:
        return float(result["headline"]["value"])
    values = result["per_image_mean"]
    value = values.get("dice index")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        value = values.get("mean dice index")
    return float(value) if value is not None else float("nan")
