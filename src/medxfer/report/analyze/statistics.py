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
            weighted[usable] = _row_weighted_tau(xs, y)
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


RULES_PER_BATCH = 256  # rules whose bootstrap means are held at once: 256 x 2000 resamples x 36 groups ~ 150 MB


def _row_weighted_tau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """scipy's ``weightedtau(row, y)`` (hyperbolic weigher, additive, averaged over the rankings by either side)
    of every row of ``x``: vectorised where neither side has ties (then each pair (i, j) weighs
    ``1/(r_i + 1) + 1/(r_j + 1)`` with r the rank by decreasing value, and tau is the weighted share of
    concordant minus discordant pairs); scipy's own for rows with ties, which it orders by the other side."""
    from scipy import stats

    n = len(y)
    out = np.empty(len(x))
    tied = np.array([len(np.unique(row)) < n for row in x]) | (len(np.unique(y)) < n)
    if tied.any():
        out[tied] = [stats.weightedtau(row, y).statistic for row in x[tied]]
    free = x[~tied]
    if len(free):
        upper = np.triu_indices(n, k=1)
        concordance = (np.sign(free[:, :, None] - free[:, None, :])[:, upper[0], upper[1]]
                       * np.sign(y[:, None] - y[None, :])[upper])

        def tau_ranked_by(values: np.ndarray) -> np.ndarray:
            rank = np.argsort(np.argsort(-values, axis=1, kind="stable"), axis=1, kind="stable")
            weight = 1.0 / (rank + 1.0)
            pair_weight = weight[:, upper[0]] + weight[:, upper[1]]
            return (concordance * pair_weight).sum(axis=1) / pair_weight.sum(axis=1)

        out[~tied] = (tau_ranked_by(free) + tau_ranked_by(np.broadcast_to(y, free.shape))) / 2
    return out


def bootstrap_interval(values: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups (scipy's ``stats.bootstrap``, percentile method,
    ``default_rng(seed)``: the same draws); NaN for fewer than two values."""
    return tuple(bootstrap_intervals([values], n_resamples, confidence, seed)[0])


def bootstrap_intervals(samples: Sequence[Sequence[float]], n_resamples: int = 2000, confidence: float = 0.95,
                        seed: int = 0) -> np.ndarray:
    """:func:`bootstrap_interval` of every sample, as an ``(n samples, 2)`` array, vectorised over samples:
    analyze computes several per rule, and there is a rule per score variant (tens of thousands). Each sample
    draws as scipy would for it alone (``default_rng(seed).integers(0, n, (n_resamples, n))``), so samples of
    one size share their draws."""
    cleaned = [np.asarray(v, dtype=float) for v in samples]
    cleaned = [v[np.isfinite(v)] for v in cleaned]
    out = np.full((len(cleaned), 2), np.nan)
    by_size: dict[int, list[int]] = {}
    for i, v in enumerate(cleaned):
        if len(v) < 2:
            continue
        if np.ptp(v) == 0:
            out[i] = v[0]
        else:
            by_size.setdefault(len(v), []).append(i)
    alpha = (1.0 - confidence) / 2.0
    for size, members in by_size.items():
        draws = np.random.default_rng(seed).integers(0, size, (n_resamples, size))
        for start in range(0, len(members), RULES_PER_BATCH):
            batch = members[start:start + RULES_PER_BATCH]
            means = np.stack([cleaned[i] for i in batch])[:, draws].mean(axis=-1)
            out[batch] = np.quantile(means, [alpha, 1.0 - alpha], axis=-1).T
    return out


def cluster_bootstrap_interval(values: Sequence[float], clusters: Sequence, n_resamples: int = 2000,
                               confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups when groups come in clusters that share their
    inputs (the groups of one pretraining run share its checkpoints, so its ImageNet decisions and scores):
    whole clusters are resampled, so the interval does not pretend they are independent. NaN for fewer than
    two clusters."""
    return tuple(cluster_bootstrap_intervals([values], [clusters], n_resamples, confidence, seed)[0])


def cluster_bootstrap_intervals(samples: Sequence[Sequence[float]], clusters: Sequence[Sequence],
                                n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> np.ndarray:
    """:func:`cluster_bootstrap_interval` of every (sample, its clusters), ``(n samples, 2)``, vectorised over
    samples with the same number of clusters (they share their draws)."""
    out = np.full((len(samples), 2), np.nan)
    by_count: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for i, (values, labels) in enumerate(zip(samples, clusters)):
        values, labels = np.asarray(values, dtype=float), np.asarray(labels)
        keep = np.isfinite(values)
        ids, inverse = np.unique(labels[keep], return_inverse=True)
        if len(ids) < 2:
            continue
        sums = np.bincount(inverse, weights=values[keep], minlength=len(ids))
        counts = np.bincount(inverse, minlength=len(ids)).astype(float)
        by_count.setdefault(len(ids), []).append((i, sums, counts))
    tail = 50.0 * (1.0 - confidence)
    for n_clusters, members in by_count.items():
        draws = np.random.default_rng(seed).integers(0, n_clusters, size=(n_resamples, n_clusters))
        for start in range(0, len(members), RULES_PER_BATCH):
            batch = members[start:start + RULES_PER_BATCH]
            sums = np.stack([m[1] for m in batch])[:, draws].sum(axis=-1)
            counts = np.stack([m[2] for m in batch])[:, draws].sum(axis=-1)
            out[[m[0] for m in batch]] = np.percentile(sums / counts, [tail, 100.0 - tail], axis=-1).T
    return out


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
    noise), mean correlations of the rule's variant, ties of argmin. Computed per column over every rule at
    once (groupby, vectorised bootstraps): there is a rule per score variant, tens of thousands of them."""
    columns = ["rule", "family", "evaluation", "bound", "online", "coverage", "n_groups", "regret_mean",
               "regret_ci_low", "regret_ci_high", "regret_median", "regret_max", "saved_mean", "saved_ci_low",
               "saved_ci_high", "dice_vs_longest_mean", "dice_vs_longest_ci_low", "dice_vs_longest_ci_high",
               "regret_vs_longest_mean", "regret_vs_longest_ci_low", "regret_vs_longest_ci_high",
               "regret_vs_longest_cluster_ci_low", "regret_vs_longest_cluster_ci_high", "n_clusters",
               "uses_imagenet", "wins", "ties", "losses", "tied_argmin",
               "pearson_mean", "spearman_mean", "kendall_mean", "weighted_tau_mean"]
    if decisions.empty:
        return pd.DataFrame(columns=columns)
    by_key = {g.key: g for g in groups}
    variant_of = {r.name: r.variant for r in rules}
    family_of = {r.name: r.family for r in rules}
    online = {r.name for r in rules if r.stop_rule is not None}
    uses_imagenet = {r.name for r in rules if r.uses_imagenet}
    corr = (correlation_table.groupby("predictor")[["pearson", "spearman", "kendall", "weighted_tau"]].mean()
            if len(correlation_table) else pd.DataFrame(columns=["pearson", "spearman", "kendall", "weighted_tau"]))
    frame = decisions.assign(paired=-decisions["dice_vs_longest"],  # the paired difference with always longest:
                             # the same groups, so their shared noise cancels
                             cluster=decisions["encoder_key"].astype(str) + " | " + decisions["scheme_key"].astype(str),
                             win=decisions["vs_longest"] == "win", tie=decisions["vs_longest"] == "tie",
                             loss=decisions["vs_longest"] == "loss", tied=decisions["detail"] == "tied")
    by_rule = frame.groupby("rule", sort=False)
    out = by_rule.agg(first_family=("family", "first"), evaluation=("evaluation", "first"),
                      bound=("bound", "first"), n_groups=("regret", "size"), regret_mean=("regret", "mean"),
                      regret_median=("regret", "median"), regret_max=("regret", "max"),
                      saved_mean=("saved", "mean"), dice_vs_longest_mean=("dice_vs_longest", "mean"),
                      regret_vs_longest_mean=("paired", "mean"), n_clusters=("cluster", "nunique"),
                      wins=("win", "sum"), ties=("tie", "sum"), losses=("loss", "sum"),
                      tied_argmin=("tied", "sum")).reset_index()
    positions = list(by_rule.indices.values())  # the rows of each rule, in the order of ``out``

    def per_rule(column: str) -> list[np.ndarray]:
        values = frame[column].to_numpy(dtype=float)
        return [values[rows] for rows in positions]

    for name, column in (("regret", "regret"), ("saved", "saved"), ("dice_vs_longest", "dice_vs_longest"),
                         ("regret_vs_longest", "paired")):
        interval = bootstrap_intervals(per_rule(column), n_resamples)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = interval[:, 0], interval[:, 1]
    clusters = frame["cluster"].to_numpy()
    interval = cluster_bootstrap_intervals(per_rule("paired"), [clusters[rows] for rows in positions], n_resamples)
    out["regret_vs_longest_cluster_ci_low"], out["regret_vs_longest_cluster_ci_high"] = interval[:, 0], interval[:, 1]
    group_keys = list(zip(frame["model"], frame["dataset"], frame["pretraining_scheme"], frame["freeze_encoder"]))
    coverage: dict[tuple, str] = {}  # few distinct sets of groups: one label each
    labels = []
    for rows in positions:
        covered = tuple(group_keys[i] for i in rows)
        if covered not in coverage:
            coverage[covered] = coverage_label([by_key[k] for k in covered], groups)
        labels.append(coverage[covered])
    out["coverage"] = labels
    base = out["rule"].str.rsplit(" [", n=1).str[0]
    out["family"] = [family_of.get(b, f) for b, f in zip(base, out["first_family"])]
    out["online"] = base.isin(online)
    out["uses_imagenet"] = base.isin(uses_imagenet)
    out["bound"] = out["bound"].astype(bool)
    for column in ("wins", "ties", "losses", "tied_argmin"):
        out[column] = out[column].astype(int)
    variants = base.map(lambda b: variant_of.get(b, ""))
    for column in ("pearson", "spearman", "kendall", "weighted_tau"):
        out[f"{column}_mean"] = variants.map(corr[column]).astype(float) if len(corr) else math.nan
    return out[columns]


def honest(summary: pd.DataFrame) -> pd.Series:
    """Rules whose figures are out of sample: not an oracle, a fitted rule only as evaluated
    leave-one-dataset-out, and no single score variant or estimator (picking the best of many on the same
    data is an in-sample choice; the fitted "best variant" rules make that choice honestly)."""
    return ~summary["bound"] & (summary["evaluation"] != IN_SAMPLE) & ~summary["family"].isin(SINGLE_VARIANT)
