"""What the analysis concludes: the recommended rule (chosen by a criterion fixed in advance), its
``recommended_rule.json`` record, and the reference study's claims, each with the figure behind its verdict."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.report.analyze.curves import seeds_text
from medxfer.report.analyze.statistics import IMAGENET_PREDICTOR, bootstrap_interval, honest
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


def paper_claims(summary: pd.DataFrame, decisions: pd.DataFrame, correlation_table: pd.DataFrame,
                 n_groups: int) -> pd.DataFrame:
    """The reference study's abstract, claim by claim, with the figure from these tables."""
    rows = []
    rules = summary.set_index("rule")
    best = decisions[decisions["rule"] == "oracle: best length"]
    if len(best):
        earlier = int((best["dice_vs_longest"] > 0).sum())
        beyond = int((best["vs_longest"] == "win").sum())
        share = beyond / len(best)
        verdict = "supported" if share >= 0.25 else "not supported" if share < 0.10 else "weak"
        if best["seed_noise"].isna().all():
            verdict = "undecided (one seed: no seed noise to compare with)"
        rows.append({"claim": "shorter pretraining is often better downstream",
                     "figure": f"{earlier} of {len(best)} groups peak before the longest length; in {beyond} "
                               "the best length beats the longest by more than the seed noise",
                     "criterion": "supported if >= 25% of groups beat the longest beyond seed noise, "
                                  "not supported if < 10%", "verdict": verdict})
    acc = correlation_table[correlation_table["predictor"] == IMAGENET_PREDICTOR] if len(correlation_table) else []
    if len(acc) and acc["spearman"].notna().any():
        mean = acc["spearman"].mean()
        low, high = bootstrap_interval(acc["spearman"])
        scores = correlation_table[correlation_table["predictor"] != IMAGENET_PREDICTOR]
        by_variant = scores.groupby("predictor")["spearman"].agg(["mean", "count"])
        by_variant = by_variant[by_variant["count"] == by_variant["count"].max()]
        text = (f"mean Spearman of ImageNet accuracy with Dice over lengths {mean:+.2f} "
                f"[95% CI {low:+.2f}, {high:+.2f}] over {acc['spearman'].notna().sum()} groups")
        if len(by_variant):
            top = by_variant["mean"].idxmax()
            text += f"; best score variant {top}: {by_variant.loc[top, 'mean']:+.2f}"
        rows.append({"claim": "ImageNet accuracy is a poor indicator of downstream Dice", "figure": text,
                     "criterion": "supported if the whole interval is below +0.5, contradicted if above",
                     "verdict": "supported" if high < 0.5 else "contradicted" if low > 0.5 else "undecided"})
    longest = rules.loc["always longest"] if "always longest" in rules.index else None
    score_rules = summary[honest(summary) & ~summary["family"].isin(["baseline", "ImageNet", "online stop rule (selected)"])
                          & (summary["n_groups"] == n_groups)]
    if longest is not None and len(score_rules):
        saving = score_rules[score_rules["saved_mean"] >= 0.5]
        pick = (saving if len(saving) else score_rules).sort_values(["regret_mean", "rule"]).iloc[0]
        reached = len(saving) and pick["regret_mean"] <= longest["regret_mean"]
        rows.append({"claim": "the transferability score saves pretraining while keeping Dice",
                     "figure": f"best out-of-sample score rule{' saving >= 50%' if len(saving) else ''} "
                               f"({pick['rule']}): regret {pick['regret_mean']:.4f} at {pick['saved_mean']:.0%} saved "
                               f"vs always longest {longest['regret_mean']:.4f} at 0% (all {n_groups} groups)",
                     "criterion": "supported if an out-of-sample score rule saves >= 50% of pretraining with mean "
                                  "regret no worse than always longest",
                     "verdict": "supported" if reached else "not supported"})
    return pd.DataFrame(rows, columns=["claim", "figure", "criterion", "verdict"])
