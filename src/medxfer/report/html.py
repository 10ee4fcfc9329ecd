"""``write_report(results_dir)``: one self-contained HTML file (figures embedded as base64 PNG) plus the
PNGs and CSV tables, all in ``RESULTS_DIR/report/`` and all written atomically.

It opens with the main finding in one sentence derived from the data, shows every figure whose data
exist and lists the others with the reason they were skipped.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.errors import DataError
from medxfer.io import atomic_write_bytes, atomic_write_text
from medxfer.progress import ProgressLog
from medxfer.report import plots
from medxfer.report.overlays import plot_overlay_grid
from medxfer.report.plots import SkipFigure, png_bytes, score_dice_correlations, score_dice_pairs
from medxfer.report.tables import (
    ABSENT_CLASS_RULE,
    ARM_COLUMNS,
    CONTEXT_COLUMNS,
    MIN_INTERVAL_SEEDS,
    NOT_CONVERGED_NOTE,
    VALUE,
    WILCOXON_MIN_PAIRS,
    arm_label,
    convergence_note,
    deepest_level,
    default_variant,
    downstream_table,
    forgetting_table,
    load_robustness,
    no_interval_text,
    paired_comparison,
    per_class_table,
    repeated_seeds,
    summary_table,
)
from medxfer.records import SOURCE_BEFORE, iter_records, write_csv
from medxfer.training.convergence import CONVERGENCE_TOLERANCE

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "report.html"
ROBUSTNESS_FILE = "robustness.csv"
SUMMARY_CSV = "summary_mean_sd.csv"
PAIRED_CSV = "paired_comparison.csv"
CORRELATION_CSV = "score_dice_correlation.csv"
ANSWER_CSV = "study_answer.csv"
FORGETTING_CSV = "forgetting.csv"
PER_CLASS_CSV = "per_class.csv"

STRATEGY_PHRASES = {
    "full": "Fine-tuning from the pretrained encoder",
    "frozen_encoder": "Training a decoder on the frozen pretrained encoder",
    "partial": "Fine-tuning with the first pretrained encoder levels frozen",
    "discriminative": "Fine-tuning the pretrained encoder at a lower learning rate",
}


# ------------------------------------------------------------------------------------------ findings
def _length_text(length: Any) -> str:
    if length is None or (isinstance(length, float) and math.isnan(length)):
        return ""
    return f" (pretraining length {float(length):g})"


def _arm_text(strategy: Any, length: Any, scheme: Any) -> str:
    text = STRATEGY_PHRASES.get(strategy, f"Strategy {strategy}") + _length_text(length)
    if length is not None and not (isinstance(length, float) and math.isnan(length)) and float(length) == 0:
        text = text[:-1] + ": a random, untrained encoder)"
    return text + (f" ({scheme})" if scheme else "")


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """t interval of the mean paired difference (scipy); NaN with fewer than ``MIN_INTERVAL_SEEDS`` pairs."""
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    if len(values) < MIN_INTERVAL_SEEDS:
        return math.nan, math.nan
    if np.ptp(values) == 0:  # no spread: the interval is the value (scipy would give NaN)
        return float(values[0]), float(values[0])
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(confidence_level=confidence)
    return float(interval.low), float(interval.high)


def scratch_finding(table: pd.DataFrame) -> Optional[str]:
    """Pretrained starting points against training from scratch, like with like: one dataset (its name and
    label set), one model, one number of target images (the fewest where both were run), paired by seed.

    It states the seeds and the 95% interval of the paired difference, says "within seed noise" when the
    interval holds 0, says first when there is one seed (no interval), and, when several set-ups were
    compared, that the one named is the best of k (its lead is biased upward by the choice)."""
    target = table[(table["test set"] == "target") & table[VALUE].notna()]
    keys = [c for c in ("dataset", "n classes", "class names", "model", "n train images") if c in target.columns]
    contexts = []
    for key, group in target.groupby(keys, sort=True, dropna=False):
        context = dict(zip(keys, key))
        scratch = group[group["strategy"] == "scratch"].groupby("seed")[VALUE].mean()
        if scratch.empty:
            continue
        arms = []
        arm_keys = ["strategy", "pretraining length", "pretraining scheme"]
        for arm_key, arm in group[group["strategy"] != "scratch"].groupby(arm_keys, dropna=False, sort=True):
            seeds = arm.groupby("seed")[VALUE].mean()
            common = seeds.index.intersection(scratch.index)
            if len(common):
                arms.append((arm_key, seeds[common] - scratch[common], float(seeds[common].mean()),
                             float(scratch[common].mean())))
        if arms:
            contexts.append((float(context["n train images"]), -max(len(a[1]) for a in arms), str(key), context, arms))
    if not contexts:
        return None
    _, _, _, context, arms = min(contexts, key=lambda c: c[:3])
    (strategy, length, scheme), differences, arm_mean, scratch_mean = max(
        arms, key=lambda a: (float(a[1].mean()), -len(str(a[0]))))
    n_seeds, k = len(differences), len(arms)
    difference = float(differences.mean())
    low, high = paired_interval(differences)
    where = (f"{context['dataset']}, {context['model']}, {context['n train images']:g} target images, "
             f"{n_seeds} seed{'s' if n_seeds != 1 else ''}; mean Dice {arm_mean:.3f} vs {scratch_mean:.3f}")
    subject = _arm_text(strategy, length, scheme)
    if k > 1:
        beyond = sum(1 for _, d, _, _ in arms if len(d) >= MIN_INTERVAL_SEEDS and paired_interval(d)[0] > 0)
        subject = f"Best of {k} pretrained set-ups compared with scratch (chosen for its lead, so it overstates it): {subject}"
    if n_seeds < 2:
        return (f"One seed only, so seed noise is unknown and no difference below it can be told apart. "
                f"{subject} differs from training from scratch by {difference:+.3f} Dice ({where}).")
    if n_seeds < MIN_INTERVAL_SEEDS:  # a 2-seed t-interval runs past +-1: none is given
        return (f"{subject} differs from training from scratch by {difference:+.3f} Dice ({where}, paired by "
                f"seed); {no_interval_text(n_seeds)}, too few to tell it from seed noise.")
    interval = f"[95% CI {low:+.3f}, {high:+.3f}]"
    if low <= 0 <= high:
        verdict = f"is within seed noise of training from scratch: {difference:+.3f} Dice {interval}"
    else:
        verdict = (f"{'beats' if difference > 0 else 'falls short of'} training from scratch by {difference:+.3f} "
                   f"Dice {interval}")
    text = f"{subject} {verdict} ({where}, paired by seed)."
    if k > 1:
        text += f" {beyond} of the {k} set-ups beat scratch beyond seed noise."
    return text


def transferability_finding(table: pd.DataFrame, robustness: Optional[pd.DataFrame]) -> Optional[str]:
    """Best pretraining length downstream and how well the score ranks lengths (Spearman)."""
    pairs = score_dice_pairs(table, robustness)
    if not pairs.empty:
        correlations = score_dice_correlations(pairs)
        correlations["is_full"] = correlations["strategy"] == "full"
        chosen = correlations.sort_values(["n lengths", "is_full", "n train images"],
                                          ascending=[False, False, True]).iloc[0]
        group = pairs[(pairs["dataset"] == chosen["dataset"]) & (pairs["model"] == chosen["model"])
                      & (pairs["strategy"] == chosen["strategy"])
                      & (pairs["n train images"] == chosen["n train images"])]
        top = group.sort_values("dice mean", ascending=False).iloc[0]
        rho = chosen["spearman rho"]
        rho_text = (f"the robustness score ranks the {int(chosen['n lengths'])} lengths with Spearman "
                    f"rho = {rho:+.2f} against downstream Dice" if not math.isnan(rho)
                    else "too few pretraining lengths for a rank correlation")
        return (f"The best pretraining length is {top['pretraining length']:g} (mean Dice {top['dice mean']:.3f}, "
                f"{chosen['strategy']}, {chosen['n train images']:g} images, {chosen['dataset']}); {rho_text}.")
    if robustness is not None and not robustness.empty:
        variant = deepest_level(default_variant(robustness)[0]).dropna(subset=["robustness"])
        if not variant.empty:
            top = variant.sort_values("robustness", ascending=False).iloc[0]
            return (f"The robustness score (deepest level) peaks at pretraining length "
                    f"{top['pretraining_length']:g} ({top['dataset']}, {top['encoder'] or 'encoder'}); "
                    "no matching downstream runs to compare it with.")
    return None


def best_configuration_finding(table: pd.DataFrame) -> Optional[str]:
    summary = summary_table(table[table["test set"] == "target"])
    if summary.empty:
        return None
    top = summary.sort_values(f"{VALUE} mean", ascending=False).iloc[0]
    return (f"The best configuration is {arm_label(top['strategy'], top['pretraining length'], top['pretraining scheme'])}"
            f" with {top['n train images']:g} target images on {top['dataset']} ({top['model']}): Dice "
            f"{top[f'{VALUE} mean ± sd']} over {top['n seeds']} seed(s).")


def findings(table: pd.DataFrame, robustness: Optional[pd.DataFrame]) -> list[str]:
    """The report's opening sentences, the main finding first."""
    found = [scratch_finding(table) if not table.empty else None, transferability_finding(table, robustness)]
    found = [f for f in found if f]
    if not found and not table.empty:
        found = [best_configuration_finding(table)]
    return [f for f in found if f] or ["No downstream result or robustness score to summarise."]


# --------------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;line-height:1.4}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.finding{font-size:1.15em;background:#f3f7fb;border-left:4px solid #1f77b4;padding:.6em 1em}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0;display:block;max-width:100%;overflow-x:auto} th,td{border:1px solid #ccc;padding:.2em .5em}
th{background:#f0f0f0} td{text-align:right;white-space:nowrap} h3{font-size:1.05em} .note{font-size:.9em;color:#555}
"""

FIGURE_CAPTIONS = {
    "dice_vs_pretraining_length": ("Downstream Dice vs pretraining length (mean ± sd over seeds). Scratch is the "
                                   "length-0 point of full fine-tuning, and a grey dashed line in frozen-encoder "
                                   "panels (a frozen random encoder is not scratch); starting points without a "
                                   "length (imported ImageNet weights) are dashed horizontal lines."),
    "transferability_vs_pretraining_length": "Robustness score vs pretraining length.",
    "score_vs_dice": ("Robustness score (deepest level; lower = more robust) vs mean downstream Dice (scratch runs "
                      "count as full fine-tuning at length 0); each line joins one set-up's checkpoints in "
                      "pretraining-length order (point labels); legend: Spearman rank correlation."),
    "dice_vs_n_images": ("Data-scarcity curve: Dice vs number of target training images (mean ± sd over seeds); "
                         "scratch (black, dashed) in every panel."),
    "per_class_dice_vs_n_images": ("Per-class data-scarcity curves: each class's Dice vs number of target training "
                                   "images (mean ± sd over seeds; scratch black, dashed). A class mean can fall "
                                   "while a class rises: a class absent from many test images can drive it."),
    "source_vs_target": ("What is kept of the source task: source-test vs target-test Dice after fine-tuning; "
                         "the dotted line is the starting model's own source-test Dice before fine-tuning "
                         "(the forgetting baseline), where its weights carried a head for the source's classes."),
    "overlays": "Image, ground truth and the predictions of chosen runs (contours coloured per class).",
    "learning_curves": ("Learning curves: validation headline Dice per seed against the optimizer step (left axis) "
                        "and training loss per logged step (thin lines, right axis), one panel per dataset, starting "
                        "point and number of training images. A red cross ends a run that had not converged (its "
                        "best validation Dice in the last quarter of the steps beat the best before by more than "
                        f"{CONVERGENCE_TOLERANCE:g})."),
}


def _fmt(value: Any, whole: bool = False) -> str:
    """A table cell: ``whole`` columns (every value a whole number: lengths, counts) as integers, other floats
    with 3 decimals (3 significant digits below 0.01), NaN as n/a."""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):  # e.g. Cohen's d_z of a constant difference
            return "inf" if value > 0 else "-inf"
        if whole:
            return str(int(value))
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.3f}"
    return html.escape(str(value))


def _whole_column(values: pd.Series) -> bool:
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return (pd.api.types.is_numeric_dtype(values) and not numbers.empty
            and bool((numbers == numbers.round()).all()))


def table_html(table: pd.DataFrame, columns: Optional[Sequence[str]] = None) -> str:
    if table.empty:
        return "<p class='note'>no rows</p>"
    columns = [c for c in (columns or table.columns) if c in table.columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    whole = {c: _whole_column(table[c]) for c in columns}
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row[c], whole[c])}</td>" for c in columns) + "</tr>"
                   for _, row in table.iterrows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def compact(table: pd.DataFrame, keep: Sequence[str] = ()) -> tuple[pd.DataFrame, str]:
    """A table to read on a page: strategy / pretraining length / scheme become one ``starting point``
    column, columns with one value on every row (besides ``keep``) leave the table for the caption, which
    returns them as ``column: value; ...``, and the label-set columns and test statistics stay in the CSV."""
    if table.empty:
        return table, ""
    # the dataset's name already names its label set (records name label sets apart); the CSV keeps them all
    frame = table.drop(columns=[c for c in ("n classes", "class names", "statistic") if c in table.columns])
    if {"effect size", "effect size measure"} <= set(frame.columns):  # one cell: "d_z 2.538", "r 0.400"
        short = {"Cohen's d_z": "d_z", "rank-biserial r": "r"}
        frame["effect size"] = [f"{short.get(m, m)} {_fmt(v)}".strip() if m else _fmt(v)
                                for v, m in zip(frame["effect size"], frame["effect size measure"])]
        frame = frame.drop(columns=["effect size measure"])
    if set(ARM_COLUMNS) <= set(frame.columns):
        labels = [arm_label(*row) for row in frame[ARM_COLUMNS].itertuples(index=False, name=None)]
        position = list(frame.columns).index(ARM_COLUMNS[0])
        frame = frame.drop(columns=[*ARM_COLUMNS, *(["freeze encoder"] if "freeze encoder" in frame.columns else [])])
        frame.insert(min(position, len(frame.columns)), "starting point", labels)
    constant = [c for c in frame.columns if c not in keep and len(frame) > 1
                and frame[c].astype(str).nunique(dropna=False) == 1]
    if len(frame) == 1:  # one row: the context columns say it all in the caption
        constant = [c for c in frame.columns if c in CONTEXT_COLUMNS and c not in keep]
    caption = "; ".join(f"{c}: {_fmt(frame[c].iloc[0], _whole_column(frame[c]))}" for c in constant)
    return frame.drop(columns=constant), caption


def _with_caption(note: str, caption: str) -> str:
    return note + (f" Same on every row: {html.escape(caption)}." if caption else "")


def _distance_unit(records: list[dict]) -> str:
    """The unit the records' distances are in (their provenance), for the per-class table's caption."""
    units = {((test.get("provenance") or {}).get("hd95") or {}).get("unit")
             for record in records for test in (record.get("metrics") or {}).values()} - {None}
    return " / ".join(sorted(units)) or "pixels unless the data has a spacing"


def _figure_jobs(results_dir: Path, records: list[dict], table: pd.DataFrame,
                 robustness: Optional[pd.DataFrame], overlay_runs: Optional[Sequence[str]],
                 overlay_cases: int) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("dice_vs_pretraining_length", lambda: plots.plot_dice_vs_pretraining_length(table)),
        ("transferability_vs_pretraining_length", lambda: plots.plot_transferability_vs_length(robustness, table)),
        ("score_vs_dice", lambda: plots.plot_score_vs_dice(table, robustness)),
        ("dice_vs_n_images", lambda: plots.plot_dice_vs_n_images(table)),
        ("per_class_dice_vs_n_images", lambda: plots.plot_per_class_dice_vs_n_images(table)),
        ("source_vs_target", lambda: plots.plot_source_vs_target(table)),
        ("overlays", lambda: plot_overlay_grid(results_dir, records, n_cases=overlay_cases, run_ids=overlay_runs)),
        ("learning_curves", lambda: plots.plot_learning_curves(records)),
    ]


def write_report(results_dir: str | Path, *, overlay_runs: Optional[Sequence[str]] = None,
                 overlay_cases: int = 3, headline: Optional[Sequence[str]] = None,
                 answer: Optional[pd.DataFrame] = None, names: Any = None) -> Path:
    """Write ``RESULTS_DIR/report/report.html`` (+ one PNG per figure and the CSV tables); return its path.

    ``overlay_runs``: run ids for the overlay grid (default: chosen by ``select_overlay_runs``).
    ``headline``/``answer``: a study's own opening sentences and its short answer table (``medxfer demo``
    passes them); by default the report opens with :func:`findings`. ``names``: the name map ``medxfer analyze``
    was given (model and encoder names that mean the same), for the data-quality section.
    Raises DataError when the folder has neither run records nor a robustness.csv.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DataError(f"{results_dir}: results folder not found")
    records = list(iter_records(results_dir, kind="finetune"))
    robustness = load_robustness(results_dir / ROBUSTNESS_FILE)
    if not records and robustness is None:
        raise DataError(f"{results_dir}: no run records (runs/*/result.json) and no {ROBUSTNESS_FILE}; "
                        "nothing to report")
    out = results_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    table = downstream_table(records)

    compared = table[table["test set"] != SOURCE_BEFORE]  # the baseline has its own table (forgetting)
    summary = summary_table(compared)
    paired = paired_comparison(compared)
    correlations = score_dice_correlations(score_dice_pairs(table, robustness))
    write_csv(summary, out / SUMMARY_CSV)
    write_csv(paired, out / PAIRED_CSV)
    forgetting = forgetting_table(table)
    if not forgetting.empty:
        write_csv(forgetting, out / FORGETTING_CSV)
    per_class = per_class_table(table)
    if not per_class.empty:
        write_csv(per_class, out / PER_CLASS_CSV)
    if not correlations.empty:
        write_csv(correlations, out / CORRELATION_CSV)

    figures, skipped = [], []
    jobs = _figure_jobs(results_dir, records, table, robustness, overlay_runs, overlay_cases)
    lines = ProgressLog("report", len(jobs))
    lines.note(f"{len(records)} run record(s); drawing {len(jobs)} figures")
    for name, make in jobs:
        png_path = out / f"{name}.png"
        try:
            result = make()
        except SkipFigure as reason:
            skipped.append((name, str(reason)))
            if png_path.exists():  # a figure of an earlier report whose data are gone
                png_path.unlink()
            log.info("report: %s skipped: %s", name, reason)
            lines.step(f"figures ({name} skipped)")
            continue
        figure, detail = result if isinstance(result, tuple) else (result, "")
        data = png_bytes(figure)
        atomic_write_bytes(png_path, data)
        figures.append((name, png_path, data, detail))
        lines.step(f"figures ({name})")

    quality = _quality_lines(table, robustness, names)
    html_path = out / REPORT_FILE
    if answer is not None and not answer.empty:
        write_csv(answer, out / ANSWER_CSV)
    atomic_write_text(html_path, _render(results_dir, records, table, robustness, summary, paired, correlations,
                                         figures, skipped, quality, headline, answer))
    log.info("report: %s (%d figures, %d skipped)", html_path, len(figures), len(skipped))
    return html_path


def _quality_lines(table: pd.DataFrame, robustness: Optional[pd.DataFrame], names: Any = None) -> list[str]:
    """What is wrong with this folder's tables: repeated seeds within a configuration (errors), then what
    ``medxfer analyze`` finds (copied blocks, duplicates, ...). A study without a pretraining-length ladder
    gets no length checks (they do not apply; :func:`_quality_scope` says so)."""
    from medxfer.report.analyze import input_findings
    from medxfer.report.quality import summary_lines

    found = repeated_seeds(table)
    target = table[(table["test set"] == "target") & (table["strategy"] != "scratch")]  # scratch: no length
    if _has_ladder(table):
        found += input_findings(target, robustness, names)
    return summary_lines(found)


def _has_ladder(table: pd.DataFrame) -> bool:
    """Whether some pretrained runs have a pretraining length (the analyze checks are about lengths)."""
    target = table[(table["test set"] == "target") & (table["strategy"] != "scratch")]
    return bool(pd.to_numeric(target["pretraining length"], errors="coerce").notna().any())


def _quality_scope(table: pd.DataFrame, robustness: Optional[pd.DataFrame]) -> str:
    checks = "repeated seeds within a configuration"
    if _has_ladder(table):
        return (f"{checks}, duplicates, copied blocks, constant score variants, missing lengths "
                f"(run records{' and robustness.csv' if robustness is not None else ''})")
    return (f"{checks}; no pretrained run has a pretraining length (no ladder), so the length checks of "
            "medxfer analyze do not apply")


def _render(results_dir: Path, records: list[dict], table: pd.DataFrame, robustness: Optional[pd.DataFrame],
            summary: pd.DataFrame, paired: pd.DataFrame, correlations: pd.DataFrame,
            figures: list, skipped: list, quality: Sequence[str] = (), headline: Optional[Sequence[str]] = None,
            answer: Optional[pd.DataFrame] = None) -> str:
    sentences = list(headline) if headline else findings(table, robustness)
    # One not-converged count, over every run of the folder (its scope stated): a study's headline sentence
    # that counts a part of them (the demo's counts its target dataset) gives way to it.
    sentences = [s for s in sentences if not s.startswith(NOT_CONVERGED_NOTE)] or findings(table, robustness)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>medxfer report: {html.escape(results_dir.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>medxfer report: {html.escape(str(results_dir.resolve()))}</h1>",
        f"<p class='finding'>{html.escape(sentences[0])}</p>",
        *(f"<p>{html.escape(s)}</p>" for s in sentences[1:]),
        "<p class='note'>" + html.escape(headline_note(table)) + "</p>",
        *([f"<p class='finding'>{html.escape(note)}</p>"] if (note := convergence_note(table)) else []),
        "<p class='note'>" + html.escape(_inventory(records, table, robustness)) + "</p>",
    ]
    if answer is not None and not answer.empty:
        parts += ["<h2>The study's answer</h2>",
                  f"<p class='note'>Paired by seed; 95% t-intervals over seeds. CSV: <a href='{ANSWER_CSV}'>"
                  f"{ANSWER_CSV}</a></p>", table_html(answer)]
    parts += [
        "<h2>Data quality</h2>",
        ("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in quality) + "</ul>" if quality
         else "<p class='note'>No problem found.</p>"),
        f"<p class='note'>Checked: {html.escape(_quality_scope(table, robustness)) if not table.empty else 'no runs'}."
        "</p>",
        "<h2>Figures</h2>",
    ]
    if not figures:
        parts.append("<p class='note'>No figure: see below for what is missing.</p>")
    for name, path, data, detail in figures:
        encoded = base64.b64encode(data).decode("ascii")
        caption = FIGURE_CAPTIONS.get(name, name) + (f" {detail}." if detail else "")
        parts.append(f"<figure id='{name}'><img alt='{name}' src='data:image/png;base64,{encoded}'>"
                     f"<figcaption>{html.escape(caption)} File: <a href='{html.escape(path.name)}'>"
                     f"{html.escape(path.name)}</a></figcaption></figure>")
    if skipped:
        parts.append("<h2>Skipped figures</h2><ul>")
        parts += [f"<li><b>{html.escape(name)}</b>: {html.escape(reason)}</li>" for name, reason in skipped]
        parts.append("</ul>")
    summary_shown, summary_caption = compact(summary.drop(columns=[f"{VALUE} mean", f"{VALUE} sd"]),
                                             keep=(f"{VALUE} mean ± sd",))
    paired_shown, paired_caption = compact(paired, keep=("a", "b", "p value", "mean difference"))
    parts += [
        "<h2>Dice per configuration (mean ± sd over seeds)</h2>",
        "<p class='note'>" + html.escape(headline_note(table)) + " sd is the sample sd (ddof 1)."
        + _with_caption("", summary_caption) + f" CSV: <a href='{SUMMARY_CSV}'>{SUMMARY_CSV}</a></p>",
        table_html(summary_shown),
        "<h2>Paired comparison of starting points</h2>",
        f"<p class='note'>Same dataset, model, number of images and test set, paired by seed; a - b. "
        f"Wilcoxon signed-rank test (effect size: rank-biserial r) with {WILCOXON_MIN_PAIRS} or more pairs, "
        f"paired t-test (effect size: Cohen's d_z) with fewer, since an exact Wilcoxon test on 5 or fewer "
        f"pairs cannot reach p &lt; 0.05. Two-sided, no correction for multiple comparisons."
        + _with_caption("", paired_caption) + f" CSV: <a href='{PAIRED_CSV}'>{PAIRED_CSV}</a></p>",
        table_html(paired_shown),
    ]
    per_class = per_class_table(table[table["test set"] == "target"])
    if not per_class.empty:
        parts += ["<h2>Per class (target test)</h2>",
                  "<p class='note'>Mean ± sd over seeds of each class's pooled Dice, present-image Dice, absent-image "
                  "false-positive rate and per-image means; HD95 and ASSD in "
                  f"{html.escape(_distance_unit(records))}, NSD at the run's tolerance. "
                  f"{html.escape(ABSENT_CLASS_RULE)} CSV: <a href='{PER_CLASS_CSV}'>{PER_CLASS_CSV}</a></p>"]
        for dataset, rows in per_class.groupby("dataset", sort=True):  # one table per dataset: its own columns
            rows = rows.drop(columns=[c for c in ("dataset", "n classes", "class names", "headline metric")
                                      if c in rows.columns])
            rows = rows.drop(columns=[c for c in rows.columns if c.endswith(" mean") or (
                c not in ARM_COLUMNS and (rows[c].isna().all() or (rows[c].astype(str) == "n/a").all()))])
            shown, caption = compact(rows, keep=("class",))
            parts += [f"<h3>{html.escape(str(dataset))}</h3>",
                      "<p class='note'>" + _with_caption("", caption).strip() + "</p>" if caption else "",
                      table_html(shown)]
    forgetting = forgetting_table(table)
    if not forgetting.empty:
        parts += ["<h2>What fine-tuning kept of the source task</h2>",
                  "<p class='note'>Source-test Dice of the starting model before fine-tuning (the forgetting "
                  "baseline; n/a where the starting weights carried no segmentation head for the source's classes) "
                  "beside the source-test Dice after fine-tuning (mean ± sd over seeds); change = after - before. "
                  f"CSV: <a href='{FORGETTING_CSV}'>{FORGETTING_CSV}</a></p>", table_html(forgetting)]
    if not correlations.empty:
        parts += ["<h2>Transferability score vs downstream Dice</h2>",
                  f"<p class='note'>Spearman rank correlation over pretraining lengths. "
                  f"CSV: <a href='{CORRELATION_CSV}'>{CORRELATION_CSV}</a></p>", table_html(correlations)]
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<p class='note'>Written by medxfer at {stamp} from the run records; do not edit, "
                 "re-run <code>medxfer report</code>.</p></body></html>")
    return "\n".join(parts)


HEADLINE_NOTES = {
    "pooled dice index": "pooled Dice per class over the test images (2 sum tp / (2 sum tp + sum fp + sum fn)), "
                         "mean over foreground classes; predicting nothing scores 0",
    "per-image mean dice index": "per-image mean Dice over classes, a class absent from both truth and "
                                 "prediction scoring 1 (this rewards predicting nothing where classes are often absent)",
}


def headline_note(table: pd.DataFrame) -> str:
    """Which Dice the report's tables and figures show: the runs' headline metric(s), each explained."""
    names = sorted(table["headline metric"].dropna().unique(), key=str) if "headline metric" in table else []
    if not names:
        return "Dice = the runs' headline metric."
    return "Dice = " + "; ".join(f"{name} ({HEADLINE_NOTES.get(name, 'as the run records define it')})"
                                 for name in names) + "."


def _inventory(records: list[dict], table: pd.DataFrame, robustness: Optional[pd.DataFrame]) -> str:
    text = f"{len(records)} finished run(s)"
    if not table.empty:
        def values(column: str) -> str:
            return ", ".join(str(v) for v in sorted(table[column].dropna().unique(), key=str))

        text += (f"; datasets: {values('dataset')}; strategies: {values('strategy')}; seeds: {values('seed')}; "
                 f"test sets: {values('test set')}")
    text += "; robustness.csv: " + (f"{len(robustness)} row(s)" if robustness is not None else "absent")
    return text + "."
