"""``medxfer analyze``: do transferability scores predict downstream Dice over pretraining lengths, and
how good, and how cheap, is the pretraining length each stop rule picks?

Downstream results (``results.csv``, or a published reference table) and scores (``robustness.csv``,
optionally ``baselines.csv``) are joined per group = (model, dataset, pretraining scheme, frozen encoder)
over the pretraining lengths both have; a model joins the scores of its encoder. Names are mapped to
canonical keys first (:func:`encoder_key`, :func:`dataset_key`, :func:`scheme_key`): built-in defaults
cover the published tables' spellings and medxfer's own; a YAML file (:class:`medxfer.config.NameMapConfig`)
adds or overrides entries.

1. Input integrity (:mod:`medxfer.report.quality`): duplicates, empty values and copied blocks are left out,
   constant variants made ineligible, missing lengths and uneven seeds reported; every finding is listed.
2. Per-group curves (:class:`medxfer.report.rules.GroupCurves`) and every rule evaluated on them
   (:func:`medxfer.report.rules.evaluate_rules`): baselines (always longest, shortest non-zero, uniform
   random, ImageNet accuracy), oracles (bounds), each score variant's argmin and patience rules, and the
   variant selected on data, in-sample and leave-one-dataset-out. Rules are compared on the groups they
   cover, which are named (``all 36 groups``, ``24 of 36 groups (no Swin U-Net)``).
3. Statistics: Pearson, Spearman, Kendall and weighted Kendall tau of each predictor with Dice per group;
   bootstrap intervals over groups; wins/ties/losses against always longest (tie: within the seed noise).
4. The reference study's claims, each with the figure that supports or contradicts it, how many groups and seeds
   it rests on and how sure: held-out replication instead of a winner's-curse count, ImageNet accuracy between
   runs at equal length, paired intervals against always longest (over groups and over pretraining runs).

Parts, imported one way: ``names`` (name mapping) -> ``inputs`` (reading and preparing the tables) ->
``curves`` (per-group curves) -> ``statistics`` -> ``evidence`` (the tables behind the claims) -> ``claims`` (the
recommended rule and the study's claims);
``result`` (:class:`AnalysisResult`) -> ``figures`` -> ``outputs`` (files and printed tables); ``run`` holds
:func:`analyze`.
"""

from medxfer.report.analyze.claims import paper_claims, recommend, recommended_rule_record
from medxfer.report.analyze.curves import build_curves, seeds_text
from medxfer.report.analyze.inputs import (
    DOWNSTREAM_COLUMNS,
    GROUP_COLUMNS,
    SCORE_BLOCK,
    SCORE_COLUMNS,
    prepare_downstream,
    prepare_scores,
)
from medxfer.report.analyze.names import (
    DEFAULT_DATASET_NAMES,
    DEFAULT_ENCODER_NAMES,
    DEFAULT_SCHEME_NAMES,
    dataset_key,
    encoder_key,
    load_names,
    normalize_name,
    scheme_key,
)
from medxfer.report.analyze.outputs import correlation_summary, summary_for_print, write_outputs
from medxfer.report.analyze.figures import write_figures
from medxfer.report.analyze.result import AnalysisResult
from medxfer.report.analyze.run import analyze, input_findings
from medxfer.report.analyze.statistics import (
    IMAGENET_PREDICTOR,
    SINGLE_VARIANT,
    bootstrap_interval,
    correlations,
    coverage_label,
    honest,
    summarize,
)


__all__ = [
    "analyze", "input_findings", "AnalysisResult", "write_outputs", "write_figures", "summary_for_print",
    "correlation_summary", "seeds_text", "build_curves", "prepare_downstream", "prepare_scores",
    "correlations", "bootstrap_interval", "coverage_label", "summarize", "honest", "recommend",
    "recommended_rule_record", "paper_claims", "encoder_key", "dataset_key", "scheme_key", "normalize_name",
    "load_names", "DEFAULT_ENCODER_NAMES", "DEFAULT_DATASET_NAMES", "DEFAULT_SCHEME_NAMES", "DOWNSTREAM_COLUMNS",
    "SCORE_COLUMNS", "GROUP_COLUMNS", "SCORE_BLOCK", "IMAGENET_PREDICTOR", "SINGLE_VARIANT",
]
