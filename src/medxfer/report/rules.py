"""Stop rules evaluated on per-group curves: the harness behind ``medxfer analyze``'s ``decisions.csv``.

A *group* is one (model, dataset, pretraining scheme, frozen encoder) combination; its :class:`GroupCurves`
hold, for the pretraining lengths in pretraining order, the mean Dice over seeds, the Dice of each seed,
the ImageNet accuracy of the checkpoint and every score variant (oriented: lower = predicted better).

A *rule* is a :class:`Rule`: a name and a callable ``decide(curves, training) -> Decision | None``.
``curves`` is the group decided on; ``training`` are the groups a fitted rule may learn from (all groups
in-sample; the other datasets' groups leave-one-dataset-out); an unfitted rule ignores it. A decision is
``(chosen_length, stopped_length[, detail])``: the checkpoint that is fine-tuned, and how far pretraining
had to run to make that choice (scoring included; compute saved is counted from it). A rule may return a
list of equally likely decisions (an expectation, e.g. a uniformly random length), or None where it
cannot decide (e.g. a variant not scored for this encoder).

:func:`evaluate_rules` applies rules to groups and returns one row per (rule, group) with the regret
(best mean Dice of the group minus the chosen length's), the pretraining saved (``1 - stopped / longest``)
and the comparison with always pretraining longest, where a difference within the group's seed noise
(:attr:`GroupCurves.seed_noise`) is a tie.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import pandas as pd

from medxfer.errors import DataError
from medxfer.transferability.stopping import (
    DEFAULT_VARIANT,
    Curve,
    ImageNetAndScore,
    ImageNetPlateau,
    LearnedGain,
    ScorePlateau,
    SelectedRule,
    StopRule,
    VariantAgreement,
    recommend_checkpoint,
)

# analyze's robustness variant names (``cosine margin=0.5 level=4 pooled``)
VARIANT_NAME = re.compile(r"^(?P<metric>\S+) margin=(?P<margin>[0-9.eE+-]+) level=(?P<level>-?\d+) (?P<pooled>pooled|flat)$")

log = logging.getLogger(__name__)

DECISION_COLUMNS = ["rule", "recommended", "model", "dataset", "pretraining_scheme", "freeze_encoder",
                    "chosen_length", "stopped_length"]


@dataclass(eq=False)
class GroupCurves:
    """Everything known about one group, per pretraining length (ascending)."""

    model: str  # names as in the downstream table
    dataset: str
    pretraining_scheme: str
    freeze_encoder: bool
    encoder_key: str
    dataset_key: str
    scheme_key: str
    lengths: np.ndarray
    dice: np.ndarray  # mean over seeds
    dice_by_seed: np.ndarray  # (n lengths, n seeds); NaN where a seed has no run at that length
    seeds: tuple = ()
    imagenet_accuracy: np.ndarray = field(default_factory=lambda: np.array([]))  # NaN where unknown
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)  # variant -> oriented score per length

    @property
    def key(self) -> tuple:
        return (self.model, self.dataset, self.pretraining_scheme, self.freeze_encoder)

    @property
    def label(self) -> str:
        return (f"{self.model} | {self.dataset} | {self.pretraining_scheme or '-'} | "
                f"{'frozen' if self.freeze_encoder else 'fine-tuned'} encoder")

    @property
    def longest(self) -> float:
        return float(self.lengths[-1])

    @cached_property
    def seed_noise(self) -> float:
        """Median over lengths of the s.d. of Dice over seeds (ddof 1); NaN with fewer than two seeds."""
        with np.errstate(all="ignore"):
            counts = np.isfinite(self.dice_by_seed).sum(axis=1)
            sds = [np.nanstd(row, ddof=1) for row, n in zip(self.dice_by_seed, counts) if n >= 2]
        return float(np.median(sds)) if sds else math.nan

    @cached_property
    def selectable_variants(self) -> frozenset[str]:
        """Variants scored at every length and not constant over them."""
        return frozenset(v for v in self.scores if self.score(v) is not None and not is_constant(self.score(v)))

    @cached_property
    def reference_points(self) -> tuple[float, float, float]:
        """(best mean Dice, its length, the longest length's Dice): what every decision is measured against."""
        return (float(np.max(self.dice)), float(self.lengths[int(np.argmax(self.dice))]),
                self.dice_at(self.longest))

    def dice_at(self, length: float) -> float:
        return float(self.dice[self._index(length)])

    def _index(self, length: float) -> int:
        try:
            return self._positions[float(length)]
        except KeyError:
            raise ValueError(f"{self.label}: no pretraining length {length:g}") from None

    @cached_property
    def _positions(self) -> dict[float, int]:
        return {float(n): i for i, n in enumerate(self.lengths)}

    @cached_property
    def stop_curve(self) -> Curve:
        """The group as an online stop rule sees it (:class:`medxfer.transferability.stopping.Curve`): the
        robustness variants keyed by (metric, margin, level, pooled), and the ImageNet accuracy."""
        scores = {}
        for name, values in self.scores.items():
            found = VARIANT_NAME.match(name)
            if found and np.isfinite(values).all():
                scores[(found["metric"], float(found["margin"]), int(found["level"]),
                        found["pooled"] == "pooled")] = values
        return Curve(self.lengths, scores, self.imagenet_accuracy if len(self.imagenet_accuracy) else None)

    def score(self, variant: str) -> Optional[np.ndarray]:
        """The variant's oriented scores at every length, or None where it is missing at any length."""
        values = self.scores.get(variant)
        if values is None or not np.isfinite(values).all():
            return None
        return values


class Decision(NamedTuple):
    chosen_length: float
    stopped_length: float
    detail: str = ""


RuleOutput = Union[Decision, tuple, Sequence[tuple], None]
DecideFunction = Callable[[GroupCurves, Sequence[GroupCurves]], RuleOutput]


@dataclass(frozen=True)
class Rule:
    name: str
    decide: DecideFunction
    family: str = "rule"
    fitted: bool = False  # learns from the training groups: evaluated in-sample and leave-one-dataset-out
    bound: bool = False  # knows the Dice (an oracle): a reference point, never recommended
    description: str = ""
    variant: str = ""  # the score variant a single-variant rule uses
    stop_rule: Optional[StopRule] = None  # an online rule medxfer score and the pretraining callback can apply
    uses_imagenet: bool = False  # takes ImageNet validation accuracy as an input (not the target data alone)


# ------------------------------------------------------------------------------------------ built-in rules
def longest(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> Decision:
    return Decision(curves.longest, curves.longest)


def shortest_nonzero(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> Optional[Decision]:
    nonzero = curves.lengths[curves.lengths > 0]
    return Decision(float(nonzero[0]), float(nonzero[0])) if len(nonzero) else None


def uniform_random(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> list[Decision]:
    """Every length equally likely; pretraining runs up to the drawn one."""
    return [Decision(float(n), float(n)) for n in curves.lengths]


def oracle_best(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> Decision:
    """The length with the best mean Dice (ties: the shorter); it knows, so it stops there."""
    best = float(curves.lengths[int(np.argmax(curves.dice))])
    return Decision(best, best)


def imagenet_argmax(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> Optional[Decision]:
    """The checkpoint with the best ImageNet accuracy: accuracy as the predictor of Dice."""
    accuracy = curves.imagenet_accuracy
    if not len(accuracy) or not np.isfinite(accuracy).all():
        return None
    return Decision(float(curves.lengths[int(np.argmax(accuracy))]), curves.longest)


def imagenet_gain_below(threshold: float) -> DecideFunction:
    """Stop at the first checkpoint whose ImageNet accuracy gained less than ``threshold`` (relative) over the
    previous non-zero checkpoint, and fine-tune that checkpoint; the longest if that never happens
    (:class:`medxfer.transferability.stopping.ImageNetPlateau`)."""
    return online_rule(ImageNetPlateau(threshold))


def fixed_length(length: float) -> DecideFunction:
    """Always pretrain to ``length`` and fine-tune it (a matched-saving baseline); None where the group has no
    such length."""

    def decide(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> Optional[Decision]:
        return Decision(float(length), float(length)) if float(length) in curves._positions else None

    return decide


def imagenet_gain_below_twice(threshold: float) -> DecideFunction:
    """Stop at the first checkpoint where ImageNet accuracy gained less than ``threshold`` (relative) over the
    previous non-zero checkpoint twice in a row, and fine-tune it; the longest if that never happens."""

    def decide(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> Optional[Decision]:
        accuracy = curves.imagenet_accuracy
        if not len(accuracy) or not np.isfinite(accuracy).all():
            return None
        lengths = curves.lengths[curves.lengths > 0]
        values = accuracy[curves.lengths > 0]
        slow = 0
        for i in range(1, len(values)):
            slow = slow + 1 if values[i - 1] > 0 and (values[i] - values[i - 1]) / values[i - 1] < threshold else 0
            if slow >= 2:
                return Decision(float(lengths[i]), float(lengths[i]))
        return Decision(curves.longest, curves.longest)

    return decide


def carried_over_length(curves: GroupCurves, training: Sequence[GroupCurves]) -> Optional[Decision]:
    """Fitted: the length (among those the group and every training group have) with the lowest mean regret
    over the training groups, e.g. the best length of the other datasets; ties: the shorter."""
    common = set(map(float, curves.lengths))
    for g in training:
        common &= set(map(float, g.lengths))
    if not training or not common:
        return None
    candidates = sorted(common)
    regrets = [np.mean([float(np.max(g.dice)) - g.dice_at(n) for g in training]) for n in candidates]
    best = candidates[int(np.argmin(regrets))]
    return Decision(best, best, f"{best:g}")


def uses_imagenet_accuracy(rule: Optional[StopRule]) -> bool:
    """Whether an online rule reads ImageNet accuracy (the learned and selected rules include it as an input)."""
    return isinstance(rule, (ImageNetPlateau, ImageNetAndScore, LearnedGain, SelectedRule))


def online_rule(rule: StopRule) -> DecideFunction:
    """An online stop rule of :mod:`medxfer.transferability.stopping` as a harness rule. A learned rule is
    fitted on the training groups only (their curves and Dice), once per training set; the held-out group's
    Dice is never seen, so its decision cannot depend on it."""
    fitted: dict[tuple, Optional[StopRule]] = {}

    def decide(curves: GroupCurves, training: Sequence[GroupCurves] = ()) -> Optional[Decision]:
        applied: Optional[StopRule] = rule
        if rule.learned:
            key = tuple(id(g) for g in training)
            if key not in fitted:
                try:
                    fitted[key] = rule.fit([(g.stop_curve, g.dice) for g in training])
                except DataError as exc:  # too little to learn from: the rule does not decide here
                    log.info("%s: not fitted (%s)", rule.kind, exc)
                    fitted[key] = None
            applied = fitted[key]
        if applied is None:
            return None
        chosen, stopped = applied.decide(curves.stop_curve)
        return Decision(chosen, stopped, applied.name if rule.learned else "")

    return decide


def fitted_stop_rule(rule: Rule, groups: Sequence[GroupCurves]) -> Optional[StopRule]:
    """The online rule a harness rule deploys: learned rules fitted on every group (what a user's run
    applies), fixed ones as they are; None for rules that are not online rules."""
    if rule.stop_rule is None:
        return None
    return rule.stop_rule.fit([(g.stop_curve, g.dice) for g in groups]) if rule.stop_rule.learned else rule.stop_rule


def stop_rule_families(min_saved: float = 0.5) -> list[Rule]:
    """The online stop-rule families of issue #15, each with its parameters fixed in advance (learned ones
    learn only from the training groups): plateau of the score, agreement of variants, ImageNet and score
    plateau together, the learned Dice-gain rule (plain and cost-aware), and the choice among fixed rules
    made on the training datasets under the saving target ``min_saved``."""
    fixed = [
        ScorePlateau(DEFAULT_VARIANT, rel_tol=0.02, patience=2),
        VariantAgreement(level=-1, rel_tol=0.02, quorum=0.75, patience=1),
        ImageNetAndScore(min_gain=0.10, variant=DEFAULT_VARIANT, rel_tol=0.02),
    ]
    grid = tuple([ImageNetPlateau(g) for g in (0.05, 0.10, 0.15, 0.20)]
                 + [ScorePlateau(DEFAULT_VARIANT, t, k) for t in (0.01, 0.02, 0.05) for k in (1, 2)]
                 + [VariantAgreement(-1, t, q) for t in (0.02, 0.05) for q in (0.5, 0.75)]
                 + [ImageNetAndScore(g, DEFAULT_VARIANT, t) for g in (0.10, 0.20) for t in (0.02, 0.05)])
    learned = [(LearnedGain(min_saved), "online stop rule (learned)"),
               (LearnedGain(min_saved, cost_aware=True), "online stop rule (learned)"),
               (SelectedRule(grid, min_saved, label="stop rule selected"), "online stop rule (selected)")]
    rules = [Rule(r.name, online_rule(r), "online stop rule", description=_first_sentence(r), stop_rule=r,
                  uses_imagenet=uses_imagenet_accuracy(r)) for r in fixed]
    rules += [Rule(r.kind, online_rule(r), family, fitted=True, description=_first_sentence(r), stop_rule=r,
                   uses_imagenet=uses_imagenet_accuracy(r)) for r, family in learned]
    return rules


def _first_sentence(rule: StopRule) -> str:
    return " ".join((type(rule).__doc__ or "").split(".")[0].split())


def score_rule(variant: str, stop: str = "argmin", patience: int = 1) -> DecideFunction:
    """``argmin``: the best-scored length; every checkpoint must exist, so pretraining ran to the longest.
    ``patience``: walking in pretraining order, stop once the score has not improved for ``patience``
    checkpoints (:func:`medxfer.transferability.stopping.recommend_checkpoint`)."""

    def decide(curves: GroupCurves, _training: Sequence[GroupCurves] = ()) -> Optional[Decision]:
        values = curves.score(variant)
        if values is None:
            return None
        if stop == "argmin":
            best = np.flatnonzero(values == values.min())
            tied = "tied" if len(best) > 1 else ""
            return Decision(float(curves.lengths[best[0]]), curves.longest, tied)
        rec = recommend_checkpoint(list(zip(curves.lengths, values)), "patience", patience)
        return Decision(float(rec.length), float(rec.stopped_at))

    return decide


def chosen_indices(scores: np.ndarray, stop: str = "argmin", patience: int = 1) -> np.ndarray:
    """The length index :func:`score_rule` chooses for each row of ``scores`` (variants x lengths, finite):
    ``argmin`` the first lowest; ``patience`` the best so far once it has not improved for ``patience``
    checkpoints (:func:`medxfer.transferability.stopping.recommend_checkpoint`), walking all rows at once."""
    if stop == "argmin":
        return np.argmin(scores, axis=1)  # the first of equal minima, as score_rule
    best = np.zeros(len(scores), dtype=int)
    best_value = scores[:, 0].copy()
    waited = np.zeros(len(scores), dtype=int)
    walking = np.ones(len(scores), dtype=bool)
    for j in range(1, scores.shape[1]):
        better = walking & (scores[:, j] < best_value)
        best[better], best_value[better], waited[better] = j, scores[better, j], 0
        waited[walking & ~better] += 1
        walking &= waited < patience
    return best


def is_constant(values: Optional[np.ndarray]) -> bool:
    return values is not None and len(values) > 1 and bool(np.all(values == values[0]))


def selected_variant(variants: Sequence[str], stop: str = "argmin", patience: int = 1) -> DecideFunction:
    """Fitted: the variant with the lowest mean regret over the training groups (among the variants scored,
    and not constant, on every training group and on the group decided), applied to the group."""
    cache: dict[tuple, Optional[str]] = {}

    def choose(eligible: tuple[str, ...], training: Sequence[GroupCurves]) -> Optional[str]:
        key = (eligible, tuple(id(g) for g in training))
        if key not in cache:
            # every eligible variant's regret on every training group at once (what score_rule decides)
            regrets = np.empty((len(eligible), len(training)))
            for j, g in enumerate(training):
                chosen = chosen_indices(np.vstack([g.scores[v] for v in eligible]), stop, patience)
                regrets[:, j] = float(np.max(g.dice)) - g.dice[chosen]
            best, best_regret = None, math.inf
            for variant, regret in zip(eligible, regrets.mean(axis=1)):
                if regret < best_regret - 1e-12:
                    best, best_regret = variant, regret
            cache[key] = best
        return cache[key]

    def decide(curves: GroupCurves, training: Sequence[GroupCurves]) -> Optional[Decision]:
        selectable = frozenset.intersection(*(g.selectable_variants for g in (*training, curves)))
        eligible = tuple(v for v in variants if v in selectable)
        variant = choose(eligible, training) if training else None
        if variant is None:
            return None
        decision = score_rule(variant, stop, patience)(curves, training)
        return Decision(decision.chosen_length, decision.stopped_length, variant)

    return decide


def oracle_saving(min_saved: float = 0.5, resolution: int = 1000) -> DecideFunction:
    """Knows every Dice: the lengths (one per group, over the groups given as ``training``) with the lowest
    mean regret such that pretraining saved is at least ``min_saved`` on average (exact, by dynamic
    programming over the saved fraction rounded to 1/``resolution``). A bound, not a rule."""
    cache: dict[tuple, dict[int, float]] = {}

    def options(g: GroupCurves) -> tuple[np.ndarray, np.ndarray]:
        regret = np.max(g.dice) - g.dice
        units = np.round((1.0 - g.lengths / g.longest) * resolution).astype(int)
        return regret, units

    def solve(groups: Sequence[GroupCurves]) -> dict[int, float]:
        need = int(math.ceil(min_saved * len(groups) * resolution - 1e-9))
        states = np.arange(need + 1)
        # totals[i][s]: lowest total regret of the first i groups with s saved units (capped at `need`)
        totals = [np.where(states == 0, 0.0, np.inf)]
        for g in groups:
            new = np.full(need + 1, np.inf)
            for r, u in zip(*options(g)):
                np.minimum.at(new, np.minimum(states + u, need), totals[-1] + r)
            totals.append(new)
        if not np.isfinite(totals[-1][need]):
            return {}
        chosen, state = {}, need
        for i in range(len(groups) - 1, -1, -1):
            g = groups[i]
            for option, (r, u) in enumerate(zip(*options(g))):
                sources = states[np.minimum(states + u, need) == state]
                ok = sources[np.abs(totals[i][sources] + r - totals[i + 1][state]) <= 1e-12]
                if len(ok):
                    chosen[id(g)], state = float(g.lengths[option]), int(ok[0])
                    break
        return chosen

    def decide(curves: GroupCurves, training: Sequence[GroupCurves]) -> Optional[Decision]:
        key = tuple(id(g) for g in training)
        if key not in cache:
            cache[key] = solve(list(training))
        length = cache[key].get(id(curves))
        return None if length is None else Decision(length, length)

    return decide


def builtin_rules(variants: Sequence[str], patience: Sequence[int] = (1,), imagenet_gain: float = 0.10,
                  oracle_min_saved: float = 0.5, fixed_lengths: Sequence[float] = (150, 200)) -> list[Rule]:
    """Baselines (matched-saving ones among them: fixed lengths, the ImageNet plateau seen twice, the best length
    of the other datasets), bounds, every variant's argmin and patience rules, and the variant selected on
    data."""
    rules = [
        Rule("always longest", longest, "baseline", description="pretrain to the longest length"),
        Rule("shortest non-zero", shortest_nonzero, "baseline", description="the shortest length above 0"),
        Rule("uniform random length (expected)", uniform_random, "baseline",
             description="every length equally likely; expected values"),
        Rule(f"ImageNet accuracy gain < {imagenet_gain:.0%}", imagenet_gain_below(imagenet_gain), "ImageNet",
             description=f"stop when ImageNet validation accuracy gains less than {imagenet_gain:.0%} (relative) "
                         "between checkpoints; fine-tune that checkpoint", stop_rule=ImageNetPlateau(imagenet_gain),
             uses_imagenet=True),
        Rule(f"ImageNet accuracy gain < {imagenet_gain:.0%} twice", imagenet_gain_below_twice(imagenet_gain),
             "ImageNet", description=f"stop when ImageNet accuracy gained less than {imagenet_gain:.0%} (relative) "
                                     "at two checkpoints in a row", uses_imagenet=True),
        Rule("ImageNet accuracy argmax", imagenet_argmax, "ImageNet",
             description="the checkpoint with the best ImageNet accuracy (all checkpoints trained)", uses_imagenet=True),
        *[Rule(f"always {n:g}", fixed_length(n), "baseline (matched saving)",
               description=f"always pretrain to length {n:g}") for n in fixed_lengths],
        Rule("best length of the other datasets", carried_over_length, "baseline (matched saving)", fitted=True,
             description="the length with the lowest mean regret on the training groups, carried over"),
        Rule("oracle: best length", oracle_best, "oracle", bound=True,
             description="knows the Dice; no saving required"),
        Rule(f"oracle: saves >= {oracle_min_saved:.0%}", oracle_saving(oracle_min_saved), "oracle", fitted=True,
             bound=True, description=f"knows the Dice; lowest mean regret with >= {oracle_min_saved:.0%} "
                                     "of pretraining saved on average"),
        Rule("best variant | argmin", selected_variant(variants, "argmin"), "score (selected)", fitted=True,
             description="the score variant with the lowest mean regret on the training groups, argmin"),
    ]
    for k in patience:
        rules.append(Rule(f"best variant | patience={k}", selected_variant(variants, "patience", k),
                          "score (selected)", fitted=True,
                          description=f"the variant with the lowest mean regret under patience {k}"))
    for variant in variants:
        rules.append(Rule(f"{variant} | argmin", score_rule(variant, "argmin"), "score", variant=variant))
        for k in patience:
            rules.append(Rule(f"{variant} | patience={k}", score_rule(variant, "patience", k), "score",
                              variant=variant))
    return rules


# ------------------------------------------------------------------------------------------ the harness
IN_SAMPLE = "in-sample"
LODO = "leave-one-dataset-out"


def evaluate_rules(groups: Sequence[GroupCurves], rules: Sequence[Rule], *, out_of_sample: bool = True,
                   progress: Optional[Any] = None) -> pd.DataFrame:
    """One row per (rule, group). A fitted rule appears twice: ``NAME [in-sample]`` (trained on every group)
    and, with ``out_of_sample`` and two or more datasets, ``NAME [leave-one-dataset-out]`` (trained on the
    other datasets' groups). Columns: :data:`DECISION_COLUMNS` (``recommended`` False here), then
    ``family, evaluation, bound, detail, n_decisions, chosen_dice, best_dice, best_length, longest_length,
    regret, saved, dice_vs_longest, seed_noise, vs_longest``. ``progress``: a
    :class:`medxfer.progress.ProgressLog`, stepped once per rule."""
    groups = list(groups)
    datasets = sorted({g.dataset_key for g in groups})
    rows = []
    for rule in rules:
        runs = [(rule.name if not rule.fitted else f"{rule.name} [{IN_SAMPLE}]", IN_SAMPLE if rule.fitted else "-",
                 lambda g: groups)]
        if rule.fitted and out_of_sample and not rule.bound and len(datasets) > 1:
            runs.append((f"{rule.name} [{LODO}]", LODO,
                         lambda g: [other for other in groups if other.dataset_key != g.dataset_key]))
        for name, evaluation, training_of in runs:
            for g in groups:
                output = rule.decide(g, training_of(g))
                if output is None:
                    continue
                rows.append({"rule": name, "family": rule.family, "evaluation": evaluation, "bound": rule.bound,
                             **_outcome(g, output)})
        if progress is not None:
            progress.step()
    columns = DECISION_COLUMNS + ["family", "evaluation", "bound", "detail", "n_decisions", "chosen_dice",
                                  "best_dice", "best_length", "longest_length", "regret", "saved",
                                  "dice_vs_longest", "seed_noise", "vs_longest", "encoder_key", "dataset_key",
                                  "scheme_key"]
    return pd.DataFrame(rows, columns=columns)


def _outcome(g: GroupCurves, output: RuleOutput) -> dict[str, Any]:
    if _is_single(output):  # most rows (a rule per score variant): plain floats, the same values
        decision = Decision(*output)
        chosen_length, stopped_length = float(decision.chosen_length), float(decision.stopped_length)
        chosen_dice, n_decisions, detail = g.dice_at(chosen_length), 1, decision.detail
        saved = 1.0 - stopped_length / g.longest
    else:
        decisions = [Decision(*d) for d in output]
        chosen = np.array([d.chosen_length for d in decisions], dtype=float)
        stopped = np.array([d.stopped_length for d in decisions], dtype=float)
        chosen_length, stopped_length = float(chosen.mean()), float(stopped.mean())
        chosen_dice = float(np.array([g.dice_at(c) for c in chosen]).mean())
        n_decisions, saved = len(decisions), float(np.mean(1.0 - stopped / g.longest))
        detail = decisions[0].detail if len(decisions) == 1 else f"expectation over {len(decisions)} lengths"
    best, best_length, longest_dice = g.reference_points
    noise = g.seed_noise
    difference = chosen_dice - longest_dice
    if math.isnan(noise):
        versus = "n/a (one seed)"
    else:
        versus = "tie" if abs(difference) <= noise else ("win" if difference > 0 else "loss")
    return {
        "recommended": False, "model": g.model, "dataset": g.dataset, "pretraining_scheme": g.pretraining_scheme,
        "freeze_encoder": g.freeze_encoder, "chosen_length": chosen_length, "stopped_length": stopped_length,
        "detail": detail, "n_decisions": n_decisions, "chosen_dice": chosen_dice, "best_dice": best,
        "best_length": best_length, "longest_length": g.longest,
        "regret": best - chosen_dice, "saved": saved,
        "dice_vs_longest": difference, "seed_noise": noise, "vs_longest": versus,
        "encoder_key": g.encoder_key, "dataset_key": g.dataset_key, "scheme_key": g.scheme_key,
    }


def _is_single(output: RuleOutput) -> bool:
    return isinstance(output, Decision) or (isinstance(output, tuple) and len(output) in (2, 3)
                                            and not isinstance(output[0], (tuple, list)))
