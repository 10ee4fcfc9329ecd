"""The ``medxfer score`` pipeline and the online score of a pretraining run: what connects the score
maths (:mod:`.robustness`) to data, checkpoints and the stop rules (:mod:`.stopping`).

- :func:`run_score` (``medxfer score``): every variant for every checkpoint of a folder -> ``robustness.csv``
  (+ ``baselines.csv``, ``recommendation.json``); :func:`recommend_for_folder` scores and recommends;
- :class:`RobustnessEarlyStopping`: the Lightning callback / checkpoint hook that scores the pretraining
  encoder at each scheduled checkpoint and stops the run when the stop rule fires.

Dependencies run one way: ``stopping`` (pure numpy/pandas) <- ``robustness`` (torch) <- ``scoring``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from medxfer.config import ModelConfig, ScoreConfig, config_to_dict
from medxfer.errors import CheckpointError, ConfigError, DataError
from medxfer.threads import inherited_threads_record
from medxfer.transferability.robustness import (
    _device,
    augmentation_id,
    order_columns,
    score_checkpoint,
)
from medxfer.transferability.stopping import (
    Recommendation,
    curve_from_table,
    load_stop_rule,
    recommend_checkpoint,
    recommend_from_table,
    select_variant,
)

log = logging.getLogger(__name__)

try:  # Lightning is a dependency; the callback also works as a plain checkpoint hook without it
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object  # type: ignore[assignment,misc]


# --------------------------------------------------------------------------------------------------
# Target images


def centre_crop_or_pad(image: np.ndarray, size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """Centre-crop a ``(C, *S)`` array to ``size``, padding with ``fill`` where it is smaller
    (0 is the mean of a z-scored image; label maps are padded with ``IGNORE_INDEX``)."""
    spatial = image.shape[1:]
    if len(size) != len(spatial):
        raise ConfigError(f"crop_size: expected {len(spatial)} sizes for {len(spatial)}D images, got {list(size)}")
    out = np.full((image.shape[0], *size), fill, dtype=image.dtype)
    src, dst = [slice(None)], [slice(None)]
    for have, want in zip(spatial, size):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(None))
        else:
            start = (want - have) // 2
            src.append(slice(None))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = image[tuple(src)]
    return out


def target_images(config: ScoreConfig, with_labels: bool = False):
    """The normalised training images (and label maps) of the score: ``(N, C, *S)`` float32 [, ``(N, *S)``].

    Training split only; ``n_images`` of them chosen by ``seed`` (all when None); normalised per image
    as fine-tuning does (``data.normalization``); centre-cropped/padded to ``crop_size`` when given.
    """
    from medxfer.data import load_data, select_subset
    from medxfer.data.base import IGNORE_INDEX
    from medxfer.data.preprocess import image_normalization
    from medxfer.data.transforms import normalize_image

    data = load_data(config.data)
    cases = select_subset(data.train, config.n_images, config.seed, config.data.subset)
    if len(cases) < 2:
        raise DataError(f"{data.name}: the robustness score needs at least 2 training images, found {len(cases)}")
    images, labels = [], []
    for case in cases:
        image = normalize_image(case.image, image_normalization(config.data), config.data.percentile_clip)
        label = case.label if case.label is not None else np.full(case.spatial_shape, IGNORE_INDEX, np.int64)
        if config.crop_size is not None:
            image = centre_crop_or_pad(image, config.crop_size)
            label = centre_crop_or_pad(label[None], config.crop_size, fill=IGNORE_INDEX)[0]
        images.append(image)
        labels.append(label)
    shapes = sorted({tuple(im.shape) for im in images})
    if len(shapes) > 1:
        raise DataError(f"{data.name}: training images differ in size ({shapes[0]} vs {shapes[-1]}); "
                        "set crop_size (or data.resize) in the score config")
    out = (np.stack(images).astype(np.float32), data.name)
    if with_labels:
        return out + (np.stack(labels).astype(np.int64), data.n_classes)
    return out


# --------------------------------------------------------------------------------------------------
# `medxfer score`


@dataclass
class ScoreResult:
    table: pd.DataFrame  # robustness.csv
    csv_path: Optional[Path]
    baselines: Optional[pd.DataFrame] = None  # baselines.csv
    recommendation: Optional[Recommendation] = None  # None with one checkpoint: nothing to choose
    paths: dict[str, Path] = field(default_factory=dict)
    n_checkpoints: int = 0

    def summary(self, stop=None) -> pd.DataFrame:
        """Per checkpoint: the stop variant's score and interval (what the CLI prints)."""
        rows = select_variant(self.table, stop) if stop is not None else self.table
        columns = ["pretraining_length", "metric", "margin", "level", "pooled", "robustness", "ci_low", "ci_high"]
        return rows[columns].sort_values("pretraining_length").reset_index(drop=True)


def load_score_config(path: str | Path) -> ScoreConfig:
    """Read a score YAML; ``checkpoints`` and ``data.root`` are relative to the config file's folder."""
    from medxfer.config import parse_config, read_yaml, resolve_paths

    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw, dict):
        raw = resolve_paths(raw, path.parent.resolve(), keys=("root", "checkpoint", "checkpoints", "rule_file"))
    return parse_config(raw, ScoreConfig, source=str(path))


def checkpoint_list(location: str | Path) -> list[tuple[float, Path, dict]]:
    """``[(pretraining length, path, manifest)]`` of a checkpoint folder (sorted) or of one file."""
    from medxfer.models import weights

    location = Path(location)
    if location.is_dir():
        found = list(weights.list_checkpoints(location))
        if not found:
            raise ConfigError(f"checkpoints: no encoder checkpoints in {location}")
        return [(math.nan if length is None else length, path, manifest) for length, path, manifest in found]
    if location.is_file():
        # A raw state dict (no manifest) is scored with the config's model preset; see _load_encoder.
        manifest = weights.read_manifest(location) if weights.manifest_path(location).is_file() else {}
        length = manifest.get("length")
        return [(math.nan if length is None else length, location, manifest)]
    raise ConfigError(f"checkpoints: {location} does not exist")


def _load_encoder(path: Path, manifest: dict, model: Optional[ModelConfig], image_channels: int) -> torch.nn.Module:
    """The checkpoint's encoder: rebuilt from its manifest, or, for a raw state dict, the config's preset
    with the weights loaded under the same checks as fine-tuning's (unmatched keys: CheckpointError)."""
    from medxfer.models import build_encoder, weights

    if manifest:
        return weights.encoder_from_checkpoint(path)
    if model is None:
        raise CheckpointError(f"{path}: has no manifest beside it; set model.preset in the score config (the "
                              "architecture of these weights) or import it: medxfer weights import "
                              f"{path} --preset NAME --out DIR")
    encoder = build_encoder(model.model_copy(update={"in_channels": model.in_channels or image_channels}))
    weights.load_encoder_weights(encoder, path)
    return encoder


SCORE_CONFIG_FILE = "score_config.json"  # which config the outputs of a score folder belong to
SCORE_OUTPUTS = ("robustness.csv", "baselines.csv", "recommendation.json")
_PARTIAL_PREFIX = ".score-partial-"  # per-checkpoint tables of an unfinished score, by config identity


def run_score(config: ScoreConfig, out_dir: str | Path | None = None, *, progress: bool = False) -> ScoreResult:
    """``medxfer score``: every variant for every checkpoint -> ``robustness.csv`` (+ baselines, stop rule).

    Writes to ``out_dir`` (default ``config.out``): ``robustness.csv``, ``baselines.csv`` when
    ``config.baselines`` asks for any, and ``recommendation.json`` (the stop rule of ``config.stop``), as
    one set with ``score_config.json`` naming their config: outputs of an earlier score of the same config
    that this one does not write are removed, and a folder holding another config's scores is refused.
    The folder is locked meanwhile; each scored checkpoint is kept, so an interrupted score resumes.
    """
    from medxfer.io import folder_lock

    out = Path(out_dir if out_dir is not None else config.out)
    identity = score_identity(config)
    with folder_lock(out, "score folder"):
        _guard_score_folder(out, identity)
        return _run_score(config, out, identity, progress)


def score_identity(config: ScoreConfig) -> str:
    """The hash of the resolved score config without its output folder."""
    from medxfer.io import stable_hash

    return stable_hash({k: v for k, v in config_to_dict(config).items() if k != "out"})


def _guard_score_folder(out: Path, identity: str) -> None:
    import shutil

    marker = out / SCORE_CONFIG_FILE
    saved = None
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))["identity"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{marker}: unreadable ({type(exc).__name__}); remove it or use another output "
                              "folder") from None
    elif any((out / name).exists() for name in SCORE_OUTPUTS):  # written before folders named their config
        log.warning("%s: score outputs of an unnamed config; this score replaces them as a whole", out)
    if saved is not None and saved != identity:
        raise ConfigError(f"{out}: holds the scores of another score config (see {marker}); use another "
                          "output folder, or delete this one to score here")
    for partial in out.glob(f"{_PARTIAL_PREFIX}*"):  # an interrupted score of another config: nothing finished
        if partial.name != _PARTIAL_PREFIX + identity:
            shutil.rmtree(partial, ignore_errors=True)


def _checkpoint_key(length: float, path: Path) -> str:
    from medxfer.io import stable_hash

    stat = Path(path).stat()
    return stable_hash([str(Path(path).resolve()), float(length), stat.st_size, stat.st_mtime_ns])


def _run_score(config: ScoreConfig, out: Path, identity: str, progress: bool) -> ScoreResult:
    import shutil

    from medxfer.io import atomic_write_json, atomic_write_text, seed_everything

    seed_everything(config.seed)
    threads = inherited_threads_record()  # as scoring starts: the count every checkpoint is scored with
    checkpoints = checkpoint_list(config.checkpoints)
    if config.baselines:
        images, dataset, labels, n_classes = target_images(config, with_labels=True)
    else:
        (images, dataset), labels, n_classes = target_images(config), None, None
    log.info("scoring %d checkpoint(s) on %d %s training images", len(checkpoints), len(images), dataset)
    partial = out / (_PARTIAL_PREFIX + identity)
    tables, baseline_tables = [], []
    accuracy = {float(length): (manifest or {}).get("val_accuracy") for length, _, manifest in checkpoints}
    for length, path, manifest in checkpoints:
        key = _checkpoint_key(length, path)
        done_table, done_baselines = partial / f"{key}.robustness.csv", partial / f"{key}.baselines.csv"
        if done_table.is_file() and (not config.baselines or done_baselines.is_file()):
            log.info("%s (length %s): scored before this interruption; reused", Path(path).name, length)
            tables.append(pd.read_csv(done_table))
            if config.baselines:
                baseline_tables.append(pd.read_csv(done_baselines))
            continue
        encoder = _load_encoder(path, manifest, config.model, int(images.shape[1])).to(_device(config.device))
        meta = {"dataset": dataset, "encoder": config.encoder_name or _encoder_name(encoder, manifest),
                "pretraining_scheme": config.pretraining_scheme or (manifest or {}).get("scheme") or "",
                "pretraining_length": length, "checkpoint": str(path), "seed": config.seed}
        table = score_checkpoint(encoder, images, config, progress=progress)
        table = table.assign(**meta, augmentation=augmentation_id(config.augment))
        if not tables and config.stop.rule != "recommended":
            select_variant(table, config.stop)  # argmin/patience need their variant: fail now, writing nothing
        tables.append(table)
        log.info("%s (length %s): %d variants in %.1f s", Path(path).name, length, len(table), table["time_s"].iloc[0])
        if config.baselines:
            from medxfer.transferability.baselines import baseline_scores

            rows = baseline_scores(encoder, images, labels, n_classes, methods=config.baselines,
                                   levels=None if config.levels is None else
                                   [config.encoder_level(lv) for lv in config.levels],
                                   max_pixels=config.baseline_pixels, probe_steps=config.probe_steps,
                                   probe_level=config.encoder_level(config.probe_level),
                                   knn_k=config.knn_k, seed=config.seed, batch_size=config.batch_size,
                                   device=config.device)
            rows = pd.DataFrame(rows)
            rows["level"] = rows["level"] + config.level_offset  # published numbering under protocol reference
            baseline_tables.append(rows.assign(**meta))
            atomic_write_text(done_baselines, baseline_tables[-1].to_csv(index=False))
        atomic_write_text(done_table, table.to_csv(index=False))  # last: the checkpoint is done when it exists
    result_table = order_columns(pd.concat(tables, ignore_index=True))
    result_table = result_table.sort_values(["metric", "margin", "level", "pooled", "pretraining_length"],
                                            kind="stable").reset_index(drop=True)
    csv_path = out / "robustness.csv"
    result = ScoreResult(result_table, csv_path, paths={"robustness": csv_path})
    result.n_checkpoints = len(checkpoints)
    if baseline_tables:
        from medxfer.transferability.baselines import BASELINE_COLUMNS

        baselines = pd.concat(baseline_tables, ignore_index=True)
        baselines = baselines[BASELINE_COLUMNS + [c for c in baselines.columns if c not in BASELINE_COLUMNS]]
        result.baselines = baselines
        result.paths["baselines"] = out / "baselines.csv"
    if len(checkpoints) == 1:  # nothing to choose: no recommendation (its length would be NaN, not JSON)
        log.info("one checkpoint: nothing to choose; no recommendation written")
    elif len(checkpoints) > 1:
        try:
            result.recommendation = recommend_from_table(result_table, config.stop, accuracy)
        except ConfigError as exc:  # e.g. a table that holds several runs
            log.warning("no checkpoint recommendation: %s", exc)
        else:
            result.paths["recommendation"] = out / "recommendation.json"
    # One set: the marker says "being written" first, so a kill in between leaves a folder of this config
    # that the next score of it rewrites; outputs this score does not produce are removed, never left stale.
    marker = out / SCORE_CONFIG_FILE
    metadata = {"identity": identity, "config": config_to_dict(config), "threads": threads}
    atomic_write_json(marker, {**metadata, "complete": False})
    for name in SCORE_OUTPUTS:
        if not any(path.name == name for path in result.paths.values()):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(csv_path, result_table.to_csv(index=False))
    if result.baselines is not None:
        atomic_write_text(result.paths["baselines"], result.baselines.to_csv(index=False))
    if result.recommendation is not None:
        atomic_write_json(result.paths["recommendation"], result.recommendation.as_dict())
    atomic_write_json(marker, {**metadata, "complete": True})
    shutil.rmtree(partial, ignore_errors=True)
    return result


def _encoder_name(encoder: torch.nn.Module, manifest: Optional[dict]) -> str:
    name = getattr(encoder, "name", None)
    if name:
        return str(name)
    arch = (manifest or {}).get("arch") or {}
    return str(arch.get("model_name") or arch.get("name") or type(encoder).__name__)


def recommend_for_folder(config: ScoreConfig, folder: str | Path | None = None,
                         out_dir: str | Path | None = None) -> Recommendation:
    """Score every checkpoint of ``folder`` (default ``config.checkpoints``) and recommend one by
    ``config.stop``; writes robustness.csv and recommendation.json into ``out_dir`` (default ``config.out``)."""
    if folder is not None:
        config = config.model_copy(update={"checkpoints": Path(folder)})
    result = run_score(config, out_dir)
    if result.recommendation is None:
        raise ConfigError(f"stop: cannot recommend a checkpoint of {config.checkpoints} (see the log)")
    return result.recommendation


# --------------------------------------------------------------------------------------------------
# Online: a Lightning callback for the pretraining run


class RobustnessEarlyStopping(_Callback):
    """Score the pretraining encoder on target images at each scheduled checkpoint; stop when the rule fires.

    It follows :mod:`medxfer.pretraining`'s checkpoint-hook protocol: pass it in ``callbacks=`` of
    :func:`medxfer.pretraining.run_pretraining`, which calls :meth:`on_checkpoint` (length, encoder,
    manifest) at every scheduled length with the encoder in eval mode. Every variant of ``score_config``
    comes from the same two encoder passes and is kept in :attr:`table` (robustness.csv columns; rewritten
    atomically to ``csv_path`` after every checkpoint when given); the variant of ``score_config.stop``
    goes into the checkpoint manifest (``robustness``), the Lightning logger (when the trainer has one)
    and the log. With ``stop.rule == "recommended"`` (the default) the online rule of
    :func:`medxfer.transferability.stopping.load_stop_rule` decides on every variant so far and the
    ImageNet validation accuracy of the manifests (``val_accuracy``), exactly as ``medxfer analyze``
    evaluated it; with ``patience`` the patience rule on the stop variant does (``argmin`` needs the whole
    run, so online it stops by patience). When the rule fires, the hook returns ``"stop": True`` and
    pretraining ends after this checkpoint; :attr:`recommendation` applies ``stop.rule`` to the run so far.
    """

    def __init__(self, images: np.ndarray, score_config: ScoreConfig, *, dataset: str = "target",
                 encoder_name: Optional[str] = None, pretraining_scheme: Optional[str] = None,
                 csv_path: str | Path | None = None):
        super().__init__()
        if len(images) < 2:
            raise DataError(f"online robustness score: needs at least 2 target images, got {len(images)}")
        self.images = images
        self.config = score_config
        self.dataset = dataset
        self.encoder_name = encoder_name
        self.pretraining_scheme = pretraining_scheme
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.history: dict[float, float] = {}
        self.accuracy: dict[float, Optional[float]] = {}  # ImageNet validation accuracy per length (manifests)
        self.tables: list[pd.DataFrame] = []
        self.stop_rule = load_stop_rule(score_config.stop) if score_config.stop.rule == "recommended" else None
        self.stopped_at: Optional[float] = None
        self._trainer = None

    @classmethod
    def from_config(cls, score_config: ScoreConfig, **kwargs: Any) -> "RobustnessEarlyStopping":
        """Target images from ``score_config.data`` (training split, normalised as for fine-tuning)."""
        images, dataset = target_images(score_config)
        kwargs.setdefault("dataset", dataset)
        return cls(images, score_config, **kwargs)

    # -- results -------------------------------------------------------------------------------------
    @property
    def table(self) -> pd.DataFrame:
        if not self.tables:
            return order_columns(pd.DataFrame())
        return order_columns(pd.concat(self.tables, ignore_index=True))

    @property
    def recommendation(self) -> Optional[Recommendation]:
        if not self.history:
            return None
        stop = self.config.stop
        if self.stop_rule is not None:
            return recommend_from_table(self.table, stop, self.accuracy)
        return recommend_checkpoint(self.history, stop.rule, stop.patience, min_delta=stop.min_delta)

    @property
    def should_stop(self) -> bool:
        """True once the rule fires on the checkpoints so far."""
        if self.stop_rule is not None:
            return bool(self.tables) and self.stop_rule.stop_now(curve_from_table(self.table, self.accuracy))
        if len(self.history) <= self.config.stop.patience:
            return False
        return recommend_checkpoint(self.history, "patience", self.config.stop.patience,
                                    min_delta=self.config.stop.min_delta).fired

    # -- scoring -------------------------------------------------------------------------------------
    def score_encoder(self, encoder, length: float, manifest: Optional[dict] = None) -> float:
        """Score ``encoder`` as the checkpoint of ``length``; record and return the stop variant's score."""
        manifest = manifest or {}
        table = score_checkpoint(encoder, self.images, self.config)
        table = table.assign(
            dataset=self.dataset, encoder=self.encoder_name or getattr(encoder, "name", "encoder"),
            pretraining_scheme=self.pretraining_scheme or manifest.get("scheme") or "", pretraining_length=length,
            checkpoint="", seed=self.config.seed, augmentation=augmentation_id(self.config.augment))
        self.tables = [t for t in self.tables if float(t["pretraining_length"].iloc[0]) != float(length)] + [table]
        value = float(select_variant(table, self.config.stop)["robustness"].iloc[0])
        self.history[float(length)] = value
        self.accuracy[float(length)] = manifest.get("val_accuracy")
        if self.csv_path is not None:
            from medxfer.io import atomic_write_text

            atomic_write_text(self.csv_path, self.table.to_csv(index=False))
        log.info("robustness at pretraining length %s: %.4f", length, value)
        return value

    def on_checkpoint(self, length: int, encoder, manifest: dict) -> dict[str, Any]:
        """The pretraining loop's checkpoint hook (see :mod:`medxfer.pretraining`)."""
        value = self.score_encoder(encoder, length, manifest)
        self._log(value, length)
        stop = self.config.stop
        returned: dict[str, Any] = {
            "robustness": value,
            "robustness_variant": {"metric": stop.metric, "margin": stop.margin, "level": stop.level,
                                   "pooled": stop.pooled},
        }
        if self.should_stop and self.stop_rule is not None:
            self.stopped_at = float(length)
            log.info("stop rule %s fired: stopping pretraining at length %s", self.stop_rule.name, length)
            returned.update({"stop": True, "robustness_best_length": float(length),
                             "stop_rule": self.stop_rule.as_dict()})
        elif self.should_stop:
            self.stopped_at = float(length)
            best = recommend_checkpoint(self.history, "patience", stop.patience, min_delta=stop.min_delta)
            log.info("robustness has not improved for %d checkpoints: stopping pretraining at length %s "
                     "(best: length %s)", stop.patience, length, best.length)
            returned["stop"] = True
            returned["robustness_best_length"] = best.length
        return returned

    def _log(self, value: float, length: float) -> None:
        logger = getattr(self._trainer, "logger", None)
        if logger is not None:
            try:
                logger.log_metrics({"robustness": value, "robustness_length": float(length)},
                                   step=int(getattr(self._trainer, "global_step", 0)))
            except Exception as exc:  # a logger failing must not end the pretraining
                log.warning("could not log the robustness score: %s", exc)

    # -- Lightning -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"history": {str(k): v for k, v in self.history.items()}, "stopped_at": self.stopped_at,
                "accuracy": {str(k): v for k, v in self.accuracy.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed pretraining run keeps the scores of the checkpoints scored before the interruption.
        self.history = {float(k): float(v) for k, v in state_dict.get("history", {}).items()}
        self.stopped_at = state_dict.get("stopped_at")
        self.accuracy = {float(k): v for k, v in state_dict.get("accuracy", {}).items()}
        # Every variant of those checkpoints (the online rule decides on all of them) from csv_path.
        if self.csv_path is not None and self.csv_path.is_file() and self.history:
            saved = pd.read_csv(self.csv_path)
            saved = saved[saved["pretraining_length"].astype(float).isin(self.history)]
            self.tables = [rows for _, rows in saved.groupby("pretraining_length", sort=True)]
