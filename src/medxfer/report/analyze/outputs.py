"""The analysis outputs: the CSV tables and ``recommended_rule.json`` written to the output folder, and the
tables ``medxfer analyze`` prints."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.report.analyze.figures import write_figures
from medxfer.report.analyze.result import AnalysisResult
from medxfer.report.analyze.statistics import IMAGENET_PREDICTOR, SINGLE_VARIANT, bootstrap_interval, correlations
from medxfer.report.quality import findings_frame
from medxfer.report.rules import IN_SAMPLE, LODO


def write_outputs(result: AnalysisResult, out: Path, figures: bool = True) -> dict[str, Path]:
    from medxfer.io import atomic_write_text

    tables = {"decisions": ("decisions.csv", result.decisions), "summary": ("analysis_summary.csv", result.summary),
              "correlations": ("correlations.csv", result.correlations), "claims": ("claims.csv", result.claims),
              "data_quality": ("data_quality.csv", findings_frame(result.quality)),
              "lodo": ("lodo.csv", result.lodo),
              "correlation_table": ("correlation_table.csv", correlation_table(result))}
    if result.evidence is not None:
        tables.update({"replication": ("replication.csv", result.evidence.replication),
                       "between_runs": ("between_runs.csv", result.evidence.between_runs),
                       "no_pretraining": ("no_pretraining.csv", result.evidence.no_pretraining),
                       "breakdown": ("breakdown.csv", result.evidence.breakdown)})
    paths = {}
    for key, (name, table) in tables.items():
        paths[key] = out / name
        atomic_write_text(paths[key], table.to_csv(index=False))
    if result.recommended_rule is not None:
        from medxfer.io import atomic_write_json

        paths["recommended_rule"] = out / "recommended_rule.json"
        atomic_write_json(paths["recommended_rule"], result.recommended_rule)
    if figures:
        paths.update(write_figures(result, out / "figures"))
    return paths


def percent_text(value: float) -> str:
    """``56%``; one decimal where whole percent would round to 0% or 100% without being it (``99.7%``)."""
    text = f"{value:.0%}"
    return f"{value:.1%}" if text in ("0%", "100%") and 1e-9 < value < 1 - 1e-9 else text


def summary_for_print(result: AnalysisResult, top: int = 5) -> pd.DataFrame:
    """Every rule that is not one of many single-variant rules (baselines, oracles, ImageNet rules, selected
    variants, added rules), the recommended one, and the ``top`` best single-variant rules of each coverage
    set (best of many: in-sample), as text columns."""
    s = result.summary
    key = s[~s["family"].isin(SINGLE_VARIANT) | s["recommended"]]
    singles = s[~s.index.isin(key.index)]
    many = singles.groupby("coverage")["rule"].transform("size")  # N: the best shown is the best of N
    singles = singles.assign(_n=many).sort_values(["regret_mean", "rule"]).groupby("coverage").head(top)
    pool = selection_pool(result)
    rows = []
    for _, r in pd.concat([key, singles]).iterrows():
        selected_from = (f" (best of {pool[r['evaluation']]} variants)" if r["family"] == "score (selected)"
                         and r["evaluation"] in pool else "")
        paired = ("" if math.isnan(r["regret_vs_longest_cluster_ci_low"]) or r["rule"] == "always longest" else
                  f"{r['regret_vs_longest_mean']:+.4f} [{r['regret_vs_longest_cluster_ci_low']:+.4f}, "
                  f"{r['regret_vs_longest_cluster_ci_high']:+.4f}]")
        rows.append({
            "rule": ("* " if r["recommended"] else "") + r["rule"] + (" (ImageNet)" if r.get("uses_imagenet") else ""),
            "groups": r["coverage"],
            "regret [95% CI]": f"{r['regret_mean']:.4f} [{r['regret_ci_low']:.4f}, {r['regret_ci_high']:.4f}]",
            "minus longest, paired [95% CI runs]": paired,
            "saved": percent_text(r["saved_mean"]),
            "vs longest W/T/L": f"{r['wins']}/{r['ties']}/{r['losses']}",
            "Spearman": "" if math.isnan(r["spearman_mean"]) else f"{r['spearman_mean']:+.2f}",
            "note": ("oracle (knows the Dice)" if r["bound"]
                     else f"chosen in-sample{selected_from}" if r["evaluation"] == IN_SAMPLE
                     else f"best of {int(r['_n'])}: in-sample" if r["family"] in SINGLE_VARIANT
                     else f"chosen on the other datasets{selected_from}" if r["family"] == "score (selected)" else "")})
    return pd.DataFrame(rows)


def selection_pool(result: AnalysisResult) -> dict[str, str]:
    """How many variants a "best variant" rule chose from (the N of "best of N"): in-sample, the score variants
    selectable (scored and not constant) on every group; leave-one-dataset-out, on the training groups and the
    group decided, which can differ between decisions (then a range, ``97-117``)."""
    s = result.summary
    argmin = s[s["family"].eq("score") & s["rule"].str.endswith(" | argmin")]
    variants = frozenset(argmin["rule"].str[:-len(" | argmin")])
    groups = result.groups
    if not groups or not variants:
        return {}
    pool = {IN_SAMPLE: str(len(variants.intersection(*(g.selectable_variants for g in groups))))}
    sizes = set()
    for held_out in {g.dataset_key for g in groups}:
        training = [g for g in groups if g.dataset_key != held_out]
        for g in (g for g in groups if g.dataset_key == held_out) if training else ():
            sizes.add(len(variants.intersection(*(x.selectable_variants for x in (*training, g)))))
    if sizes:
        pool[LODO] = f"{min(sizes)}" if len(sizes) == 1 else f"{min(sizes)}-{max(sizes)}"
    return pool


def correlation_summary(result: AnalysisResult, top: int = 5) -> pd.DataFrame:
    """Mean correlations over groups with a bootstrap interval of the mean Spearman: ImageNet accuracy and the
    ``top`` variants by mean Spearman among those scored on every group."""
    table = result.correlations
    if table.empty:
        return pd.DataFrame()
    agg = table.groupby("predictor").agg(n_groups=("spearman", "count"), pearson=("pearson", "mean"),
                                         spearman=("spearman", "mean"), kendall=("kendall", "mean"),
                                         weighted_tau=("weighted_tau", "mean"))
    agg = agg[agg["n_groups"] > 0]
    if agg.empty:
        return pd.DataFrame()
    full = agg[agg["n_groups"] == agg["n_groups"].max()]
    chosen = list(dict.fromkeys([IMAGENET_PREDICTOR] * (IMAGENET_PREDICTOR in agg.index)
                                + list(full.drop(index=IMAGENET_PREDICTOR, errors="ignore")
                                       .sort_values("spearman", ascending=False).index[:top])))
    rows = []
    for name in chosen:
        low, high = bootstrap_interval(table.loc[table["predictor"] == name, "spearman"])
        rows.append({"predictor": name, **agg.loc[name].to_dict(), "spearman_ci_low": low, "spearman_ci_high": high})
    return pd.DataFrame(rows)


def correlation_table(result: AnalysisResult) -> pd.DataFrame:
    """The correlations tabulated as a study reports them: one row per predictor (ImageNet accuracy and the
    variant selected in-sample), model, pretraining scheme and encoder state, one column per dataset, each cell
    the Spearman correlation with mean Dice over the pretraining lengths, and their mean over datasets.

    Every cell rests on the same lengths: the candidate set every group has (``lengths``; where a group has
    length 0 scored and others have not, the correlation would otherwise mix a random encoder into some cells
    only). ``correlations.csv`` has each group over its own lengths. The score is negated (``score_negated``):
    a positive correlation means the score ranks the lengths as Dice does (lower robustness distance, higher Dice)."""
    columns = ["predictor", "score_negated", "model", "pretraining_scheme", "freeze_encoder", "lengths", "mean"]
    chosen = [result.best_variant] if result.best_variant else []
    lengths = result.evidence.lengths if result.evidence is not None else np.array([])
    if not result.groups:
        return pd.DataFrame(columns=columns)
    groups = [] if len(lengths) >= 3 else list(result.groups)  # fewer common lengths: each group's own
    for g in result.groups if len(lengths) >= 3 else []:
        index = [g._index(n) for n in lengths]
        groups.append(replace(g, lengths=g.lengths[index], dice=g.dice[index], dice_by_seed=g.dice_by_seed[index],
                              imagenet_accuracy=g.imagenet_accuracy[index] if len(g.imagenet_accuracy) else
                              g.imagenet_accuracy,
                              scores={v: g.scores[v][index] for v in chosen if v in g.scores}))
    frame = correlations(groups)
    frame = frame[frame["predictor"].isin([IMAGENET_PREDICTOR] + chosen)]
    pivot = frame.pivot_table(index=["predictor", "model", "pretraining_scheme", "freeze_encoder"], columns="dataset",
                              values="spearman", dropna=False)
    pivot["mean"] = pivot.mean(axis=1)
    table = pivot.reset_index().rename_axis(columns=None)
    table.insert(1, "score_negated", table["predictor"] != IMAGENET_PREDICTOR)
    table.insert(5, "lengths", " ".join(f"{n:g}" for n in lengths) if len(lengths) >= 3 else "each group's own")
    order = {name: i for i, name in enumerate([IMAGENET_PREDICTOR] + chosen)}
    return table.sort_values(["predictor", "model", "pretraining_scheme", "freeze_encoder"],
                             key=lambda c: c.map(order) if c.name == "predictor" else c).reset_index(drop=True)
