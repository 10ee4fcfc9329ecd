"""When could pretraining have stopped? Checkpoint recommendation from transferability scores.

Pure numpy/pandas (no torch): the rules here are what ``medxfer analyze`` evaluates on tables and what
:mod:`.scoring` applies to a checkpoint folder (``medxfer score``) and online during pretraining
(:class:`medxfer.transferability.scoring.RobustnessEarlyStopping`).

- :func:`recommend_checkpoint` on ``{pretraining length: score}``; :func:`recommend_from_table` on a
  ``robustness.csv`` of one pretraining run.
- Online stop rules (:class:`StopRule` and its families, below): what ``medxfer analyze`` evaluates and
  recommends, and what ``stop: {rule: recommended}`` (the default) applies.

Rules (lower score = better unless ``higher_is_better``):

- ``argmin``: the length with the best score over all checkpoints;
- ``patience``: walking through the checkpoints by length, the best so far once the score has not
  improved (by more than ``min_delta``) for ``patience`` checkpoints in a row. If that never happens
  the run was not stopped and the best checkpoint overall is recommended (``fired=False``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

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
    stop_rule: dict[str, Any] = field(default_factory=dict)  # "recommended": the online rule's parameters

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


def recommend_from_table(table: pd.DataFrame, stop: StopConfig,
                         accuracy: Optional[Mapping[float, Optional[float]]] = None) -> Recommendation:
    """Apply ``stop`` to a robustness table of ONE pretraining run: the online rule (``recommended``, which
    may also use ``accuracy``, the ImageNet validation accuracy per length) or ``argmin``/``patience`` on
    the variant it names."""
    if stop.rule == "recommended":
        return recommend_online(table, stop, accuracy)
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


# --------------------------------------------------------------------------------------------------
# Online stop rules: decide at each checkpoint, in pretraining order, whether pretraining can stop.
#
# Every rule answers one question, ``stop_now(seen)``, on what it has seen so far (the scores and ImageNet
# accuracy of the checkpoints up to now); the checkpoint it stops at is the one fine-tuned. The same
# method serves ``medxfer analyze`` (walked over a published curve by :meth:`StopRule.decide`) and the
# online pretraining callback (asked once per checkpoint), so both apply exactly one rule.
# Literature: Prechelt, "Early stopping - but when?" (1998) for plateau/patience criteria that trade
# training time against quality; Domhan, Springenberg & Hutter (IJCAI 2015) for predicting the rest of a
# learning curve from its start; Hidy, Bakos & Lukacs (arXiv 2410.18677) for the robustness score as a
# signal to stop ImageNet pretraining; Singh, Hess & Vanschoren (arXiv 2510.06448) for the warning that
# dataset-agnostic heuristics often match transferability metrics, hence the ImageNet-only baselines.

Variant = tuple[str, float, int, bool]  # (metric, margin, level, pooled); a negative level counts from the deepest

# The reference study's metric names -> medxfer's
METRIC_ALIASES = {"cosine_distance": "cosine", "l2_loss": "l2", "inv_pearson_corr": "pearson"}
DEFAULT_VARIANT: Variant = ("cosine", 0.5, -1, True)  # StopConfig's default variant


def canonical_metric(metric: str) -> str:
    return METRIC_ALIASES.get(str(metric), str(metric))


@dataclass(frozen=True)
class Curve:
    """What a stop rule sees of one pretraining run, in pretraining order.

    ``scores``: ``(metric, margin, level, pooled) -> score per length``, oriented so that lower = better;
    ``halfwidth``: the same keys -> half the bootstrap interval (when scored with one); ``imagenet_accuracy``:
    validation accuracy of each checkpoint (NaN where unknown); ``planned_longest``: the last length of the
    schedule (what "pretraining to the end" means; default the last length given).
    """

    lengths: np.ndarray
    scores: Mapping[Variant, np.ndarray] = field(default_factory=dict)
    imagenet_accuracy: Optional[np.ndarray] = None
    halfwidth: Mapping[Variant, np.ndarray] = field(default_factory=dict)
    planned_longest: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", np.asarray(self.lengths, dtype=float))
        n = len(self.lengths)
        if n == 0 or np.any(np.diff(self.lengths) <= 0):
            raise DataError(f"a stop rule needs increasing pretraining lengths, got {list(self.lengths)}")
        scores = {_variant_key(k): np.asarray(v, dtype=float) for k, v in self.scores.items()}
        for key, values in scores.items():
            if len(values) != n:
                raise DataError(f"score {key}: {len(values)} values for {n} pretraining lengths")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "halfwidth", {_variant_key(k): np.asarray(v, dtype=float)
                                               for k, v in self.halfwidth.items()})
        accuracy = self.imagenet_accuracy
        object.__setattr__(self, "imagenet_accuracy",
                           np.full(n, np.nan) if accuracy is None else np.asarray(accuracy, dtype=float))

    @property
    def longest(self) -> float:
        return float(self.planned_longest if self.planned_longest is not None else self.lengths[-1])

    def upto(self, index: int) -> "Curve":
        """The curve as seen at checkpoint ``index`` (0-based): what an online rule knows then. Its scores are
        views of this curve's (already checked and keyed), sliced when read: a rule walks every checkpoint,
        and a curve may hold tens of thousands of variants."""
        end = index + 1
        seen = object.__new__(Curve)
        for name, value in (("lengths", self.lengths[:end]), ("scores", _Prefix(self.scores, end)),
                            ("imagenet_accuracy", self.imagenet_accuracy[:end]),
                            ("halfwidth", _Prefix(self.halfwidth, end)), ("planned_longest", self.longest),
                            ("_level_index", self._levels())):
            object.__setattr__(seen, name, value)
        return seen

    def resolve(self, variant: Variant) -> Optional[Variant]:
        """The scored key of ``variant`` (a negative level counts from the deepest level scored with that
        metric, margin and pooling); None when it is not scored."""
        metric, margin, level, pooled = _variant_key(variant)
        if level >= 0:
            key = (metric, margin, level, pooled)
            return key if key in self.scores else None
        levels = self._levels().get((metric, margin, pooled), [])
        return (metric, margin, levels[level], pooled) if len(levels) >= -level else None

    def _levels(self) -> dict[tuple, list[int]]:
        """(metric, margin, pooled) -> the levels scored, ascending; built once per curve (and shared with
        its :meth:`upto` views, which hold the same variants)."""
        index = self.__dict__.get("_level_index")
        if index is None:
            index = {}
            for metric, margin, level, pooled in self.scores:
                index.setdefault((metric, margin, pooled), []).append(level)
            index = {key: sorted(levels) for key, levels in index.items()}
            object.__setattr__(self, "_level_index", index)
        return index

    def score(self, variant: Variant) -> Optional[np.ndarray]:
        key = self.resolve(variant)
        if key is None or not np.isfinite(self.scores[key]).all():
            return None
        return self.scores[key]

    def tolerance(self, variant: Variant, rel_tol: float) -> np.ndarray:
        """Per checkpoint, the change of the score that counts as no change: ``rel_tol`` of its size, or the
        bootstrap half-width where that is larger (a move inside its own interval is noise)."""
        values = self.score(variant)
        tol = rel_tol * np.abs(values)
        width = self.halfwidth.get(self.resolve(variant))
        if width is not None:
            tol = np.fmax(tol, width)
        return tol


class _Prefix(Mapping):
    """``{key: values[:end]}`` of a mapping of arrays, sliced when read (:meth:`Curve.upto`)."""

    def __init__(self, full: Mapping[Variant, np.ndarray], end: int):
        self._full = full._full if isinstance(full, _Prefix) else full
        self._end = min(end, full._end) if isinstance(full, _Prefix) else end

    def __getitem__(self, key: Variant) -> np.ndarray:
        return self._full[key][:self._end]

    def __iter__(self):
        return iter(self._full)

    def __len__(self) -> int:
        return len(self._full)

    def __contains__(self, key: object) -> bool:
        return key in self._full


def _variant_key(variant: Sequence[Any]) -> Variant:
    metric, margin, level, pooled = variant
    return (canonical_metric(metric), round(float(margin), 6), int(level), bool(pooled))


def variant_text(variant: Variant) -> str:
    metric, margin, level, pooled = _variant_key(variant)
    where = "deepest level" if level == -1 else (f"level {level}" if level >= 0 else f"deepest level {level + 1}")
    return f"{metric} margin={margin:g} {where} {'pooled' if pooled else 'flat'}"


TrainingCurve = tuple[Curve, np.ndarray]  # a curve and the mean downstream Dice at its lengths


class StopRule:
    """An online stop rule. Subclasses implement :meth:`stop_now`; learned rules also :meth:`fit`."""

    kind = "rule"
    learned = False

    def stop_now(self, seen: Curve) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, training: Sequence[TrainingCurve]) -> "StopRule":
        """A rule fitted on ``training`` (curves with their Dice): itself for rules that learn nothing."""
        return self

    def params(self) -> dict[str, Any]:
        return {}

    @property
    def name(self) -> str:
        described = ", ".join(f"{k}={_param_text(v)}" for k, v in self.params().items() if k != "model")
        return f"{self.kind} ({described})" if described else self.kind

    def decide(self, curve: Curve) -> tuple[float, float]:
        """``(chosen_length, stopped_length)``: walking the checkpoints in order, the first at which
        :meth:`stop_now` is True (fine-tuned and where pretraining stopped); the last if it never is."""
        for index in range(len(curve.lengths)):
            if index < len(curve.lengths) - 1 and self.stop_now(curve.upto(index)):
                length = float(curve.lengths[index])
                return length, length
        return float(curve.lengths[-1]), float(curve.lengths[-1])

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params()}


def _param_text(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 4:
        return variant_text(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _plateaued(values: np.ndarray, tolerance: np.ndarray, patience: int) -> bool:
    """The last ``patience`` changes are each within the tolerance of the checkpoint before."""
    if len(values) <= patience:
        return False
    changes = np.abs(np.diff(values[-(patience + 1):]))
    return bool(np.all(changes <= tolerance[-(patience + 1):-1]))


@dataclass
class ScorePlateau(StopRule):
    """Stop once the score of ``variant`` has moved by no more than ``rel_tol`` of its value (or by no more
    than its bootstrap half-width, when larger) for ``patience`` checkpoints in a row (Prechelt's
    "no progress" criterion applied to the transferability score)."""

    variant: Variant = DEFAULT_VARIANT
    rel_tol: float = 0.02
    patience: int = 2
    kind = "score plateau"

    def stop_now(self, seen: Curve) -> bool:
        values = seen.score(self.variant)
        return values is not None and _plateaued(values, seen.tolerance(self.variant, self.rel_tol), self.patience)

    def params(self) -> dict[str, Any]:
        return {"variant": _variant_key(self.variant), "rel_tol": self.rel_tol, "patience": self.patience}


@dataclass
class VariantAgreement(StopRule):
    """Stop once at least ``quorum`` of the score variants at ``level`` (every metric, margin and pooling)
    agree that they plateaued (moved by no more than ``rel_tol``, or their interval) for ``patience``
    checkpoints: one noisy variant neither stops nor holds the run."""

    level: int = -1
    rel_tol: float = 0.02
    quorum: float = 0.75
    patience: int = 1
    kind = "variant agreement"

    def stop_now(self, seen: Curve) -> bool:
        variants = {(m, g, self.level, p) for (m, g, _, p) in seen.scores}
        votes = [_plateaued(values, seen.tolerance(v, self.rel_tol), self.patience)
                 for v in sorted(variants) if (values := seen.score(v)) is not None]
        return bool(votes) and float(np.mean(votes)) >= self.quorum

    def params(self) -> dict[str, Any]:
        return {"level": self.level, "rel_tol": self.rel_tol, "quorum": self.quorum, "patience": self.patience}


@dataclass
class ImageNetPlateau(StopRule):
    """Stop once ImageNet validation accuracy gained less than ``min_gain`` (relative) since the previous
    checkpoint (the paper's foil: a dataset-agnostic rule). Length-0 (random) checkpoints are skipped."""

    min_gain: float = 0.10
    kind = "ImageNet plateau"

    def stop_now(self, seen: Curve) -> bool:
        accuracy = seen.imagenet_accuracy[seen.lengths > 0]
        if len(accuracy) < 2 or not np.isfinite(accuracy[-2:]).all() or accuracy[-2] <= 0:
            return False
        return bool((accuracy[-1] - accuracy[-2]) / accuracy[-2] < self.min_gain)

    def params(self) -> dict[str, Any]:
        return {"min_gain": self.min_gain}


@dataclass
class ImageNetAndScore(StopRule):
    """Stop once both ImageNet accuracy (:class:`ImageNetPlateau`) and the score (:class:`ScorePlateau`,
    patience 1) have plateaued: the source task has converged and the target features stopped moving."""

    min_gain: float = 0.10
    variant: Variant = DEFAULT_VARIANT
    rel_tol: float = 0.02
    kind = "ImageNet and score plateau"

    def stop_now(self, seen: Curve) -> bool:
        return (ImageNetPlateau(self.min_gain).stop_now(seen)
                and ScorePlateau(self.variant, self.rel_tol, 1).stop_now(seen))

    def params(self) -> dict[str, Any]:
        return {"min_gain": self.min_gain, "variant": _variant_key(self.variant), "rel_tol": self.rel_tol}


def regret_and_saved(rule: StopRule, training: Sequence[TrainingCurve]) -> tuple[float, float]:
    """Mean Dice regret (best length's Dice minus the chosen one's) and mean fraction of pretraining saved
    (``1 - stopped / longest``) of ``rule`` over curves with known Dice."""
    regrets, saved = [], []
    for curve, dice in training:
        chosen, stopped = rule.decide(curve)
        dice = np.asarray(dice, dtype=float)
        regrets.append(float(np.max(dice) - dice[int(np.flatnonzero(curve.lengths == chosen)[0])]))
        saved.append(1.0 - stopped / curve.longest)
    return float(np.mean(regrets)), float(np.mean(saved))


def _cheapest_within_budget(candidates: Sequence[StopRule], training: Sequence[TrainingCurve],
                            min_saved: float) -> StopRule:
    """The candidate with the lowest mean regret on ``training`` among those saving at least ``min_saved``
    there (ties: the earlier candidate); if none does, the one saving most."""
    outcomes = [regret_and_saved(rule, training) for rule in candidates]
    within = [i for i, (_, saved) in enumerate(outcomes) if saved >= min_saved - 1e-12]
    if within:
        return candidates[min(within, key=lambda i: (outcomes[i][0], i))]
    return candidates[max(range(len(candidates)), key=lambda i: (outcomes[i][1], -i))]


# Curve features of the learned rule: model-agnostic, so a rule fitted on the reference study's tables
# applies to a user's pretraining run (no architecture or dataset identity).
FEATURE_VARIANTS: tuple[Variant, ...] = (("cosine", 0.5, -1, True), ("l2", 0.5, -1, True),
                                         ("pearson", 0.5, -1, True), ("cosine", 0.5, -2, True))


def _relative(a: float, b: float) -> float:
    return float((a - b) / abs(b)) if abs(b) > 1e-12 else 0.0


def curve_features(seen: Curve) -> np.ndarray:
    """Features of the curve so far: progress (linear and log), ImageNet accuracy and its last relative gain,
    and per :data:`FEATURE_VARIANTS` the score's last relative change, its change since the first checkpoint
    and its distance above its best so far (0 where unknown)."""
    length, longest = float(seen.lengths[-1]), seen.longest
    accuracy = seen.imagenet_accuracy
    last_acc = float(accuracy[-1]) if np.isfinite(accuracy[-1]) else 0.0
    gain = _relative(accuracy[-1], accuracy[-2]) if len(accuracy) > 1 and np.isfinite(accuracy[-2:]).all() else 0.0
    features = [length / longest, math.log1p(length) / math.log1p(longest), last_acc, gain]
    for variant in FEATURE_VARIANTS:
        values = seen.score(variant)
        if values is None:
            features += [0.0, 0.0, 0.0]
            continue
        features += [_relative(values[-1], values[-2]) if len(values) > 1 else 0.0,
                     _relative(values[-1], values[0]), _relative(values[-1], float(np.min(values)))]
    return np.array(features, dtype=float)


@dataclass
class LearnedGain(StopRule):
    """Stop when the Dice gained by pretraining on to the end, as predicted from the curve so far, is below a
    threshold (``cost_aware``: below ``threshold`` x the fraction of pretraining still ahead, i.e. a Dice
    price per unit of compute). The prediction is a ridge regression (scikit-learn) from
    :func:`curve_features` to ``Dice(longest) - Dice(now)``, fitted on other datasets' curves, in the spirit of
    learning-curve extrapolation (Domhan et al. 2015); the threshold is the one with the lowest regret on
    those curves among those saving at least ``min_saved``. Unfitted, it never stops."""

    min_saved: float = 0.5
    cost_aware: bool = False
    alpha: float = 1.0
    threshold: Optional[float] = None
    model: Optional[dict[str, list[float]]] = None  # mean, scale, coef, intercept
    learned = True

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "learned gain, cost-aware" if self.cost_aware else "learned gain"

    def predict(self, seen: Curve) -> float:
        if self.model is None:
            return math.inf
        m = self.model
        z = (curve_features(seen) - np.asarray(m["mean"])) / np.asarray(m["scale"])
        return float(z @ np.asarray(m["coef"]) + m["intercept"][0])

    def stop_now(self, seen: Curve) -> bool:
        if self.model is None or self.threshold is None:
            return False
        bar = self.threshold * (1.0 - seen.lengths[-1] / seen.longest) if self.cost_aware else self.threshold
        return self.predict(seen) < bar

    def fit(self, training: Sequence[TrainingCurve]) -> "LearnedGain":
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        rows, targets = [], []
        for curve, dice in training:
            dice = np.asarray(dice, dtype=float)
            for index in range(len(curve.lengths) - 1):
                rows.append(curve_features(curve.upto(index)))
                targets.append(float(dice[-1] - dice[index]))
        if len(rows) < 3:
            raise DataError(f"{self.kind}: needs curves with at least two lengths to learn from")
        scaler = StandardScaler().fit(np.array(rows))
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        ridge = Ridge(alpha=self.alpha).fit((np.array(rows) - scaler.mean_) / scale, np.array(targets))
        model = {"mean": scaler.mean_.tolist(), "scale": scale.tolist(), "coef": ridge.coef_.tolist(),
                 "intercept": [float(ridge.intercept_)]}
        grid = np.linspace(0.0, 0.1, 41) if self.cost_aware else np.linspace(-0.01, 0.03, 41)
        candidates = [LearnedGain(self.min_saved, self.cost_aware, self.alpha, float(t), model) for t in grid]
        return _cheapest_within_budget(candidates, training, self.min_saved)  # type: ignore[return-value]

    def params(self) -> dict[str, Any]:
        return {"min_saved": self.min_saved, "alpha": self.alpha, "threshold": self.threshold, "model": self.model}


@dataclass
class SelectedRule(StopRule):
    """Learned choice among fixed rules: the candidate with the lowest mean regret on the training curves
    among those saving at least ``min_saved`` there (fitted candidates are fitted on the same curves).
    Unfitted, it never stops; fitted, it is the chosen rule."""

    candidates: tuple[StopRule, ...] = ()
    min_saved: float = 0.5
    label: str = "selected"
    learned = True

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"{self.label} (best of {len(self.candidates)} on the training datasets)"

    def stop_now(self, seen: Curve) -> bool:
        return False

    def fit(self, training: Sequence[TrainingCurve]) -> StopRule:
        fitted = [rule.fit(training) for rule in self.candidates]
        return _cheapest_within_budget(fitted, training, self.min_saved)

    def params(self) -> dict[str, Any]:
        return {"min_saved": self.min_saved}


RULE_KINDS = {"score plateau": ScorePlateau, "variant agreement": VariantAgreement,
              "ImageNet plateau": ImageNetPlateau, "ImageNet and score plateau": ImageNetAndScore,
              "learned gain": LearnedGain, "learned gain, cost-aware": LearnedGain}


def rule_from_dict(saved: Mapping[str, Any]) -> StopRule:
    """The rule :meth:`StopRule.as_dict` saved (a recommendation's rule, reproduced in a user's run)."""
    saved = dict(saved)
    kind = saved.pop("kind", None)
    if kind not in RULE_KINDS:
        raise ConfigError(f"unknown stop rule kind {kind!r}; use one of {', '.join(RULE_KINDS)}")
    if "variant" in saved:
        saved["variant"] = _variant_key(saved["variant"])
    if kind.startswith("learned gain"):
        saved["cost_aware"] = kind.endswith("cost-aware")
    return RULE_KINDS[kind](**saved)



# --------------------------------------------------------------------------------------------------
# The recommended rule, applied by `medxfer score` and the online pretraining callback

# What `medxfer analyze` recommends on the reference study's published tables (development seeds 123124-6,
# all 36 groups; docs/analyze.md, "Stop rules on the reference tables"): the lowest out-of-sample regret
# among online rules saving >= 50% of pretraining. It does not reach issue #15's goal (see docs/analyze.md for how far it is).
RECOMMENDED_RULE: dict[str, Any] = {"kind": "ImageNet plateau", "min_gain": 0.10}


def load_stop_rule(stop: StopConfig) -> StopRule:
    """The online rule of ``stop.rule == "recommended"``: the one saved in ``stop.rule_file`` (a
    ``recommended_rule.json`` of ``medxfer analyze``, or a rule's ``as_dict``), else :data:`RECOMMENDED_RULE`."""
    if stop.rule_file is None:
        return rule_from_dict(RECOMMENDED_RULE)
    path = Path(stop.rule_file)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the stop rule ({type(exc).__name__})") from None
    rule = saved.get("stop_rule", saved) if isinstance(saved, dict) else None
    if not isinstance(rule, dict):
        raise ConfigError(f"{path}: no stop rule (expected a 'stop_rule' object, as medxfer analyze writes)")
    try:
        return rule_from_dict(rule)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: bad stop rule parameters ({exc})") from None


def curve_from_table(table: pd.DataFrame, accuracy: Optional[Mapping[float, Optional[float]]] = None) -> Curve:
    """The :class:`Curve` of one run's ``robustness.csv`` rows (every variant; bootstrap half-widths from
    ``ci_low``/``ci_high`` where present) and its ImageNet accuracy per length (None/NaN where unknown)."""
    lengths = np.array(sorted(pd.to_numeric(table["pretraining_length"]).astype(float).unique()))
    scores, halfwidth = {}, {}
    has_interval = {"ci_low", "ci_high"} <= set(table.columns)
    for key, rows in table.groupby(["metric", "margin", "level", "pooled"], sort=True):
        by_length = rows.groupby(pd.to_numeric(rows["pretraining_length"]).astype(float))
        values = by_length["robustness"].mean().reindex(lengths).to_numpy(float)
        if not np.isfinite(values).all():
            continue
        variant = _variant_key(key)
        scores[variant] = values
        if has_interval:
            width = ((by_length["ci_high"].mean() - by_length["ci_low"].mean()) / 2.0).reindex(lengths).to_numpy(float)
            if np.isfinite(width).all():
                halfwidth[variant] = width
    known = {float(k): (math.nan if v is None else float(v)) for k, v in (accuracy or {}).items()}
    return Curve(lengths, scores, np.array([known.get(float(n), math.nan) for n in lengths]), halfwidth)


def recommend_online(table: pd.DataFrame, stop: StopConfig,
                     accuracy: Optional[Mapping[float, Optional[float]]] = None) -> Recommendation:
    """The recommended rule (:func:`load_stop_rule`) walked over one run's checkpoints in order: the length
    where it stops (fine-tuned) and how far pretraining ran; the ``stop`` variant's scores are reported."""
    rule = load_stop_rule(stop)
    curve = curve_from_table(table, accuracy)
    if isinstance(rule, (ImageNetPlateau, ImageNetAndScore, LearnedGain)) and not np.isfinite(curve.imagenet_accuracy).any():
        log.warning("the stop rule %s uses ImageNet validation accuracy, and no checkpoint has one "
                    "(manifest val_accuracy): it cannot stop before the last checkpoint", rule.name)
    chosen, stopped = rule.decide(curve)
    try:
        rows = select_variant(table, stop)
        variant_scores = dict(zip(rows["pretraining_length"].astype(float), rows["robustness"].astype(float)))
        variant = {"metric": stop.metric, "margin": stop.margin, "level": _resolve_level(table, stop.level),
                   "pooled": stop.pooled}
    except ConfigError:
        variant_scores, variant = {}, {}
    return Recommendation(chosen, variant_scores.get(chosen, math.nan), f"recommended: {rule.name}", None,
                          stopped < float(curve.lengths[-1]), stopped, variant_scores, variant, rule.as_dict())
