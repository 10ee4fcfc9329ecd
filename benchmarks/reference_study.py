"""`medxfer analyze` on the reference study's published tables -> benchmarks/results/reference_study.json.

The tables (Hidy, Bakos, Lukacs, arXiv 2410.18677; its repository's `results/` folder) are not shipped with
medxfer (no licence), so this is not part of `make bench`: give their paths.

    python benchmarks/reference_study.py DOWNSTREAM_CSV ROBUSTNESS_CSV

The JSON holds what the docs quote about them (docs/analyze.md): the inputs (file names, SHA-256, rows), what
the input checks found, the seeds, every rule that is not a single score variant (regret, pretraining saved,
their bootstrap intervals, wins/ties/losses against always longest) also as a markdown table, the
leave-one-dataset-out folds, the claims, the recommended rule, and the CPU time and load of the analysis.
Nothing of the tables themselves is copied.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from medxfer.io import file_sha256  # noqa: E402
from medxfer.report.analyze import analyze  # noqa: E402
from medxfer.report.analyze.curves import seeds_text  # noqa: E402
from medxfer.report.analyze.outputs import correlation_table, percent_text, selection_pool  # noqa: E402

# The 300 single-variant score rules are summarised by the selected ones ("best variant ...").
PER_VARIANT_FAMILY = "score"
# "Settled": no later step larger than this share of the curve's range; several, because the figure depends on it.
SETTLING_TOLERANCES = (0.05, 0.1, 0.2)


def interval(mean: float, low: float, high: float, digits: int, percent: bool = False) -> str:
    if percent:
        text = percent_text(mean)
        return text if abs(high - low) < 0.005 else f"{text} [{low:.0%}, {high:.0%}]"
    text = f"{mean:.{digits}f}"
    return text if abs(high - low) < 10 ** -digits else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def rules_table(summary, pool: dict | None = None) -> str:
    """The rules as a markdown table; a variant selected on data says of how many (``pool``:
    :func:`medxfer.report.analyze.outputs.selection_pool`)."""
    pool = pool or {}
    lines = ["| rule | covers | regret [95% CI] | minus always longest, paired [95% CI over groups; over runs] "
             "| saved [95% CI] | W/T/L vs longest |", "|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        rule = (row.rule.replace("|", "\\|") + (" (uses ImageNet accuracy)" if row.uses_imagenet else "")
                + (f" (best of {pool[row.evaluation]} variants)" if row.family == "score (selected)"
                   and row.evaluation in pool else ""))
        name = f"**{rule} (recommended)**" if row.recommended else rule
        paired = ("-" if row.rule == "always longest" else
                  f"{row.regret_vs_longest_mean:+.4f} [{row.regret_vs_longest_ci_low:+.4f}, "
                  f"{row.regret_vs_longest_ci_high:+.4f}; {row.regret_vs_longest_cluster_ci_low:+.4f}, "
                  f"{row.regret_vs_longest_cluster_ci_high:+.4f}]")
        lines.append(f"| {name} | {row.coverage} | {interval(row.regret_mean, row.regret_ci_low, row.regret_ci_high, 4)}"
                     f" | {paired} | {interval(row.saved_mean, row.saved_ci_low, row.saved_ci_high, 0, percent=True)}"
                     f" | {row.wins}/{row.ties}/{row.losses} |")
    return "\n".join(lines)


def correlation_markdown(table) -> str:
    """correlation_table.csv as a markdown table: a row per predictor, model, scheme and encoder state, a column
    per dataset (Spearman with mean Dice over the lengths every group has; the score negated)."""
    datasets = [c for c in table.columns if c not in ("predictor", "score_negated", "model", "pretraining_scheme",
                                                      "freeze_encoder", "lengths", "mean")]
    lines = ["| predictor | model | scheme | encoder | " + " | ".join(datasets) + " | mean |",
             "|---|---|---|---|" + "---|" * (len(datasets) + 1)]
    for _, row in table.iterrows():  # (not itertuples: a dataset's name need not be an identifier)
        name = f"minus {row['predictor']}" if row["score_negated"] else row["predictor"]
        cells = [f"{row[d]:+.2f}" if row[d] == row[d] else "-" for d in datasets + ["mean"]]
        lines.append(f"| {name} | {row['model']} | {row['pretraining_scheme'] or '-'} | "
                     f"{'frozen' if row['freeze_encoder'] else 'fine-tuned'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_change_share(groups, share: float = 0.9) -> dict:
    """Where the deepest-level score (the stop rules' default variant) has made ``share`` of its largest change
    from the first checkpoint: the length per group, its median and quartiles over groups."""
    import numpy as np

    from medxfer.transferability.stopping import DEFAULT_VARIANT, variant_text

    lengths = []
    for g in groups:
        values = g.stop_curve.score(DEFAULT_VARIANT)
        if values is None:
            continue
        moved = np.abs(values - values[0])
        lengths.append(float(g.lengths[int(np.argmax(moved >= share * max(moved.max(), 1e-12)))]))
    q25, median, q75 = np.percentile(lengths, [25, 50, 75])
    return {"variant": variant_text(DEFAULT_VARIANT), "share": share, "n_groups": len(lengths), "median": median,
            "q25": q25, "q75": q75}


def score_settled(groups, tolerances=SETTLING_TOLERANCES) -> dict:
    """Where the deepest-level score settles (:func:`medxfer.report.analyze.curves.settling_length`: no later
    step between checkpoints larger than the tolerance x the curve's range), lengths >= 1, at each tolerance."""
    from medxfer.report.analyze.curves import score_settling
    from medxfer.transferability.stopping import DEFAULT_VARIANT, variant_text

    return {"variant": variant_text(DEFAULT_VARIANT), "min_length": 1,
            "rule": "the first length after which no step between checkpoints changes the score by more than "
                    "the tolerance x its range over the group's lengths >= 1",
            "by_tolerance": [score_settling(groups, DEFAULT_VARIANT, t, min_length=1) for t in tolerances]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("downstream", type=Path)
    parser.add_argument("robustness", type=Path)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    start = time.process_time()
    result = analyze(args.downstream, args.robustness, figures=False)
    cpu_s = time.process_time() - start
    load_after = os.getloadavg()
    headline = result.summary[result.summary["family"] != PER_VARIANT_FAMILY]
    columns = ["rule", "family", "evaluation", "online", "recommended", "coverage", "n_groups", "regret_mean",
               "regret_ci_low", "regret_ci_high", "saved_mean", "saved_ci_low", "saved_ci_high", "wins", "ties",
               "losses", "regret_vs_longest_mean", "regret_vs_longest_ci_low", "regret_vs_longest_ci_high",
               "regret_vs_longest_cluster_ci_low", "regret_vs_longest_cluster_ci_high", "n_clusters", "uses_imagenet"]
    inputs = {}
    for kind, path in (("downstream", args.downstream), ("robustness", args.robustness)):
        with open(path, encoding="utf-8") as f:
            inputs[kind] = {"file": path.name, "sha256": file_sha256(path), "rows": sum(1 for _ in f) - 1}
    write_result("reference_study", [], {
        "inputs": inputs,
        "findings": dict(Counter(finding.check for finding in result.quality)),
        "n_groups": len(result.groups),
        "seeds": seeds_text(result.groups),
        "recommended": result.recommended,
        "best_variant": result.best_variant,
        "rules": headline[columns].to_dict(orient="records"),
        "table": rules_table(headline, selection_pool(result)),
        "lodo": result.lodo.to_dict(orient="records"),
        "claims": result.claims.to_dict(orient="records"),
        "seed_noise_median": float(statistics.median(g.seed_noise for g in result.groups)),
        "correlation_table": correlation_markdown(correlation_table(result)),
        "correlation_lengths": correlation_table(result)["lengths"].iloc[0],
        "score_settling": score_change_share(result.groups),
        "score_settled": score_settled(result.groups),
        "evidence": {"candidate_lengths": result.evidence.lengths.tolist(), "flat_curve_null": result.evidence.null,
                     "best_of_n": result.evidence.best_of_n,
                     "replication": {"groups": len(result.evidence.replication),
                                     "shorter_chosen": int(result.evidence.replication["shorter_chosen"].sum()),
                                     "replicating": int(result.evidence.replication["replicates"].sum()),
                                     "mean_gain": float(result.evidence.replication["gain"].mean())},
                     "no_pretraining": result.evidence.no_pretraining["outcome"].value_counts().to_dict(),
                     "breakdown_by_dataset": result.evidence.breakdown[
                         result.evidence.breakdown["by"] == "dataset"].to_dict(orient="records")},
        "cpu_s": cpu_s,
        "load": {"before": list(load_before), "after": list(load_after)},
        "notes": [f"medxfer analyze on {inputs['downstream']['file']} ({inputs['downstream']['rows']} rows) and "
                  f"{inputs['robustness']['file']} ({inputs['robustness']['rows']} rows): {len(result.groups)} "
                  f"groups, {seeds_text(result.groups)}; recommended: {result.recommended}; {cpu_s:.0f} s of CPU "
                  f"(load average {load_before[0]:.1f} -> {load_after[0]:.1f})."],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
