"""Statistics over groups: correlations of each predictor with Dice, bootstrap intervals, and the
per-rule summary (regret, saved, wins/ties/losses against always longest)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from medxfer.report.rules import IN_SAMPLE, GroupCurves, Rule


IMAGENET_PREDICTOR = "ImageNet accuracy"
SINGLE_VARIANT = ("score", "baseline estimator")  # rule families with one rule per variant (many of them)


def correlations(groups: Sequence[GroupCurves]) -> pd.DataFrame:
    """Per group and predictor (every score variant, oriented so that higher = predicted better, and the
    ImageNet accuracy): Pearson, Spearman, Kendall tau-b and weighted Kendall tau with mean Dice over the
    group's lengths. NaN where the predictor is missing at a length or constant."""
    from scipy import stats

    rows = []
    for g in groups:
        names = list(g.scores) + [IMAGENET_PREDICTOR]
        x = np.vstack([-g.scores[v] for v in g.scores] + [g.imagenet_accuracy.reshape(1, -1)])
        y = g.dice
        usable = np.isfinite(x).all(axis=1) & (np.ptp(np.nan_to_num(x), axis=1) > 0) & (len(y) >= 3) \
            & (np.ptp(y) > 0)
        pearson = np.full(len(names), np.nan)
        spearman, kendall, weighted = pearson.copy(), pearson.copy(), pearson.copy()
        if usable.any():
            xs = x[usable]
            pearson[usable] = _row_pearson(xs, y)
            spearman[usable] = _row_pearson(stats.rankdata(xs, axis=1), stats.rankdata(y))
            kendall[usable] = _row_kendall_b(xs, y)
            weighted[usable] = [stats.weightedtau(row, y).statistic for row in xs]
        for i, name in enumerate(names):
            rows.append({"model": g.model, "dataset": g.dataset, "pretraining_scheme": g.pretraining_scheme,
                         "freeze_encoder": g.freeze_encoder, "predictor": name, "n_lengths": len(y),
                         "pearson": pearson[i], "spearman": spearman[i], "kendall": kendall[i],
                         "weighted_tau": weighted[i]})
    return pd.DataFrame(rows)


def _row_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every row of ``x`` with ``y`` (rows and ``y`` non-constant)."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean()
    return np.clip((xc @ yc) / np.sqrt((xc ** 2).sum(axis=1) * (yc ** 2).sum()), -1.0, 1.0)


def _row_kendall_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall tau-b of every row of ``x`` with ``y``: scipy's ``kendalltau`` (same statistic), vectorised
    over the rows because analyze computes it for every variant of every group (thousands of short rows)."""
    upper = np.triu_indices(len(y), k=1)
    sx = np.sign(x[:, :, None] - x[:, None, :])[:, upper[0], upper[1]]
    sy = np.sign(y[:, None] - y[None, :])[upper]
    concordance = (sx * sy).sum(axis=1)
    return concordance / np.sqrt((sx != 0).sum(axis=1) * (sy != 0).sum())


def bootstrap_interval(values: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups (scipy); NaN for fewer than two values."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return math.nan, math.nan
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def cluster_bootstrap_interval(values: Sequence[float], clusters: Sequence, n_resamples: int = 2000,
                               confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups when groups come in clusters that share their
    inputs (the groups of one pretraining run share its checkpoints, so its ImageNet decisions and scores):
    whole clusters are resampled, so the interval does not pretend they are independent. NaN for fewer than
    two clusters."""
    values = np.asarray(values, dtype=float)
    clusters = np.asarray(clusters)
    keep = np.isfinite(values)
    values, clusters = values[keep], clusters[keep]
    ids, inverse = np.unique(clusters, return_inverse=True)
    if len(ids) < 2:
        return math.nan, math.nan
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(float)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_resamples, len(ids)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN when either side is constant or has fewer than 3 values."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(_row_pearson(stats.rankdata(x).reshape(1, -1), stats.rankdata(y))[0])


def coverage_label(covered: Sequence[GroupCurves], groups: Sequence[GroupCurves]) -> str:
    """``all 36 groups``, or which groups are missing when that is a whole model or dataset."""
    n, k = len(groups), len(covered)
    if k == n:
        return f"all {n} groups" if n != 1 else "the only group"
    ids = {id(g) for g in covered}
    missing = [g for g in groups if id(g) not in ids]
    for attribute, what in (("model", "no"), ("dataset", "no")):
        gone = {getattr(g, attribute) for g in missing}
        if not gone & {getattr(g, attribute) for g in covered}:
            return f"{k} of {n} groups ({what} {', '.join(sorted(gone))})"
    return f"{k} of {n} groups"


def summarize(decisions: pd.DataFrame, groups: Sequence[GroupCurves], rules: Sequence[Rule],
              correlation_table: pd.DataFrame, n_resamples: int = 2000) -> pd.DataFrame:
    """One row per evaluated rule: coverage, mean regret and saved with bootstrap intervals over groups,
    the paired regret difference against always longest on the same groups (``regret_vs_longest``) with a
    bootstrap interval over groups and one over pretraining runs (clusters: encoder x scheme), whether the
    rule uses ImageNet accuracy, wins/ties/losses against always longest (tie: within the group's seed
    noise), mean correlations of the rule's variant, ties of argmin."""
    by_key = {g.key: g for g in groups}
    variant_of = {r.name: r.variant for r in rules}
    family_of = {r.name: r.family for r in rules}
    online = {r.name for r in rules if r.stop_rule is not None}
    uses_imagenet = {r.name for r in rules if r.uses_imagenet}
    corr = (correlation_table.groupby("predictor")[["pearson", "spearman", "kendall", "weighted_tau"]].mean()
            if len(correlation_table) else pd.DataFrame())
    rows = []
    for rule, frame in decisions.groupby("rule", sort=False):
        covered = [by_key[k] for k in zip(frame["model"], frame["dataset"], frame["pretraining_scheme"],
                                          frame["freeze_encoder"])]
        base = rule.rsplit(" [", 1)[0]
        low, high = bootstrap_interval(frame["regret"], n_resamples)
        saved_low, saved_high = bootstrap_interval(frame["saved"], n_resamples)
        diff_low, diff_high = bootstrap_interval(frame["dice_vs_longest"], n_resamples)
        # the paired difference with always longest: the same groups, so their shared noise cancels
        paired = -frame["dice_vs_longest"]
        paired_low, paired_high = bootstrap_interval(paired, n_resamples)
        clusters = frame["encoder_key"].astype(str) + " | " + frame["scheme_key"].astype(str)
        cluster_low, cluster_high = cluster_bootstrap_interval(paired, clusters, n_resamples)
        outcome = frame["vs_longest"].value_counts()
        row = {"rule": rule, "family": family_of.get(base, frame["family"].iloc[0]),
               "evaluation": frame["evaluation"].iloc[0], "bound": bool(frame["bound"].iloc[0]),
               "online": base in online,
               "coverage": coverage_label(covered, groups), "n_groups": len(frame),
               "regret_mean": frame["regret"].mean(), "regret_ci_low": low, "regret_ci_high": high,
               "regret_median": frame["regret"].median(), "regret_max": frame["regret"].max(),
               "saved_mean": frame["saved"].mean(), "saved_ci_low": saved_low, "saved_ci_high": saved_high,
               "dice_vs_longest_mean": frame["dice_vs_longest"].mean(), "dice_vs_longest_ci_low": diff_low,
               "dice_vs_longest_ci_high": diff_high,
               "regret_vs_longest_mean": paired.mean(), "regret_vs_longest_ci_low": paired_low,
               "regret_vs_longest_ci_high": paired_high, "regret_vs_longest_cluster_ci_low": cluster_low,
               "regret_vs_longest_cluster_ci_high": cluster_high, "n_clusters": int(clusters.nunique()),
               "uses_imagenet": base in uses_imagenet,
               "wins": int(outcome.get("win", 0)), "ties": int(outcome.get("tie", 0)),
               "losses": int(outcome.get("loss", 0)), "tied_argmin": int((frame["detail"] == "tied").sum())}
        variant = variant_of.get(base, "")
        for column in ("pearson", "spearman", "kendall", "weighted_tau"):
            row[f"{column}_mean"] = corr.loc[variant, column] if variant in corr.index else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def honest(summary: pd.DataFrame) -> pd.Series:
    """Rules whose figures are out of sample: not an oracle, a fitted rule only as evaluated
    leave-one-dataset-out, and no single score variant or estimator (picking the best of many on the same
    data is an in-sample choice; the fitted "best variant" rules make that choice honestly)."""
    return ~summary["bound"] & (summary["evaluation"] != IN_SAMPLE) & ~summary["family"].isin(SINGLE_VARIANT)
