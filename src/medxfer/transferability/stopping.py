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
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

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

    Two ways to drive it:

    - the pretraining loop calls :meth:`on_encoder_checkpoint` (trainer, module, length, path) right after
      it saves the checkpoint of ``length``: the score is that checkpoint's;
    - or, with ``schedule`` (lengths in epochs), the callback scores by itself at the end of every epoch
      whose count is in the schedule (and before training when 0 is in it).

    Every variant of ``score_config`` is computed from the same two passes and kept in :attr:`table`
    (robustness.csv columns); the variant of ``score_config.stop`` is logged (``robustness`` metric) and
    drives the stop. The online stop uses the patience rule (argmin needs the whole run); the final
    recommendation (:attr:`recommendation`) uses ``stop.rule``. ``csv_path`` (optional) is rewritten
    atomically after every checkpoint.
    """

    def __init__(self, images: np.ndarray, score_config: ScoreConfig, *, dataset: str = "target",
                 encoder_name: Optional[str] = None, pretraining_scheme: Optional[str] = None,
                 schedule: Optional[Sequence[int]] = None, csv_path: str | Path | None = None):
        super().__init__()
        if len(images) < 2:
            raise DataError(f"online robustness score: needs at least 2 target images, got {len(images)}")
        self.images = images
        self.config = score_config
        self.dataset = dataset
        self.encoder_name = encoder_name
        self.pretraining_scheme = pretraining_scheme
        self.schedule = None if schedule is None else sorted({int(s) for s in schedule})
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.history: dict[float, float] = {}
        self.tables: list[pd.DataFrame] = []
        self.stopped_at: Optional[float] = None

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
        rec = recommend_checkpoint(self.history, "patience", self.config.stop.patience,
                                   min_delta=self.config.stop.min_delta)
        return rec.fired

    # -- scoring -------------------------------------------------------------------------------------
    def score_encoder(self, encoder, length: float, checkpoint: str | Path | None = None) -> float:
        """Score ``encoder`` as the checkpoint of ``length``; record and return the stop variant's score."""
        from medxfer.transferability.robustness import augmentation_id, score_checkpoint

        table = score_checkpoint(encoder, self.images, self.config)
        table = table.assign(dataset=self.dataset, encoder=self.encoder_name or getattr(encoder, "name", "encoder"),
                             pretraining_scheme=self.pretraining_scheme or "", pretraining_length=length,
                             checkpoint=str(checkpoint) if checkpoint is not None else "", seed=self.config.seed,
                             augmentation=augmentation_id(self.config.augment))
        self.tables = [t for t in self.tables if float(t["pretraining_length"].iloc[0]) != float(length)] + [table]
        value = float(select_variant(table, self.config.stop)["robustness"].iloc[0])
        self.history[float(length)] = value
        if self.csv_path is not None:
            from medxfer.io import atomic_write_text

            atomic_write_text(self.csv_path, self.table.to_csv(index=False))
        log.info("robustness at pretraining length %s: %.4f", length, value)
        return value

    def on_encoder_checkpoint(self, trainer, pl_module, length: float, path: str | Path | None = None) -> bool:
        """The pretraining loop's hook: score the module's encoder, log, and stop when the rule fires.
        Returns True when it asked the trainer to stop."""
        from medxfer.models.weights import get_encoder

        value = self.score_encoder(get_encoder(pl_module), length, path)
        self._log(trainer, value, length)
        if self.should_stop:
            self.stopped_at = float(length)
            rec = recommend_checkpoint(self.history, "patience", self.config.stop.patience,
                                       min_delta=self.config.stop.min_delta)
            log.info("robustness has not improved for %d checkpoints: stopping pretraining at length %s "
                     "(best: length %s)", self.config.stop.patience, length, rec.length)
            if trainer is not None:
                trainer.should_stop = True
            return True
        return False

    def _log(self, trainer, value: float, length: float) -> None:
        logger = getattr(trainer, "logger", None) if trainer is not None else None
        if logger is not None:
            try:
                logger.log_metrics({"robustness": value, "robustness_length": float(length)},
                                   step=int(getattr(trainer, "global_step", 0)))
            except Exception as exc:  # a logger failing must not end the pretraining
                log.warning("could not log the robustness score: %s", exc)

    # -- Lightning hooks (only with ``schedule``) ------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.schedule and 0 in self.schedule and 0.0 not in self.history:
            self.on_encoder_checkpoint(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.schedule is None:
            return
        epochs = int(trainer.current_epoch) + 1
        if epochs in self.schedule:
            self.on_encoder_checkpoint(trainer, pl_module, epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {str(k): v for k, v in self.history.items()}, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {float(k): float(v) for k, v in state_dict.get("history", {}).items()}
        self.stopped_at = state_dict.get("stopped_at")
