"""When could pretraining have stopped? Checkpoint recommendation from transferability scores.

Pure numpy/pandas (no torch): the rules here are what ``medxfer analyze`` evaluates on tables and what
:mod:`.scoring` applies to a checkpoint folder (``medxfer score``) and online during pretraining
(:class:`medxfer.transferability.scoring.RobustnessEarlyStopping`).

- :func:`recommend_checkpoint` on ``{pretraining length: score}``; :func:`recommend_from_table` on a
  ``robustness.csv`` of one pretraining run.

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
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import pandas as pd

from medxfer.config import StopConfig
from medxfer.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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
