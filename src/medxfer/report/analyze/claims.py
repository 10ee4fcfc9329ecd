"""What the analysis concludes: the recommended rule (chosen by a criterion fixed in advance), its
``recommended_rule.json`` record, and the reference study's claims, each with the figure behind its verdict."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.report.analyze.curves import seeds_text
from medxfer.report.analyze.evidence import Evidence
from medxfer.report.analyze.statistics import (
    IMAGENET_PREDICTOR,
    bootstrap_interval,
    cluster_bootstrap_interval,
    honest,
)
from medxfer.report.rules import GroupCurves, Rule, fitted_stop_rule


def recommend(summary: pd.DataFrame, n_groups: int, min_saved: float = 0.5) -> Optional[str]:
    """The rule ``medxfer score`` and the pretraining callback will apply, chosen by a criterion fixed before
    any figure was seen (issue #15's goal): among :func:`honest` online stop rules that cover every group and
    save at least ``min_saved`` of pretraining on average, the lowest mean regret (ties: more saved, then the
    earlier rule); if none saves that much, the honest rule covering every group with the lowest regret."""
    covering = summary[honest(summary) & (summary["n_groups"] == n_groups)]
    saving = covering[covering["online"] & (covering["saved_mean"] >= min_saved - 1e-12)]
    candidates = saving if len(saving) else covering
    if candidates.empty:
        return None
    ordered = candidates.assign(_saved=-candidates["saved_mean"], _order=range(len(candidates)))
    return str(ordered.sort_values(["regret_mean", "_saved", "_order"])["rule"].iloc[0])


def recommended_rule_record(result_summary: pd.DataFrame, recommended: Optional[str], rules: Sequence[Rule],
                            groups: Sequence[GroupCurves], min_saved: float) -> Optional[dict[str, Any]]:
    """What ``recommended_rule.json`` holds: the online rule's parameters (a learned rule fitted on every
    group: what a user's run applies) and the figures it was recommended on."""
    if recommended is None:
        return None
    base = recommended.rsplit(" [", 1)[0]
    rule = next((r for r in rules if r.name == base), None)
    stop_rule = fitted_stop_rule(rule, groups) if rule is not None else None
    if stop_rule is None:
        return None
    row = result_summary[result_summary["rule"] == recommended].iloc[0]
    figures = {k: (float(row[k]) if isinstance(row[k], (float, np.floating)) else row[k])
               for k in ("coverage", "n_groups", "regret_mean", "regret_ci_low", "regret_ci_high", "saved_mean",
                         "saved_ci_low", "saved_ci_high", "wins", "ties", "losses")}
    longest = result_summary[result_summary["rule"] == "always longest"]
    return {"rule": recommended, "stop_rule": stop_rule.as_dict(), "evaluation": row["evaluation"],
            "criterion": f"lowest out-of-sample mean regret among online rules saving >= {min_saved:.0%}",
            "figures": {**{k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in figures.items()},
                        "always_longest_regret": float(longest["regret_mean"].iloc[0]) if len(longest) else None},
            "goal_met": bool(len(longest) and row["saved_mean"] >= min_saved
                             and row["regret_mean"] <= float(longest["regret_mean"].iloc[0])),
            "groups": seeds_text(groups)}


def _interval(low: float, high: float, digits: int = 4) -> str:
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _paired(row: pd.Series) -> str:
    """``+0.0029 [95% CI +0.0012, +0.0047] over groups, [...] over 6 pretraining runs``."""
    return (f"{row['regret_vs_longest_mean']:+.4f} Dice regret [95% CI "
            f"{row['regret_vs_longest_ci_low']:+.4f}, {row['regret_vs_longest_ci_high']:+.4f}] over groups, "
            f"{_interval(row['regret_vs_longest_cluster_ci_low'], row['regret_vs_longest_cluster_ci_high'])} over "
            f"{int(row['n_clusters'])} pretraining runs")


def _lengths(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def paper_claims(summary: pd.DataFrame, decisions: pd.DataFrame, correlation_table: pd.DataFrame,
                 n_groups: int, evidence: Optional[Evidence] = None, recommended: Optional[str] = None,
                 n_seeds: str = "") -> pd.DataFrame:
    """The reference study's abstract, claim by claim, with the figure from these tables: the verdict, how many
    groups and seeds it rests on, and how sure (intervals over groups and over pretraining runs)."""
    rows = []
    rules = summary.set_index("rule")
    seeds = f", {n_seeds}" if n_seeds else ""
    best = decisions[decisions["rule"] == "oracle: best length"]
    replication = evidence.replication if evidence is not None else pd.DataFrame()
    if len(best) and len(replication):
        earlier = int((best["dice_vs_longest"] > 0).sum())
        beyond = int((best["vs_longest"] == "win").sum())
        gain = replication["gain"]
        low, high = bootstrap_interval(gain)
        cluster_low, cluster_high = cluster_bootstrap_interval(gain, replication["cluster"])
        tally = pd.Series(" ".join(replication["gain_lengths"]).split()).astype(float).value_counts().sort_index()
        null = evidence.null
        verdict = ("supported" if cluster_low > 0 else "contradicted" if cluster_high < 0
                   else "not supported (the held-out gain's interval holds 0)")
        if verdict == "supported":
            verdict += f": a real but small gain of {gain.mean():+.4f} Dice"
        rows.append({"claim": "shorter pretraining is often better downstream",
                     "figure": f"held out{seeds}: the best length chosen on the other seeds, judged on the held-out "
                               f"seed (each seed in turn), candidate lengths {_lengths(evidence.lengths)} in every "
                               f"group: a shorter length is chosen in {int(replication['shorter_chosen'].sum())} of "
                               f"{len(replication)} groups and replicates (positive held-out gain) in "
                               f"{int(replication['replicates'].sum())}; mean held-out gain over the longest "
                               f"{gain.mean():+.4f} Dice [95% CI {low:+.4f}, {high:+.4f}] over groups, "
                               f"{_interval(cluster_low, cluster_high)} over {replication['cluster'].nunique()} "
                               f"pretraining runs; the gains are at lengths "
                               + (", ".join(f"{n:g} ({c}x)" for n, c in tally.items()) or "none")
                               + f". Flat-curve null ({null['n_simulations']} simulations, each group's own seed "
                               f"s.d.): {null['peak_before_longest']:.0f} groups would peak before the longest and "
                               f"{null['beats_by_one_sd']:.0f} beat it by more than one seed s.d. (these tables: "
                               f"{earlier} and {beyond}, so those counts are what noise gives); held-out gain under "
                               f"the null {null['mean_gain']:+.4f} (95th percentile {null['mean_gain_p95']:+.4f})",
                     "criterion": "held-out replication: supported if the mean held-out gain's 95% interval over "
                                  "pretraining runs is above 0, contradicted if below",
                     "verdict": verdict})
    elif len(best):
        rows.append({"claim": "shorter pretraining is often better downstream",
                     "figure": f"{int((best['dice_vs_longest'] > 0).sum())} of {len(best)} groups peak before the "
                               "longest length, on one seed: no seed to hold out, no seed noise to compare with",
                     "criterion": "held-out replication needs at least two seeds",
                     "verdict": "undecided (one seed)"})
    acc = correlation_table[correlation_table["predictor"] == IMAGENET_PREDICTOR] if len(correlation_table) else []
    cells = evidence.between_runs if evidence is not None else pd.DataFrame()
    if len(cells) and cells["spearman_accuracy"].notna().any():
        texts, lows = [], {}
        for label, part in (("all lengths", cells), ("lengths >= 50", cells[cells["length"] >= 50])):
            part = part.dropna(subset=["spearman_accuracy"])
            if part.empty:
                continue
            a_low, a_high = bootstrap_interval(part["spearman_accuracy"])
            text = (f"{label} ({len(part)} cells): accuracy {part['spearman_accuracy'].mean():+.2f} "
                    f"{_interval(a_low, a_high, 2)}")
            scored = part.dropna(subset=["spearman_score"])
            if len(scored):
                difference = scored["spearman_accuracy"] - scored["spearman_score"]
                s_low, s_high = bootstrap_interval(scored["spearman_score"])
                d_low, d_high = bootstrap_interval(difference)
                text += (f", score {scored['spearman_score'].mean():+.2f} {_interval(s_low, s_high, 2)}"
                         f" ({len(scored)} cells), accuracy minus score {difference.mean():+.2f} "
                         f"{_interval(d_low, d_high, 2)}")
            texts.append(text)
            lows[label] = a_low
        text = ("between runs (models x pretraining schemes at equal length, per dataset and encoder state; mean "
                f"Spearman with Dice [95% CI over cells], score = {cells['score_variant'].iloc[0]}): " + "; ".join(texts))
        if len(acc) and acc["spearman"].notna().any():
            rising = evidence.rising_accuracy
            low, high = bootstrap_interval(acc["spearman"])
            scores = correlation_table[correlation_table["predictor"] != IMAGENET_PREDICTOR]
            by_variant = scores.groupby("predictor")["spearman"].agg(["mean", "count"])
            by_variant = by_variant[by_variant["count"] == by_variant["count"].max()]
            text += (f". Within runs, accuracy rises with length in {rising} of {acc['spearman'].notna().sum()} groups, "
                     f"so its within-group Spearman ({acc['spearman'].mean():+.2f} [95% CI {low:+.2f}, {high:+.2f}]) "
                     "is that of the length itself")
            if len(by_variant):
                top = by_variant["mean"].idxmax()
                text += (f"; the best score variant picked in-sample (best of {len(by_variant)}: {top}) reaches "
                         f"{by_variant.loc[top, 'mean']:+.2f}, so accuracy, i.e. length, predicts Dice better")
        ranks = [low > 0 for low in lows.values() if not math.isnan(low)]
        verdict = ("undecided (too few cells)" if not ranks
                   else "not supported: between runs accuracy ranks runs of equal length" if all(ranks)
                   else "supported: between runs accuracy does not rank runs of equal length" if not any(ranks)
                   else "mixed: between runs accuracy does not rank runs of equal length over all lengths, but "
                        "weakly does at " + ", ".join(k for k, v in lows.items() if v > 0))
        rows.append({"claim": "ImageNet accuracy is a poor indicator of downstream Dice", "figure": text,
                     "criterion": "between runs at equal length (where accuracy is not the length): supported if the "
                                  "mean Spearman of accuracy with Dice has a 95% interval holding 0 or below it, at all "
                                  "lengths and at lengths >= 50; mixed if only one does",
                     "verdict": verdict})
    longest = rules.loc["always longest"] if "always longest" in rules.index else None
    out_of_sample = summary[honest(summary) & ~summary["family"].isin(["baseline", "baseline (matched saving)",
                                                                       "ImageNet"])
                            & (summary["n_groups"] == n_groups)]
    if longest is not None and len(out_of_sample):
        saving = out_of_sample[out_of_sample["saved_mean"] >= 0.5 - 1e-12]
        target_only = saving[~saving["uses_imagenet"]]
        pick = (saving if len(saving) else out_of_sample).sort_values(["regret_mean", "rule"]).iloc[0]
        text = (f"best out-of-sample rule saving >= 50% ({pick['rule']}"
                + (", uses ImageNet accuracy as an input" if pick["uses_imagenet"] else "")
                + f"): regret {pick['regret_mean']:.4f} at {pick['saved_mean']:.0%} saved, paired against always "
                f"longest {_paired(pick)}")
        reached = False
        if len(target_only):
            own = target_only.sort_values(["regret_mean", "rule"]).iloc[0]
            reached = bool(own["regret_vs_longest_cluster_ci_low"] <= 0)
            if own["rule"] != pick["rule"]:
                text += (f"; best using the target data alone ({own['rule']}): regret {own['regret_mean']:.4f} at "
                         f"{own['saved_mean']:.0%} saved, {_paired(own)}")
        else:
            text += "; no rule using the target data alone saves >= 50%"
        rows.append({"claim": "the transferability score saves pretraining while keeping Dice",
                     "figure": f"{text} (all {n_groups} groups{seeds})",
                     "criterion": "supported if an out-of-sample rule that uses the target data alone saves >= 50% of "
                                  "pretraining and its paired regret against always longest is not above 0 (95% "
                                  "interval over pretraining runs holds 0 or lies below)",
                     "verdict": "supported" if reached else "not supported"})
    if recommended is not None and recommended in rules.index and longest is not None:
        row = rules.loc[recommended].copy()
        row["rule"] = recommended
        worse = row["regret_vs_longest_cluster_ci_low"] > 0 and row["regret_vs_longest_ci_low"] > 0
        rows.append({"claim": "the recommended rule keeps Dice (against always longest, paired)",
                     "figure": f"{recommended}" + (" (uses ImageNet accuracy)" if row["uses_imagenet"] else "")
                               + f": {_paired(row)}, at {row['saved_mean']:.0%} of pretraining saved",
                     "criterion": "paired on the same groups: worse if both 95% intervals (over groups, over pretraining "
                                  "runs) lie above 0",
                     "verdict": "significantly worse than always longest" if worse else "not significantly worse"})
    if evidence is not None and np.isfinite(evidence.best_of_n.get("observed", math.nan)):
        b = evidence.best_of_n
        rows.append({"claim": "the best single score variant predicts the best length better than chance",
                     "figure": f"best of {b['n_variants']} variants' argmin rules (scored on every group): mean regret "
                               f"{b['observed']:.4f}; the best of {b['n_variants']} when each group's lengths are "
                               f"shuffled under its scores: {b['null_mean']:.4f} on average (5th percentile "
                               f"{b['null_p5']:.4f}), permutation p = {b['p_value']:.3f}",
                     "criterion": "supported if p < 0.05 (best of N compared with the best of N under the null)",
                     "verdict": "supported" if b["p_value"] < 0.05 else "not supported"})
    zero = evidence.no_pretraining if evidence is not None else pd.DataFrame()
    if len(zero):
        counts = zero["outcome"].value_counts()
        highest = zero[zero["dice_at_0_minus_best"] > 0]
        examples = "; ".join(f"{r.model} | {r.dataset} | {'frozen' if r.freeze_encoder else 'fine-tuned'}: "
                             f"{r.dice_at_0:.4f} at 0 vs {r.best_pretrained_dice:.4f} at {r.best_pretrained_length:g}"
                             for r in highest.itertuples())
        better = int(counts.get("pretraining better", 0))
        rows.append({"claim": "ImageNet pretraining helps downstream (against no pretraining)",
                     "figure": f"{len(zero)} groups have Dice at length 0 (their scores are copies or missing and left "
                               f"out of the score analysis); against each one's best pretrained length (candidate "
                               f"lengths {_lengths(evidence.lengths[evidence.lengths > 0])}): pretraining better by more "
                               f"than the seed noise in {better}, higher within the noise in "
                               f"{int(counts.get('pretraining highest, within seed noise', 0))}; no pretraining higher "
                               f"within the noise in {int(counts.get('no pretraining highest, within seed noise', 0))}, "
                               f"better beyond it in {int(counts.get('no pretraining better', 0))}"
                               + (f"; no pretraining has the highest mean Dice in: {examples}" if examples else ""),
                     "criterion": "per group, the difference against the group's seed noise; supported if pretraining "
                                  "is better beyond the noise in most groups",
                     "verdict": "supported" if better > len(zero) / 2 else "mixed"})
    return pd.DataFrame(rows, columns=["claim", "figure", "criterion", "verdict"])

