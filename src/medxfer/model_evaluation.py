"""``medxfer evaluate``: a trained model on one dataset split, without training -> the metrics record a
fine-tuning run writes.

What it is for: the numbers a transfer study compares fine-tuned runs against. The base model's own Dice on
its source test set is the forgetting baseline (a fine-tuned run's ``metrics.source`` is read against it), and
its Dice on a new domain before any fine-tuning is the zero-shot figure.

The model is a fine-tuning run (its folder or ``model.pt``), a whole-model file with its manifest (e.g.
``models/model_len0400.pt`` of a segmentation pretraining), or a segmentation pretraining folder with
``length``. The record lands in ``OUT/evaluations/<id>/result.json`` (``medxfer.records.iter_evaluations``):
``id`` = hash of the weights' SHA-256 and the resolved config, so the same evaluation is computed once.
The record's ``metrics`` has the layout of a fine-tuning record's (``{test_set: {per_image_mean, pooled,
nan_counts, n_images, annotation, provenance, per_image}}``); ``evaluated`` says which weights were scored
(``path``, ``sha256``, and from the manifest ``source``, ``run_id``, ``length``). A fine-tuning run that
started from those weights names the same file in ``pretraining.checkpoint``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from medxfer.config import EvaluateConfig, RunConfig, config_to_dict, parse_config, read_yaml, resolve_paths
from medxfer.data import load_data
from medxfer.data.base import check_case
from medxfer.errors import ConfigError, DataError
from medxfer.evaluation.evaluate import evaluate_test_set
from medxfer.evaluation.metrics import class_keys
from medxfer.inference import MODEL_FILE, load_trained_model
from medxfer.io import environment_info, file_sha256, folder_lock, stable_hash
from medxfer.pretraining.checkpoints import MODEL_DIR, resolve_model_checkpoint
from medxfer.records import RESULT_FILE, evaluation_dir, load_record, write_record

log = logging.getLogger(__name__)


def load_evaluate_config(path: str | Path, **overrides: Any) -> EvaluateConfig:
    """An evaluation config from YAML: an evaluate config (``data:`` + optional ``split``, ``test_set``,
    ``evaluation``), a fine-tuning run config (its ``data`` and ``evaluation`` sections are used), or a bare
    data section. ``overrides`` (None values skipped) replace top-level keys, e.g. ``split``."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a data section or a config with a data section")
    raw = resolve_paths(raw, path.parent.resolve())
    if "data" not in raw:
        raw = {"data": raw}
    elif set(raw) - set(EvaluateConfig.model_fields):  # a run config: keep what evaluation needs
        run = parse_config(raw, RunConfig, source=str(path))
        raw = {"name": run.name, "data": config_to_dict(run.data), "evaluation": config_to_dict(run.evaluation)}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(raw, EvaluateConfig, source=str(path))


def resolve_model_file(path: str | Path, length: Optional[int] = None) -> Path:
    """The whole-model file ``medxfer evaluate`` scores: ``path`` itself (a ``.pt``), a run folder's
    ``model.pt``, or (a pretraining folder, or ``length`` given) the whole-model checkpoint of ``length``."""
    path = Path(path)
    if length is not None or (path.is_dir() and not (path / MODEL_FILE).is_file() and (path / MODEL_DIR).is_dir()):
        return resolve_model_checkpoint(path, length)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise DataError(f"{path}: model file not found (give a run folder, its model.pt, a whole-model "
                        "checkpoint, or a segmentation pretraining folder with --length)")
    return path


def run_evaluation(model_path: str | Path, config: EvaluateConfig, out_dir: str | Path, *,
                   length: Optional[int] = None) -> dict[str, Any]:
    """Evaluate one trained model on ``config.data``'s ``config.split``; write and return the record
    (an existing record of the same weights and config is returned as is)."""
    started = time.perf_counter()
    model_file = resolve_model_file(model_path, length).resolve()
    digest = file_sha256(model_file)
    evaluation_id = stable_hash({"weights_sha256": digest, "config": config_to_dict(config)})
    directory = evaluation_dir(out_dir, evaluation_id)
    record = load_record(directory / RESULT_FILE, warn=False)
    if record is not None:
        log.info("evaluation %s already done; reusing its record", evaluation_id)
        return record

    model, info = load_trained_model(model_file)
    manifest = info["manifest"]
    data = load_data(config.data)
    class_keys(data.n_classes, data.class_names)
    if model.n_classes != data.n_classes:
        raise ConfigError(f"{model_file}: the model predicts {model.n_classes} classes but {data.name} has "
                          f"{data.n_classes}; evaluate on a dataset with the model's classes")
    if model.spatial_dims != data.spatial_dims:
        raise ConfigError(f"{model_file}: a {model.spatial_dims}D model cannot be evaluated on {data.name}, "
                          f"which is {data.spatial_dims}D (data.spatial_dims)")
    cases = getattr(data, config.split)
    if not cases:
        raise DataError(f"{data.name}: the {config.split} split is empty; nothing to evaluate")
    for case in cases:
        check_case(case, f"{data.name}:{case.case_id}", data.n_classes)
        if case.label is None:
            raise DataError(f"{data.name}:{case.case_id}: the {config.split} split has unlabelled cases")

    eval_started = time.perf_counter()
    metrics = {config.test_set: evaluate_test_set(model, cases, data.n_classes, data.class_names, config.data,
                                                  config.evaluation)}
    eval_s = time.perf_counter() - eval_started
    source_record = info.get("record") or {}
    record = {
        "kind": "evaluate",
        "status": "done",
        "evaluation_id": evaluation_id,
        "config": config_to_dict(config),
        "evaluated": {"path": str(model_file), "sha256": digest, "source": manifest.get("source"),
                      "run_id": manifest.get("run_id") or source_record.get("run_id"),
                      "length": manifest.get("length"), "model": manifest.get("model")},
        "model": (manifest.get("model") or {}).get("preset"),
        "dataset": data.name,
        "split": config.split,
        "n_classes": data.n_classes,
        "class_names": list(data.class_names),
        "pretraining": {"length": manifest.get("length"), "checkpoint": str(model_file), "scheme": None,
                        "accuracy": None},
        "metrics": metrics,
        "timings": {"eval_s": eval_s, "total_s": time.perf_counter() - started},
        "environment": environment_info(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    with folder_lock(directory, f"evaluation {evaluation_id}"):
        write_record(directory, record)
    return record
