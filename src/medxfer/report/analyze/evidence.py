"""The evidence behind the claims (``claims.py``), each a table ``medxfer analyze`` writes:

- :func:`held_out_replication` (``replication.csv``): is a shorter length better, judged on seeds that did
  not choose it? For each group and held-out seed, the best length by the mean Dice of the other seeds, and
  its Dice gain over the longest length on the held-out seed. Choosing and judging on the same seeds is a
  winner's curse: the best of several noisy means beats the longest by chance.
- :func:`flat_curve_null`: what the old counts (groups peaking before the longest length; beating it by more
  than one seed s.d.) and the held-out gain are under a flat true curve with each group's own seed noise.
- :func:`between_runs` (``between_runs.csv``): ImageNet accuracy and the score against Dice across runs
  (models and pretraining schemes) at equal length, where accuracy is not just the length.
- :func:`no_pretraining` (``no_pretraining.csv``): Dice without pretraining (length 0) against the pretrained
  lengths, where the downstream table has it (its scores may be copies and are left out of the score analysis).
- :func:`best_of_n_null`: the best of N single-variant rules against the best of N under a permutation null.
- :func:`breakdown` (``breakdown.csv``): every rule's regret and saving per dataset, model and encoder state.

Every group uses one candidate-length set: the lengths every group has (:func:`candidate_lengths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.report.analyze.inputs import GROUP_COLUMNS
from medxfer.report.analyze.statistics import spearman
from medxfer.report.rules import GroupCurves
from medxfer.transferability.stopping import DEFAULT_VARIANT, variant_text


def candidate_lengths(groups: Sequence[GroupCurves]) -> np.ndarray:
    """The pretraining lengths every group has (the one candidate set the claims use for every group)."""
    common = set(map(float, groups[0].lengths)) if groups else set()
    for g in groups[1:]:
        common &= set(map(float, g.lengths))
    return np.array(sorted(common))


def _restricted(g: GroupCurves, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean Dice, Dice by seed) of ``g`` at ``lengths`` (all of which it has)."""
    index = [g._index(n) for n in lengths]
    return g.dice[index], g.dice_by_seed[index]


def pretraining_run(g: GroupCurves) -> str:
    """The cluster a group belongs to: its pretraining run (encoder x scheme). The groups of one run share the
    encoder checkpoints and so every ImageNet-accuracy decision (and, per dataset, the scores)."""
    return f"{g.encoder_key} | {g.scheme_key or '-'}"


def _best_index(values: np.ndarray, ties_longest: bool = False) -> int:
    """The best (highest) entry; ties: the shorter length (``ties_longest``: the longer one)."""
    best = np.flatnonzero(values == np.nanmax(values))
    return int(best[-1] if ties_longest else best[0])


def held_out_replication(groups: Sequence[GroupCurves], lengths: Optional[np.ndarray] = None) -> pd.DataFrame:
    """One row per group with at least two seeds: for each held-out seed, the length with the best mean Dice
    over the other seeds (``chosen``; ties: the longer) and ``Dice(chosen) - Dice(longest)`` on the held-out seed; ``gain`` =
    their mean over held-out seeds (0 where the longest was chosen every time), ``replicates`` = a shorter
    length was chosen and its held-out gain is positive."""
    lengths = candidate_lengths(groups) if lengths is None else lengths
    rows = []
    for g in groups if len(lengths) >= 2 else []:
        _, by_seed = _restricted(g, lengths)
        folds = []
        for s in range(by_seed.shape[1]):
            others = np.delete(by_seed, s, axis=1)
            if not np.isfinite(by_seed[:, s]).all() or others.shape[1] == 0:
                continue
            with np.errstate(all="ignore"):
                selection = np.nanmean(others, axis=1)
            if not np.isfinite(selection).all():
                continue
            chosen = _best_index(selection, ties_longest=True)  # a shorter length must be strictly better
            folds.append((float(lengths[chosen]), float(by_seed[chosen, s] - by_seed[-1, s])))
        if not folds:
            continue
        chosen, gains = zip(*folds)
        gain = float(np.mean(gains))
        rows.append({"model": g.model, "dataset": g.dataset, "pretraining_scheme": g.pretraining_scheme,
                     "freeze_encoder": g.freeze_encoder, "cluster": pretraining_run(g), "n_folds": len(folds),
                     "chosen_lengths": " ".join(f"{c:g}" for c in chosen), "gain": gain,
                     "shorter_chosen": any(c < lengths[-1] for c in chosen),
                     "replicates": any(c < lengths[-1] for c in chosen) and gain > 0,
                     "gain_lengths": " ".join(f"{c:g}" for c, d in folds if c < lengths[-1] and d > 0)})
    return pd.DataFrame(rows, columns=["model", "dataset", "pretraining_scheme", "freeze_encoder", "cluster",
                                       "n_folds", "chosen_lengths", "gain", "shorter_chosen", "replicates",
                                       "gain_lengths"])


def flat_curve_null(groups: Sequence[GroupCurves], lengths: Optional[np.ndarray] = None, n_simulations: int = 500,
                    seed: int = 0) -> dict[str, float]:
    """Expected figures under a flat true curve: each group's Dice by seed replaced by independent normal
    noise with the group's own seed s.d. (its median over lengths), same lengths and missing runs. Returns
    the mean over simulations of ``peak_before_longest`` (groups whose best mean Dice is not at the longest
    length), ``beats_by_one_sd`` (groups whose best beats the longest by more than the simulated seed s.d.),
    ``replicating`` (groups that replicate held out) and ``mean_gain`` (the mean held-out gain), and the 95th
    percentile of ``mean_gain``."""
    lengths = candidate_lengths(groups) if lengths is None else lengths
    rng = np.random.default_rng(seed)
    peaks, beats, replicating, gains = [], [], [], []
    usable = [g for g in groups if np.isfinite(g.seed_noise)]
    if not usable or len(lengths) < 2:
        return {"n_simulations": 0, "peak_before_longest": math.nan, "beats_by_one_sd": math.nan,
                "replicating": math.nan, "mean_gain": math.nan, "mean_gain_p95": math.nan}
    for _ in range(n_simulations):
        peak = beat = rep = 0
        simulated = []
        for g in usable:
            _, by_seed = _restricted(g, lengths)
            noise = rng.normal(0.0, g.seed_noise, by_seed.shape)
            noise[~np.isfinite(by_seed)] = np.nan
            with np.errstate(all="ignore"):
                mean = np.nanmean(noise, axis=1)
                sd = np.nanmedian(np.nanstd(noise, axis=1, ddof=1))
            best = _best_index(mean)
            peak += best < len(lengths) - 1
            beat += (mean[best] - mean[-1]) > sd
            simulated.append(GroupCurves(g.model, g.dataset, g.pretraining_scheme, g.freeze_encoder, g.encoder_key,
                                         g.dataset_key, g.scheme_key, lengths, mean, noise, g.seeds))
        table = held_out_replication(simulated, lengths)
        peaks.append(peak)
        beats.append(beat)
        replicating.append(int(table["replicates"].sum()))
        gains.append(float(table["gain"].mean()) if len(table) else math.nan)
    return {"n_simulations": n_simulations, "peak_before_longest": float(np.mean(peaks)),
            "beats_by_one_sd": float(np.mean(beats)), "replicating": float(np.mean(replicating)),
            "mean_gain": float(np.nanmean(gains)), "mean_gain_p95": float(np.nanpercentile(gains, 95))}


def between_runs(groups: Sequence[GroupCurves], variant=DEFAULT_VARIANT) -> pd.DataFrame:
    """One row per (dataset, encoder state, length) with at least 3 runs (models x pretraining schemes) that
    have Dice and ImageNet accuracy there: the Spearman correlation across those runs of Dice with ImageNet
    accuracy and with the ``variant``'s score (oriented: higher = predicted better; NaN unless every run has it)."""
    cells: dict[tuple, list] = {}
    for g in groups:
        score = g.stop_curve.score(variant)
        for i, length in enumerate(g.lengths):
            cells.setdefault((g.dataset_key, g.freeze_encoder, float(length)), []).append(
                (g.dice[i], g.imagenet_accuracy[i] if len(g.imagenet_accuracy) else math.nan,
                 -score[i] if score is not None else math.nan))
    rows = []
    for (dataset, frozen, length), runs in sorted(cells.items()):
        values = np.array(runs, dtype=float)
        values = values[np.isfinite(values[:, :2]).all(axis=1)]
        if len(values) < 3:
            continue
        scored = values[np.isfinite(values[:, 2])]
        rows.append({"dataset_key": dataset, "freeze_encoder": frozen, "length": length, "n_runs": len(values),
                     "spearman_accuracy": spearman(values[:, 1], values[:, 0]),
                     "spearman_score": spearman(scored[:, 2], scored[:, 0]) if len(scored) == len(values) else math.nan,
                     "score_variant": variant_text(variant)})
    return pd.DataFrame(rows, columns=["dataset_key", "freeze_encoder", "length", "n_runs", "spearman_accuracy",
                                       "spearman_score", "score_variant"])


def no_pretraining(downstream: pd.DataFrame, groups: Sequence[GroupCurves],
                   lengths: Optional[np.ndarray] = None) -> pd.DataFrame:
    """One row per group whose downstream table has Dice at length 0: its mean Dice there (over seeds; the lowest
    and highest seed's too), the best pretrained length of the candidate set and its Dice, their difference, the
    group's seed noise, and ``outcome``: which is higher, and whether by more than the seed noise ("pretraining
    better", "pretraining highest, within seed noise", "no pretraining highest, within seed noise", "no
    pretraining better")."""
    lengths = candidate_lengths(groups) if lengths is None else lengths
    lengths = lengths[lengths > 0]
    zero = downstream[downstream["length"] == 0]
    rows = []
    for g in groups if len(lengths) else []:
        key = (g.model, g.dataset, g.pretraining_scheme, g.freeze_encoder)
        mask = np.ones(len(zero), dtype=bool)
        for column, value in zip(GROUP_COLUMNS[:4], key):
            mask &= (zero[column] == value).to_numpy()
        if not mask.any():
            continue
        runs = zero.loc[mask]
        by_seed = runs.groupby("seed")["dice"].mean() if "seed" in runs.columns else runs["dice"]
        dice_zero = float(by_seed.mean())
        dice, _ = _restricted(g, lengths)
        best = _best_index(dice)
        difference = dice_zero - float(dice[best])
        noise = g.seed_noise
        if math.isnan(noise):
            outcome = "n/a (one seed)"
        elif abs(difference) <= noise:
            outcome = "no pretraining highest, within seed noise" if difference > 0 else "pretraining highest, within seed noise"
        else:
            outcome = "no pretraining better" if difference > 0 else "pretraining better"
        rows.append({"model": g.model, "dataset": g.dataset, "pretraining_scheme": g.pretraining_scheme,
                     "freeze_encoder": g.freeze_encoder, "n_seeds_at_0": len(by_seed), "dice_at_0": dice_zero,
                     "dice_at_0_low": float(by_seed.min()), "dice_at_0_high": float(by_seed.max()),
                     "best_pretrained_length": float(lengths[best]), "best_pretrained_dice": float(dice[best]),
                     "dice_at_0_minus_best": difference, "seed_noise": noise, "outcome": outcome})
    return pd.DataFrame(rows, columns=["model", "dataset", "pretraining_scheme", "freeze_encoder", "n_seeds_at_0",
                                       "dice_at_0", "dice_at_0_low", "dice_at_0_high", "best_pretrained_length",
                                       "best_pretrained_dice", "dice_at_0_minus_best", "seed_noise", "outcome"])


def best_of_n_null(groups: Sequence[GroupCurves], variants: Sequence[str], n_permutations: int = 500,
                   seed: int = 0) -> dict[str, float]:
    """The best mean regret of the ``argmin`` rules of ``variants`` scored on every group (N of them), against
    the same best of N when each group's lengths are shuffled under its scores (one permutation per group for
    all its variants, so their agreement is kept): the null mean, its 5th percentile and the permutation
    p-value (how often chance does as well)."""
    usable = [v for v in variants if all(g.score(v) is not None for g in groups)]
    if not usable or not groups:
        return {"n_variants": len(usable), "observed": math.nan, "null_mean": math.nan, "null_p5": math.nan,
                "p_value": math.nan}
    matrices = [np.vstack([g.score(v) for v in usable]) for g in groups]  # (N, lengths) per group
    regrets = [np.max(g.dice) - g.dice for g in groups]

    def best_mean_regret(orders: Sequence[np.ndarray]) -> float:
        total = np.zeros(len(usable))
        for matrix, regret, order in zip(matrices, regrets, orders):
            total += regret[order[np.argmin(matrix, axis=1)]]
        return float(total.min() / len(groups))

    observed = best_mean_regret([np.arange(len(g.lengths)) for g in groups])
    rng = np.random.default_rng(seed)
    null = np.array([best_mean_regret([rng.permutation(len(g.lengths)) for g in groups])
                     for _ in range(n_permutations)])
    return {"n_variants": len(usable), "observed": observed, "null_mean": float(null.mean()),
            "null_p5": float(np.percentile(null, 5)),
            "p_value": float((1 + np.sum(null <= observed + 1e-12)) / (1 + n_permutations))}


def breakdown(decisions: pd.DataFrame, rules: Sequence[str]) -> pd.DataFrame:
    """Per rule (``rules``) and per dataset, model and encoder state: groups, mean regret, mean saved and the
    mean paired regret difference against always longest (``regret - regret of always longest``)."""
    frame = decisions[decisions["rule"].isin(rules)].assign(
        regret_vs_longest=lambda d: -d["dice_vs_longest"],
        encoder_state=lambda d: np.where(d["freeze_encoder"], "frozen", "fine-tuned"))
    parts = []
    for by, column in (("dataset", "dataset"), ("model", "model"), ("encoder", "encoder_state")):
        agg = frame.groupby(["rule", column], sort=False).agg(
            n_groups=("regret", "size"), regret_mean=("regret", "mean"), saved_mean=("saved", "mean"),
            regret_vs_longest_mean=("regret_vs_longest", "mean")).reset_index()
        parts.append(agg.rename(columns={column: "value"}).assign(by=by))
    columns = ["rule", "by", "value", "n_groups", "regret_mean", "saved_mean", "regret_vs_longest_mean"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


@dataclass
class Evidence:
    """The tables and figures behind the claims (see the module docstring)."""

    lengths: np.ndarray  # the candidate lengths every group has
    replication: pd.DataFrame
    null: dict
    between_runs: pd.DataFrame
    no_pretraining: pd.DataFrame
    best_of_n: dict
    breakdown: pd.DataFrame
    rising_accuracy: int = 0  # groups whose ImageNet accuracy rises strictly with length


def gather_evidence(groups: Sequence[GroupCurves], decisions: pd.DataFrame, downstream: Optional[pd.DataFrame],
                    variants: Sequence[str], rules: Sequence[str], n_resamples: int = 2000) -> Evidence:
    """Every table of this module for one analysis (the nulls with ``n_resamples // 4`` draws)."""
    lengths = candidate_lengths(groups)
    draws = max(50, n_resamples // 4)
    return Evidence(
        lengths=lengths, replication=held_out_replication(groups, lengths),
        null=flat_curve_null(groups, lengths, n_simulations=draws), between_runs=between_runs(groups),
        no_pretraining=(no_pretraining(downstream, groups, lengths) if downstream is not None
                        else no_pretraining(pd.DataFrame(columns=["length"]), [], lengths)),
        best_of_n=best_of_n_null(groups, variants, n_permutations=draws), breakdown=breakdown(decisions, rules),
        rising_accuracy=sum(bool(len(g.imagenet_accuracy) and np.all(np.diff(g.imagenet_accuracy) > 0)) for g in groups))
