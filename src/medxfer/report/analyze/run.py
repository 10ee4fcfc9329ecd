"""The entry point: :func:`analyze` runs every part in order; :func:`input_findings` only the input checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pandas as pd

from medxfer.config import NameMapConfig
from medxfer.errors import ConfigError, DataError
from medxfer.progress import ProgressLog
from medxfer.report.analyze.claims import paper_claims, recommend, recommended_rule_record
from medxfer.report.analyze.curves import build_curves, seeds_text
from medxfer.report.analyze.evidence import gather_evidence
from medxfer.report.analyze.inputs import _read_table, prepare_downstream, prepare_scores
from medxfer.report.analyze.names import load_names
from medxfer.report.analyze.outputs import write_outputs
from medxfer.report.analyze.result import AnalysisResult
from medxfer.report.analyze.statistics import SINGLE_VARIANT, correlations, summarize
from medxfer.report.quality import Finding
from medxfer.report.rules import IN_SAMPLE, Rule, builtin_rules, evaluate_rules, score_rule, stop_rule_families


def analyze(downstream: pd.DataFrame | str | Path, robustness: pd.DataFrame | str | Path | None, *,
            baselines: pd.DataFrame | str | Path | None = None,
            names: NameMapConfig | Mapping[str, Any] | str | Path | None = None,
            patience: Sequence[int] = (1,), test_set: Optional[str] = "target", keep_copies: bool = False,
            extra_rules: Sequence[Rule] = (), recommended: Optional[str] = None, n_resamples: int = 2000,
            min_saved: float = 0.5,
            out_dir: str | Path | None = None, figures: bool = True) -> AnalysisResult:
    """Check the inputs, build per-group curves, evaluate every rule, relate scores to Dice, check the
    paper's claims (see the module docstring).

    ``extra_rules`` are evaluated with the built-in ones and the online stop-rule families
    (:func:`medxfer.report.rules.stop_rule_families`); ``recommended`` names the rule marked recommended in
    ``decisions.csv`` (default: :func:`recommend` with the saving target ``min_saved``); when it is an online
    rule, ``recommended_rule.json`` holds its parameters for ``medxfer score`` and the pretraining callback. ``out_dir``: writes
    ``decisions.csv``, ``analysis_summary.csv``, ``correlations.csv``, ``claims.csv``,
    ``data_quality.csv``, ``lodo.csv`` and (``figures``) ``figures/*.png``.
    """
    names = load_names(names)
    stages = ProgressLog("analyze")  # plain lines off a terminal: a large table takes a minute
    down_table, down_source = _read_table(downstream, "downstream")
    robust_table, robust_source = (None, "<robustness>") if robustness is None else _read_table(robustness, "robustness")
    base_table, base_source = (None, "<baselines>") if baselines is None else _read_table(baselines, "baselines")
    down, found = prepare_downstream(down_table, names, down_source, test_set, keep_copies)
    scores, score_found = prepare_scores(robust_table, base_table, names, (robust_source, base_source), keep_copies)
    stages.note(f"read {len(down)} downstream and {len(scores)} score rows")
    groups, curve_found = build_curves(down, scores, down_source)
    quality = found + score_found + curve_found
    variants = sorted({v for g in groups for v in g.scores})
    robustness_variants = sorted(set(scores.loc[scores["family"] == "robustness", "variant"]))
    rules = builtin_rules(robustness_variants or variants, patience) + [
        Rule(f"{v} | argmin", score_rule(v), "baseline estimator", variant=v)
        for v in variants if v not in robustness_variants] + stop_rule_families(min_saved) + list(extra_rules)
    stages.note(f"{len(groups)} groups, {len(variants)} score variants: evaluating {len(rules)} rules")
    decisions = evaluate_rules(groups, rules, progress=ProgressLog("analyze: rules", len(rules)))
    stages.note("correlations and bootstrap intervals")
    correlation_table = correlations(groups)
    summary = summarize(decisions, groups, rules, correlation_table, n_resamples)
    if recommended is None:
        recommended = recommend(summary, len(groups), min_saved)
    elif recommended not in set(summary["rule"]):
        raise ConfigError(f"analyze: recommended rule {recommended!r} was not evaluated")
    decisions["recommended"] = decisions["rule"] == recommended
    summary.insert(1, "recommended", summary["rule"] == recommended)
    selected = decisions[decisions["rule"] == f"best variant | argmin [{IN_SAMPLE}]"]
    best_variant = str(selected["detail"].iloc[0]) if len(selected) else None
    headline = summary.loc[~summary["family"].isin(SINGLE_VARIANT), "rule"].tolist()
    stages.note("the study's claims")
    evidence = gather_evidence(groups, decisions, down, robustness_variants or variants, headline, n_resamples)
    claims = paper_claims(summary, decisions, correlation_table, len(groups), evidence, recommended,
                          seeds_text(groups))
    result = AnalysisResult(summary, decisions, correlation_table, claims, quality, groups, recommended, best_variant,
                            recommended_rule=recommended_rule_record(summary, recommended, rules, groups, min_saved),
                            evidence=evidence)
    if out_dir is not None:
        result.paths = write_outputs(result, Path(out_dir), figures=figures)
    return result


def input_findings(downstream: pd.DataFrame, robustness: Optional[pd.DataFrame],
                   names: NameMapConfig | Mapping[str, Any] | str | Path | None = None) -> list[Finding]:
    """The data-quality findings of :func:`analyze` alone (for the report): what is wrong with the two
    tables and what analyze does about it; a table analyze cannot use at all is one finding."""
    names = load_names(names)
    found: list[Finding] = []
    try:
        down, down_found = prepare_downstream(downstream, names, "results")
        found += down_found
        if robustness is None:
            return found
        scores, score_found = prepare_scores(robustness, None, names, ("robustness.csv", "<baselines>"))
        found += score_found
        found += build_curves(down, scores, "results")[1]
    except (DataError, ConfigError) as exc:
        found.append(Finding("not analysable", "results / robustness.csv", "", "nothing analysed", str(exc)))
    return found
