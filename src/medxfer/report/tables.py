"""Statistics tables derived from the run records: mean ± sd over seeds, and paired comparisons.

The downstream number is ``dice``: each run's headline (``headline dice``; ``headline metric`` names it,
by default the pooled Dice of ``medxfer.evaluation.metrics``). Records written before runs named their
headline have the per-image mean ``dice index`` (binary tasks) or ``mean dice index`` (multi-class) there.
Runs with different headline metrics are never pooled or compared (``headline metric`` is a group key).

Paired comparison of two arms (strategy + pretraining length + scheme) on the same dataset, model,
number of training images and test set, paired by seed:

- n pairs >= 6: Wilcoxon signed-rank test (scipy, two-sided), effect size = matched-pairs rank-biserial
  correlation r = (W+ - W-) / (W+ + W-).
- 2 <= n pairs < 6: paired t-test (scipy ``ttest_rel``, two-sided), effect size = Cohen's d_z =
  mean difference / sd of the differences. Why: with n <= 5 pairs the smallest two-sided p-value an
  exact Wilcoxon test can give is 2 / 2**n >= 0.0625, so it could never reject at 0.05; the t-test
  can, at the price of assuming roughly normal differences.
- fewer than 2 pairs: no test (p = NaN).
Every row also gives the mean paired difference (a - b) in Dice, the plainest effect size.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.records import SOURCE_BEFORE, iter_records, results_table
from medxfer.report.quality import Finding

log = logging.getLogger(__name__)

VALUE = "dice"
# What identifies one configuration; its rows differ only by seed.
# A dataset is its name plus its label set: runs with different classes are never pooled.
CONFIG_COLUMNS = ["dataset", "n classes", "class names", "model", "strategy", "freeze encoder", "pretraining scheme", "pretraining length",
                  "n train images", "test set", "headline metric"]
ARM_COLUMNS = ["strategy", "pretraining length", "pretraining scheme"]
CONTEXT_COLUMNS = ["dataset", "n classes", "class names", "model", "n train images", "test set", "headline metric"]
WILCOXON_MIN_PAIRS = 6


def downstream_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """results.csv rows of the records plus a ``dice`` column (the run's ``headline dice``).

    A scratch run has, by definition, pretraining length 0 where its record leaves it empty.
    """
    table = results_table(records)
    table[VALUE] = pd.to_numeric(table["headline dice"], errors="coerce")
    length = pd.to_numeric(table["pretraining length"], errors="coerce")
    table["pretraining length"] = length.where(~(length.isna() & (table["strategy"] == "scratch")), 0.0)
    table["pretraining scheme"] = table["pretraining scheme"].fillna("").astype(str)
    return table


def load_downstream(results_dir: str | Path) -> pd.DataFrame:
    return downstream_table(iter_records(results_dir, kind="finetune"))


def arm_label(strategy: Any, length: Any, scheme: Any = "") -> str:
    """A readable name of a starting point: ``full, length 5 (simple)``; scratch has no length."""
    if strategy == "scratch":
        return "scratch"
    text = str(strategy)
    if length is not None and not (isinstance(length, float) and math.isnan(length)):
        text += f", length {_number(length)}"
    if scheme:
        text += f" ({scheme})"
    return text


def _number(value: Any) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _group_keys(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in table.columns]


def summary_table(table: pd.DataFrame, value: str = VALUE) -> pd.DataFrame:
    """Mean ± sd (sample sd, ddof=1; NaN for a single seed) of ``value`` over seeds per configuration."""
    keys = _group_keys(table, CONFIG_COLUMNS)
    rows = []
    data = table[table[value].notna()] if value in table.columns else table.iloc[0:0]
    for key, group in data.groupby(keys, dropna=False, sort=True):
        values = group[value].to_numpy(dtype=float)
        mean = float(values.mean())
        sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row.update({"n seeds": len(values), "seeds": " ".join(str(s) for s in sorted(group["seed"].tolist())),
                    f"{value} mean": mean, f"{value} sd": sd, f"{value} mean ± sd": format_mean_sd(mean, sd)})
        rows.append(row)
    columns = keys + ["n seeds", "seeds", f"{value} mean", f"{value} sd", f"{value} mean ± sd"]
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------- per class
# Per-class columns of the report: (column in the per-class table, key in results.csv, per-image metric?)
PER_CLASS_METRICS = [
    ("pooled Dice", "pooled dice index", False),
    ("present-image Dice", "present-image dice index", False),
    ("absent-image FP rate", "absent-image false-positive rate", False),
    ("per-image Dice", "dice index", True),
    ("HD95", "hd95", True),
    ("NSD", "nsd", True),
    ("ASSD", "assd", True),
]
PER_CLASS_COUNTS = [("images with class", "n present images"), ("images without", "n absent images")]
ABSENT_CLASS_RULE = (
    "How a class absent from a test image counts: pooled Dice sums a class's pixels over all test images, so an "
    "image without the class adds only its false-positive pixels (and nothing when none is predicted); "
    "present-image Dice averages over the images that hold the class; the absent-image FP rate is the share "
    "of the images without it where any pixel is predicted as it. Per-image means (per-image Dice, HD95, NSD, "
    "ASSD) score an image without the class 1 (Dice, NSD) or 0 (HD95, ASSD) when nothing is predicted, Dice "
    "and NSD 0 for any false positive, while HD95 and ASSD leave such an image out (undefined, NaN): a class "
    "that is absent from many images can move the per-image mean Dice without any change where it is present.")


def _row_classes(row: Any) -> list[str]:
    names = str(row.get("class names") or "")
    return [n for n in names.split(", ") if n] or ["foreground"]


def per_class_long(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, test set, foreground class): the class's pooled, present-image and absent-image
    values and its per-image means (binary runs: the bare metric keys are the foreground class's)."""
    rows = []
    keys = [c for c in CONFIG_COLUMNS if c in table.columns] + ["seed", "run id"]
    for _, row in table.iterrows():
        classes = _row_classes(row)
        binary = row.get("n classes") == 2
        for name in classes:
            out = {k: row.get(k) for k in keys}
            out["class"] = name
            for column, key, per_image in PER_CLASS_METRICS:
                value = row.get(f"{key}/{name}")
                if (value is None or (isinstance(value, float) and math.isnan(value))) and per_image and binary:
                    value = row.get(key)
                out[column] = pd.to_numeric(value, errors="coerce") if value is not None else math.nan
            for column, key in PER_CLASS_COUNTS:
                out[column] = pd.to_numeric(row.get(f"{key}/{name}"), errors="coerce")
            rows.append(out)
    columns = keys + ["class"] + [c for c, _, _ in PER_CLASS_METRICS] + [c for c, _ in PER_CLASS_COUNTS]
    return pd.DataFrame(rows, columns=columns)


def per_class_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and foreground class: each metric of ``PER_CLASS_METRICS`` as mean ± sd over seeds
    (columns without any value left out), and how many test images hold / lack the class."""
    long = per_class_long(table)
    if long.empty:
        return long
    keys = [c for c in CONFIG_COLUMNS if c in long.columns] + ["class"]
    rows = []
    for key, group in long.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key))
        row["n seeds"] = int(group["seed"].nunique())
        for column, _, _ in PER_CLASS_METRICS:
            values = group[column].dropna().to_numpy(dtype=float)
            sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row[column] = format_mean_sd(float(values.mean()), sd) if len(values) else "n/a"
            row[f"{column} mean"] = float(values.mean()) if len(values) else math.nan
        for column, _ in PER_CLASS_COUNTS:
            counts = group[column].dropna()
            row[column] = int(counts.iloc[0]) if len(counts) else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    sort = [c for c in ("dataset", "test set", "class", "model", "strategy", "pretraining length", "n train images")
            if c in frame.columns]
    frame = frame.sort_values(sort, kind="stable").reset_index(drop=True)
    empty = [c for c, _, _ in PER_CLASS_METRICS if frame[f"{c} mean"].isna().all()]
    return frame.drop(columns=empty + [f"{c} mean" for c in empty])


def repeated_seeds(table: pd.DataFrame) -> list[Finding]:
    """Data-quality errors: one seed run twice (two run ids) within one configuration of the summary table.
    Such runs differ in something the table does not show (a setting, the data), so they are not two seeds;
    each finding names both runs."""
    keys = _group_keys(table, CONFIG_COLUMNS)
    found = []
    if table.empty or "run id" not in table.columns:
        return found
    for key, group in table.groupby(keys, dropna=False, sort=True):
        context = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for seed, runs in group.groupby("seed", sort=True):
            ids = sorted(set(runs["run id"].astype(str)))
            if len(ids) < 2:
                continue
            where = (f"{context.get('dataset')}, {context.get('model')}, "
                     f"{arm_label(context.get('strategy'), context.get('pretraining length'), context.get('pretraining scheme'))}, "
                     f"{_number(context.get('n train images'))} images, test set {context.get('test set')}: seed {seed}")
            found.append(Finding("repeated seed", "run records", where, "error: counted as more seeds than were run",
                                 f"runs {' and '.join(ids)} differ in a setting or dataset the table does not show; "
                                 "give them different data.label or seeds, or separate output folders"))
    return found


def forgetting_table(table: pd.DataFrame, value: str = VALUE) -> pd.DataFrame:
    """What fine-tuning kept of the source task, beside the baseline that judges it: per configuration with a
    source test, the starting model's own Dice there before fine-tuning (``SOURCE_BEFORE`` rows; n/a when the
    starting weights carried no head that fits), the Dice there after fine-tuning (mean ± sd over seeds),
    and the change (after - before)."""
    keys = [c for c in CONFIG_COLUMNS if c in table.columns and c != "test set"]
    after = table[(table["test set"] == "source") & table[value].notna()]
    before = table[(table["test set"] == SOURCE_BEFORE) & table[value].notna()]
    rows = []
    for key, group in after.groupby(keys, dropna=False, sort=True):
        context = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        base = before[before["run id"].isin(group["run id"])][value]
        values = group[value].to_numpy(dtype=float)
        sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        baseline = float(base.mean()) if len(base) else math.nan
        rows.append({**context, "n seeds": len(values),
                     "source Dice before fine-tuning": baseline,
                     "source Dice after fine-tuning": format_mean_sd(float(values.mean()), sd),
                     "change": float(values.mean()) - baseline})
    columns = keys + ["n seeds", "source Dice before fine-tuning", "source Dice after fine-tuning", "change"]
    return pd.DataFrame(rows, columns=columns)


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two-sided paired test of ``a`` vs ``b`` (same order = same pairs); see the module docstring."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a - b
    n = len(diff)
    result: dict[str, Any] = {"n pairs": n, "mean difference": float(diff.mean()) if n else math.nan,
                              "test": "none", "statistic": math.nan, "p value": math.nan,
                              "effect size": math.nan, "effect size measure": ""}
    if n < 2:
        result["test"] = "none (fewer than 2 pairs)"
        return result
    if np.allclose(diff, 0.0):
        result.update(test="none (all differences are 0)", **{"effect size": 0.0})
        return result
    if n >= WILCOXON_MIN_PAIRS:
        test = stats.wilcoxon(a, b, alternative="two-sided")
        ranks = stats.rankdata(np.abs(diff[diff != 0]))
        positive = float(ranks[diff[diff != 0] > 0].sum())
        negative = float(ranks[diff[diff != 0] < 0].sum())
        result.update({"test": "wilcoxon signed-rank", "statistic": float(test.statistic),
                       "p value": float(test.pvalue), "effect size": (positive - negative) / (positive + negative),
                       "effect size measure": "rank-biserial r"})
    elif np.allclose(diff, diff[0], rtol=0.0, atol=1e-9):
        # a constant difference has no spread: t is infinite and its p-value meaningless
        result.update({"test": "none (all differences are equal)", "effect size": math.copysign(math.inf, diff[0]),
                       "effect size measure": "Cohen's d_z"})
    else:
        test = stats.ttest_rel(a, b)
        sd = float(diff.std(ddof=1))
        result.update({"test": "paired t-test", "statistic": float(test.statistic), "p value": float(test.pvalue),
                       "effect size": float(diff.mean()) / sd if sd > 0 else math.copysign(math.inf, diff.mean()),
                       "effect size measure": "Cohen's d_z"})
    return result


def _with_arms(table: pd.DataFrame, value: str) -> tuple[list[str], pd.DataFrame]:
    """The context columns to group by, and the rows with a ``value`` labelled by their arm."""
    data = table[table[value].notna()].copy()
    data["arm"] = [arm_label(*row) for row in data[ARM_COLUMNS].itertuples(index=False, name=None)]
    return _group_keys(table, CONTEXT_COLUMNS), data


def paired_comparison(table: pd.DataFrame, value: str = VALUE,
                      reference: Optional[str] = None) -> pd.DataFrame:
    """Every pair of arms within each (dataset, model, n train images, test set), paired by seed.

    ``reference`` (an arm label such as "scratch") restricts the comparisons to arm vs reference.
    Rows with fewer than 2 common seeds are left out.
    """
    keys, data = _with_arms(table, value)
    rows = []
    for key, group in data.groupby(keys, dropna=False, sort=True):
        # one value per (arm, seed); repeated runs of one configuration are averaged
        by_seed = group.groupby(["arm", "seed"])[value].mean().unstack("seed")
        arms = list(by_seed.index)
        pairs = itertools.combinations(arms, 2)
        if reference is not None:
            pairs = [(arm, reference) for arm in arms if arm != reference and reference in arms]
        for arm_a, arm_b in pairs:
            both = by_seed.loc[[arm_a, arm_b]].dropna(axis=1)
            if both.shape[1] < 2:
                continue
            test = paired_test(both.loc[arm_a].to_numpy(), both.loc[arm_b].to_numpy())
            row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
            row.update({"a": arm_a, "b": arm_b, "seeds": " ".join(str(s) for s in both.columns),
                        f"mean {value} a": float(both.loc[arm_a].mean()),
                        f"mean {value} b": float(both.loc[arm_b].mean()), **test})
            rows.append(row)
    columns = keys + ["a", "b", "seeds", f"mean {value} a", f"mean {value} b", "n pairs", "mean difference",
                      "test", "statistic", "p value", "effect size", "effect size measure"]
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------ robustness
ROBUSTNESS_COLUMNS = ["dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                      "pretraining_length", "robustness"]
DEFAULT_METRIC = "cosine"
DEFAULT_MARGIN = 0.5


def load_robustness(path: str | Path) -> Optional[pd.DataFrame]:
    """``robustness.csv`` as a table, or None when the file does not exist."""
    from medxfer.errors import DataError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read robustness table: {exc}") from None
    missing = [c for c in ("dataset", "pretraining_length", "robustness") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: robustness table lacks column(s) {', '.join(missing)}")
    for column in ROBUSTNESS_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan if column in ("margin", "level") else ""
    table["pooled"] = table["pooled"].map(_as_bool)
    for column in ("pretraining_length", "robustness", "margin"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    table["encoder"] = table["encoder"].fillna("").astype(str)
    table["pretraining_scheme"] = table["pretraining_scheme"].fillna("").astype(str)
    return table


def _as_bool(value: Any) -> Any:
    if isinstance(value, str):
        return {"true": True, "false": False, "1": True, "0": False}.get(value.strip().lower(), value)
    return value


def default_variant(robustness: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """One score variant, all levels: metric cosine, margin closest to 0.5, pooled features where present
    (each falls back to what the table has). Returns the rows and a description of the choice."""
    table = robustness
    metric = DEFAULT_METRIC if (table["metric"] == DEFAULT_METRIC).any() else sorted(table["metric"].astype(str))[0]
    table = table[table["metric"].astype(str) == str(metric)]
    margins = table["margin"].dropna().unique()
    margin = None
    if len(margins):
        margin = float(margins[np.argmin(np.abs(margins - DEFAULT_MARGIN))])
        table = table[table["margin"] == margin]
    pooled = True if (table["pooled"] == True).any() else False  # noqa: E712 (column may hold non-bools)
    if (table["pooled"] == pooled).any():
        table = table[table["pooled"] == pooled]
    text = f"metric {metric}" + (f", margin {margin:g}" if margin is not None else "") + f", pooled {pooled}"
    return table, text


def deepest_level(variant: pd.DataFrame) -> pd.DataFrame:
    """Rows of the deepest feature level (per dataset and encoder)."""
    parts = []
    for _, group in variant.groupby(["dataset", "encoder"], dropna=False, sort=True):
        levels = pd.to_numeric(group["level"], errors="coerce")
        if levels.notna().any():
            parts.append(group[levels == levels.max()])
        else:
            parts.append(group[group["level"].astype(str) == sorted(group["level"].astype(str))[-1]])
    return pd.concat(parts) if parts else variant.iloc[0:0]


# ------------------------------------------------------------------------------------- vs scratch
# A t-interval from 2 seeds has 1 degree of freedom (t = 12.7): it runs past the possible +-1 of a Dice
# difference and says nothing, so fewer seeds than this give "no interval".
MIN_INTERVAL_SEEDS = 3


def no_interval_text(n_seeds: int) -> str:
    """What the report says instead of an interval: ``2 seeds: no interval``."""
    return f"{n_seeds} seed{'s' if n_seeds != 1 else ''}: no interval"


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean of paired differences; NaNs with fewer than
    ``MIN_INTERVAL_SEEDS``."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    if len(d) < MIN_INTERVAL_SEEDS:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return float(d.mean()) - half, float(d.mean()) + half


def versus_scratch(table: pd.DataFrame, value: str = VALUE) -> pd.DataFrame:
    """Each pretrained starting point against scratch on the same dataset, model, number of training images
    and test set, paired by seed: both means, the mean difference with its 95% t-interval over seeds, and a
    verdict that says "within seed noise" when the interval covers 0 (and "2 seeds: no interval" with fewer
    than ``MIN_INTERVAL_SEEDS``)."""
    keys, data = _with_arms(table, value)
    rows = []
    for key, group in data.groupby(keys, dropna=False, sort=True):
        by_seed = group.groupby(["arm", "seed"])[value].mean().unstack("seed")
        if "scratch" not in by_seed.index:
            continue
        for arm in by_seed.index:
            if arm == "scratch":
                continue
            both = by_seed.loc[[arm, "scratch"]].dropna(axis=1)
            if both.shape[1] == 0:
                continue
            diff = both.loc[arm].to_numpy() - both.loc["scratch"].to_numpy()
            low, high = t_interval(diff)
            if len(diff) < MIN_INTERVAL_SEEDS:
                verdict = no_interval_text(len(diff))
            elif low > 0:
                verdict = "better than scratch"
            elif high < 0:
                verdict = "worse than scratch"
            else:
                verdict = "within seed noise"
            row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
            row.update({"starting point": arm, "n seeds": int(both.shape[1]),
                        f"{value} scratch": float(both.loc["scratch"].mean()), f"{value}": float(both.loc[arm].mean()),
                        "difference": float(diff.mean()), "95% CI low": low, "95% CI high": high,
                        "verdict": verdict})
            rows.append(row)
    columns = keys + ["starting point", "n seeds", f"{value} scratch", value, "difference", "95% CI low",
                      "95% CI high", "verdict"]
    return pd.DataFrame(rows, columns=columns)


def format_difference(row: Any) -> str:
    """``+0.123 [+0.050, +0.196]`` (the interval left out when there is none)."""
    text = f"{row['difference']:+.3f}"
    if not math.isnan(row["95% CI low"]):
        text += f" [{row['95% CI low']:+.3f}, {row['95% CI high']:+.3f}]"
    return text


NOT_CONVERGED_NOTE = "Not converged: "  # how the sentence of convergence_note begins


def not_converged(flag: Any) -> bool:
    """Whether a run's ``converged`` flag (a record's or the table's column) says it had not converged:
    False; True is converged, None / NaN undecided (the rule of ``medxfer.training.convergence``)."""
    return flag is False or (flag is not None and flag == False)  # noqa: E712 (numpy's False; NaN != False)


def convergence_count(table: pd.DataFrame) -> tuple[list[str], int, str]:
    """``(run ids not converged, runs counted, their scope)``: every run of ``table`` counted once, whatever
    its test sets; the scope names the dataset(s) the runs trained on (``dataset colin27-t1`` or ``all
    datasets: a, b``), so that counts over different parts of a study never read as one."""
    if table.empty or "run id" not in table.columns:
        return [], 0, "no runs"
    runs = table.drop_duplicates("run id")
    flags = runs["converged"] if "converged" in runs.columns else pd.Series(None, index=runs.index, dtype=object)
    flagged = sorted(str(v) for v in runs.loc[flags.map(not_converged), "run id"])
    datasets = sorted({str(v) for v in runs["dataset"].dropna()}) if "dataset" in runs.columns else []
    scope = f"dataset {datasets[0]}" if len(datasets) == 1 else "all datasets" + (
        f": {', '.join(datasets)}" if datasets else "")
    return flagged, int(runs["run id"].nunique()), scope


def convergence_note(table: pd.DataFrame) -> Optional[str]:
    """One sentence counting and naming the runs whose validation headline was still rising over the last
    quarter of training, with the runs they are counted among (:func:`convergence_count`: ``15 of 41 run(s)
    (all datasets: a, b)``), or None when there are none."""
    flagged, n_runs, scope = convergence_count(table)
    if not flagged:
        return None
    return (f"{NOT_CONVERGED_NOTE}{len(flagged)} of {n_runs} run(s) ({scope}) still improved on validation over "
            f"the last quarter of training (their Dice understates what they would reach): {', '.join(flagged)}.")
