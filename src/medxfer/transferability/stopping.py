"""When could pretraining have stopped? Checkpoint recommendation from transferability scores.

- Offline: :func:`recommend_checkpoint` on ``{pretraining length: score}``; :func:`recommend_from_table`
  on a ``robustness.csv``; :func:`recommend_for_folder` scores a checkpoint folder and recommends.
- Online: :class:`RobustnessEarlyStopping`, a Lightning callback for a pretraining run: it scores the
  encoder on the target images at every scheduled checkpoint, logs the score, and stops the run once
  the patience rule fires.

Rules (lower score = better unless ``higher_is_better``):

- ``argmin``: the length with the best score over all checkpoints;
- ``patience``: walking through the checkpoints by length, the best so far once the score has not
  improved (by more than ``min_delta``) for ``patience`` checkpoints in a row. If that never happens
  the run was not stopped and the best checkpoint overall is recommended (``fired=False``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import pandas as pd

from medxfer.config import ScoreConfig, StopConfig
from medxfer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

try:  # Lightning is a dependency, but the offline rules must not need it
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object  # type: ignore[assignment,misc]


@dataclass
class Recommendation:
    length: float  # the recommended pretraining length
    score: float
    rule: str
    patience: Optional[int]
    fired: bool  # patience: the rule stopped the walk before the last checkpoint (argmin: always True)
    stopped_at: float  # the last length examined (the one at which a run would have stopped)
    scores: dict[float, float] = field(default_factory=dict)
    variant: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores"] = {str(k): v for k, v in self.scores.items()}
        return out


ScoreInput = Union[Mapping[float, float], Iterable[tuple[float, float]]]


def _sorted_scores(scores_by_length: ScoreInput) -> list[tuple[float, float]]:
    items = scores_by_length.items() if isinstance(scores_by_length, Mapping) else scores_by_length
    pairs = sorted((float(length), float(score)) for length, score in items)
    lengths = [p[0] for p in pairs]
    if len(set(lengths)) != len(lengths):
        raise DataError(f"two scores for one pretraining length in {lengths}")
    if not any(math.isfinite(s) for _, s in pairs):
        raise DataError("no finite transferability score to recommend a checkpoint from")
    return pairs


def recommend_checkpoint(scores_by_length: ScoreInput, rule: str = "argmin", patience: int = 2, *,
                         min_delta: float = 0.0, higher_is_better: bool = False) -> Recommendation:
    """The recommended pretraining length (see the module docstring for the rules). NaN scores never count
    as an improvement; ties go to the shorter length."""
    pairs = _sorted_scores(scores_by_length)
    sign = -1.0 if higher_is_better else 1.0
    signed = [(length, sign * score if math.isfinite(score) else math.inf) for length, score in pairs]
    scores = dict(pairs)
    if rule == "argmin":
        length, value = min(signed, key=lambda p: p[1])  # min() keeps the first (shortest) on ties
        return Recommendation(length, scores[length], "argmin", None, True, pairs[-1][0], scores)
    if rule != "patience":
        raise ConfigError(f"unknown stop rule {rule!r}; use 'argmin' or 'patience'")
    if patience < 1:
        raise ConfigError(f"stop rule patience must be >= 1, got {patience}")
    best_length, best_value, waited = None, math.inf, 0
    for length, value in signed:
        if best_length is None or value < best_value - min_delta:
            best_length, best_value, waited = length, value, 0
        else:
            waited += 1
            if waited >= patience:
                return Recommendation(best_length, scores[best_length], "patience", patience, True, length, scores)
    assert best_length is not None
    return Recommendation(best_length, scores[best_length], "patience", patience, False, pairs[-1][0], scores)


def _resolve_level(table: pd.DataFrame, level: int) -> int:
    if level >= 0:
        return level
    n_levels = int(table["level"].max()) + 1
    return n_levels + level


def select_variant(table: pd.DataFrame, stop: StopConfig) -> pd.DataFrame:
    """The rows of a robustness table that belong to the variant ``stop`` names."""
    level = _resolve_level(table, stop.level)
    rows = table[(table["metric"] == stop.metric) & np.isclose(table["margin"].astype(float), stop.margin)
                 & (table["level"].astype(int) == level) & (table["pooled"].astype(bool) == stop.pooled)]
    if rows.empty:
        raise ConfigError(f"stop: the variant metric={stop.metric} margin={stop.margin:g} level={level} "
                          f"pooled={stop.pooled} is not among the scored variants")
    return rows


def recommend_from_table(table: pd.DataFrame, stop: StopConfig) -> Recommendation:
    """Apply ``stop`` to the variant it names in a robustness table of ONE pretraining run."""
    rows = select_variant(table, stop)
    group_columns = [c for c in ("dataset", "encoder", "pretraining_scheme") if c in rows.columns]
    groups = rows.groupby(group_columns, dropna=False).ngroups if group_columns else 1
    if groups > 1:
        raise ConfigError("stop: the robustness table holds several runs (dataset/encoder/scheme); "
                          "recommend per run (filter the table first)")
    recommendation = recommend_checkpoint(zip(rows["pretraining_length"], rows["robustness"]), stop.rule,
                                          stop.patience, min_delta=stop.min_delta)
    recommendation.variant = {"metric": stop.metric, "margin": stop.margin,
                              "level": _resolve_level(table, stop.level), "pooled": stop.pooled}
    return recommendation


def recommend_for_folder(config: ScoreConfig, folder: str | Path | None = None,
                         out_dir: str | Path | None = None) -> Recommendation:
    """Score every checkpoint of ``folder`` (default ``config.checkpoints``) and recommend one by
    ``config.stop``; writes robustness.csv and recommendation.json into ``out_dir`` (default ``config.out``)."""
    from medxfer.transferability.robustness import run_score

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

    It follows :mod:`medxfer.pretrain`'s checkpoint-hook protocol: pass it in ``callbacks=`` of
    :func:`medxfer.pretrain.run_pretraining`, which calls :meth:`on_checkpoint` (length, encoder,
    manifest) at every scheduled length with the encoder in eval mode. Every variant of ``score_config``
    comes from the same two encoder passes and is kept in :attr:`table` (robustness.csv columns; rewritten
    atomically to ``csv_path`` after every checkpoint when given); the variant of ``score_config.stop``
    goes into the checkpoint manifest (``robustness``), the Lightning logger (when the trainer has one)
    and the log, and drives the stop: once the patience rule fires, the hook returns ``"stop": True``
    and pretraining ends after this checkpoint. (``argmin`` needs the whole run, so the online stop
    always uses the patience rule; :attr:`recommendation` applies ``stop.rule`` to the scores so far.)
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
        self.tables: list[pd.DataFrame] = []
        self.stopped_at: Optional[float] = None
        self._trainer = None

    @classmethod
    def from_config(cls, score_config: ScoreConfig, **kwargs: Any) -> "RobustnessEarlyStopping":
        """Target images from ``score_config.data`` (training split, normalised as for fine-tuning)."""
        from medxfer.transferability.robustness import target_images

        images, dataset = target_images(score_config)
        kwargs.setdefault("dataset", dataset)
        return cls(images, score_config, **kwargs)

    # -- results -------------------------------------------------------------------------------------
    @property
    def table(self) -> pd.DataFrame:
        from medxfer.transferability.robustness import order_columns

        if not self.tables:
            return order_columns(pd.DataFrame())
        return order_columns(pd.concat(self.tables, ignore_index=True))

    @property
    def recommendation(self) -> Optional[Recommendation]:
        if not self.history:
            return None
        stop = self.config.stop
        return recommend_checkpoint(self.history, stop.rule, stop.patience, min_delta=stop.min_delta)

    @property
    def should_stop(self) -> bool:
        """True once the patience rule fires on the scores so far."""
        if len(self.history) <= self.config.stop.patience:
            return False
        return recommend_checkpoint(self.history, "patience", self.config.stop.patience,
                                    min_delta=self.config.stop.min_delta).fired

    # -- scoring -------------------------------------------------------------------------------------
    def score_encoder(self, encoder, length: float, manifest: Optional[dict] = None) -> float:
        """Score ``encoder`` as the checkpoint of ``length``; record and return the stop variant's score."""
        from medxfer.transferability.robustness import augmentation_id, score_checkpoint

        manifest = manifest or {}
        table = score_checkpoint(encoder, self.images, self.config)
        table = table.assign(
            dataset=self.dataset, encoder=self.encoder_name or getattr(encoder, "name", "encoder"),
            pretraining_scheme=self.pretraining_scheme or manifest.get("scheme") or "", pretraining_length=length,
            checkpoint="", seed=self.config.seed, augmentation=augmentation_id(self.config.augment))
        self.tables = [t for t in self.tables if float(t["pretraining_length"].iloc[0]) != float(length)] + [table]
        value = float(select_variant(table, self.config.stop)["robustness"].iloc[0])
        self.history[float(length)] = value
        if self.csv_path is not None:
            from medxfer.io import atomic_write_text

            atomic_write_text(self.csv_path, self.table.to_csv(index=False))
        log.info("robustness at pretraining length %s: %.4f", length, value)
        return value

    def on_checkpoint(self, length: int, encoder, manifest: dict) -> dict[str, Any]:
        """The pretraining loop's checkpoint hook (see :mod:`medxfer.pretrain`)."""
        value = self.score_encoder(encoder, length, manifest)
        self._log(value, length)
        stop = self.config.stop
        returned: dict[str, Any] = {
            "robustness": value,
            "robustness_variant": {"metric": stop.metric, "margin": stop.margin, "level": stop.level,
                                   "pooled": stop.pooled},
        }
        if self.should_stop:
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
        return {"history": {str(k): v for k, v in self.history.items()}, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed pretraining run keeps the scores of the checkpoints scored before the interruption.
        self.history = {float(k): float(v) for k, v in state_dict.get("history", {}).items()}
        self.stopped_at = state_dict.get("stopped_at")
