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
4. The reference study's claims, each with the figure that supports or contradicts it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.config import NameMapConfig, parse_config, read_yaml
from medxfer.errors import ConfigError, DataError
from medxfer.report.quality import FLAGGED, LEFT_OUT, Finding, copied_blocks, drop_duplicate_rows, findings_frame
from medxfer.report.rules import (
    IN_SAMPLE,
    LODO,
    GroupCurves,
    Rule,
    builtin_rules,
    evaluate_rules,
    fitted_stop_rule,
    is_constant,
    score_rule,
    stop_rule_families,
)

log = logging.getLogger(__name__)

# Published reference tables' spellings (and medxfer's) -> canonical keys. Keys are compared after
# :func:`normalize_name`, so case, spaces, hyphens and underscores do not matter.
DEFAULT_ENCODER_NAMES = {
    "ResNet50 Attention U-Net": "resnet50", "resnet50": "resnet50",
    "Swin U-Net": "swin", "swin_transformer": "swin",
    "basic U-Net": "unet", "u-net_encoder": "unet",
    # medxfer model presets and encoder names
    "unet": "unet", "attention_unet": "unet", "unet3d": "unet", "attention_unet3d": "unet",
    "swin_unet": "swin",
}
DEFAULT_DATASET_NAMES = {"COVIDQUDataset": "covidqu", "COVID-QU": "covidqu"}
DEFAULT_SCHEME_NAMES = {"advanced_training": "advanced", "simple_training": "simple"}

DOWNSTREAM_COLUMNS = ("model", "dataset", "pretraining length", "freeze encoder", "pretraining scheme")
SCORE_COLUMNS = ("dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                 "pretraining_length", "robustness")
# A group: names as in the downstream table, then the keys that join it with its scores.
GROUP_COLUMNS = ["model", "dataset", "pretraining_scheme", "frozen", "encoder_key", "dataset_key", "scheme_key"]
SCORE_BLOCK = ["encoder_key", "dataset_key", "scheme_key"]
IMAGENET_PREDICTOR = "ImageNet accuracy"
SINGLE_VARIANT = ("score", "baseline estimator")  # rule families with one rule per variant (many of them)


def normalize_name(name: Any) -> str:
    """Lower case, letters and digits only: ``"COVID-QU"`` -> ``"covidqu"``. Missing -> ``""``."""
    if name is None or (isinstance(name, float) and math.isnan(name)):
        return ""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def _lookup(name: Any, *tables: Mapping[str, str]) -> Optional[str]:
    raw = "" if name is None else str(name)
    norm = normalize_name(name)
    for table in tables:
        if raw in table:
            return normalize_name(table[raw])
        for key, value in table.items():
            if normalize_name(key) == norm:
                return normalize_name(value)
    return None


def encoder_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    """Canonical encoder of a model or encoder name (``"ResNet50 Attention U-Net"``,
    ``"resnet50_attention_unet"`` and ``"resnet50"`` all -> ``"resnet50"``)."""
    found = _lookup(name, (names.encoder if names else {}), DEFAULT_ENCODER_NAMES)
    if found is not None:
        return found
    norm = normalize_name(name)
    resnet = re.match(r"(resnet\d+)", norm)
    if resnet:
        return resnet.group(1)
    if norm.startswith("swin"):
        return "swin"
    return norm


def _key_without_suffix(name: Any, mapping: Mapping[str, str], defaults: Mapping[str, str], suffix: str) -> str:
    """The mapped key of ``name``, else its normalised form without a trailing ``suffix``."""
    found = _lookup(name, mapping, defaults)
    if found is not None:
        return found
    norm = normalize_name(name)
    return norm[: -len(suffix)] if norm.endswith(suffix) and len(norm) > len(suffix) else norm


def dataset_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    return _key_without_suffix(name, names.dataset if names else {}, DEFAULT_DATASET_NAMES, "dataset")


def scheme_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    return _key_without_suffix(name, names.scheme if names else {}, DEFAULT_SCHEME_NAMES, "training")


def load_names(source: NameMapConfig | Mapping[str, Any] | str | Path | None) -> NameMapConfig:
    """A name mapping from a YAML file (keys ``encoder``, ``dataset``, ``scheme``), a dict, or None."""
    if source is None:
        return NameMapConfig()
    if isinstance(source, NameMapConfig):
        return source
    if isinstance(source, (str, Path)):
        return parse_config(read_yaml(source), NameMapConfig, source=str(source))
    return parse_config(dict(source), NameMapConfig, source="<names>")


# --------------------------------------------------------------------------------------------------
# Reading and preparing the two tables


def _read_table(source: pd.DataFrame | str | Path, what: str) -> tuple[pd.DataFrame, str]:
    if isinstance(source, pd.DataFrame):
        return source.copy(), f"<{what}>"
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: {what} table not found")
    try:
        return pd.read_csv(path), str(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the {what} table: {str(exc).splitlines()[0]}") from None


def _require(table: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}")


def _to_bool(values: pd.Series) -> pd.Series:
    def one(v: Any) -> bool:
        if isinstance(v, str):
            return v.strip().lower() in ("true", "1", "yes", "y", "t")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        return bool(v)

    return values.map(one).astype(bool)


def prepare_downstream(table: pd.DataFrame, names: NameMapConfig, source: str = "<downstream>",
                       test_set: Optional[str] = "target", keep_copies: bool = False
                       ) -> tuple[pd.DataFrame, list[Finding]]:
    """One row per run: group keys, ``length``, ``seed``, ``dice`` (``dice index``, or ``mean dice index``
    where that is empty: multi-class) and ``imagenet_accuracy``. Duplicate rows, rows without Dice or
    length (scratch runs) and copied Dice blocks are left out, each reported as a :class:`Finding`."""
    _require(table, DOWNSTREAM_COLUMNS, source)
    if "dice index" not in table.columns and "mean dice index" not in table.columns:
        raise DataError(f"{source}: needs a 'dice index' or 'mean dice index' column")
    table, found = drop_duplicate_rows(table, source)
    if test_set is not None and "test set" in table.columns:
        table = table[table["test set"].isna() | (table["test set"].astype(str) == test_set)]
    dice = pd.to_numeric(table.get("dice index", pd.Series(np.nan, index=table.index)), errors="coerce")
    if "mean dice index" in table.columns:
        dice = dice.fillna(pd.to_numeric(table["mean dice index"], errors="coerce"))
    seeds = table["seed"] if "seed" in table.columns else pd.Series(0, index=table.index)
    accuracy = (pd.to_numeric(table["ImageNet accuracy"], errors="coerce") if "ImageNet accuracy" in table.columns
                else pd.Series(np.nan, index=table.index))
    frame = pd.DataFrame({
        "model": table["model"].astype(str),
        "dataset": table["dataset"].astype(str),
        "pretraining_scheme": table["pretraining scheme"].fillna("").astype(str),
        "frozen": _to_bool(table["freeze encoder"]),
        "encoder_key": table["model"].map(lambda n: encoder_key(n, names)),
        "dataset_key": table["dataset"].map(lambda n: dataset_key(n, names)),
        "scheme_key": table["pretraining scheme"].map(lambda n: scheme_key(n, names)),
        "length": pd.to_numeric(table["pretraining length"], errors="coerce"),
        "seed": seeds.astype(str), "dice": dice, "imagenet_accuracy": accuracy,
    })
    no_length = frame["length"].isna()
    if no_length.any():
        found.append(Finding("no pretraining length", source, f"{int(no_length.sum())} row(s)", LEFT_OUT,
                             "scratch runs or an empty 'pretraining length'"))
    no_dice = frame["dice"].isna() & ~no_length
    if no_dice.any():
        found.append(Finding("no Dice value", source, f"{int(no_dice.sum())} row(s)", LEFT_OUT,
                             "both 'dice index' and 'mean dice index' empty"))
    frame = frame[~no_length & ~no_dice]
    if frame.empty:
        raise DataError(f"{source}: no rows with both a pretraining length and a Dice value")
    blocks = frame.pivot_table(index=GROUP_COLUMNS + ["length"], columns="seed", values="dice", aggfunc="mean")
    for keys, copy, kept in copied_blocks(blocks, "length"):
        model, dataset, scheme, frozen = keys[:4]
        where = f"{model} | {dataset} | {scheme or '-'} | {'frozen' if frozen else 'fine-tuned'} | length {copy:g}"
        found.append(Finding("copied block", source, where, FLAGGED if keep_copies else LEFT_OUT,
                             f"every seed's Dice equals those at length {kept:g}"))
        if not keep_copies:
            frame = frame[~(_matches(frame, GROUP_COLUMNS, keys) & (frame["length"] == copy))]
    return frame.reset_index(drop=True), found


def _matches(frame: pd.DataFrame, columns: Sequence[str], values: Sequence[Any]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in zip(columns, values):
        mask &= frame[column] == value
    return mask


def _variant_name(metric: str, margin: float, level: int, pooled: bool) -> str:
    return f"{metric} margin={margin:g} level={level} {'pooled' if pooled else 'flat'}"


def prepare_scores(robustness: Optional[pd.DataFrame], baselines: Optional[pd.DataFrame], names: NameMapConfig,
                   sources: tuple[str, str] = ("<robustness>", "<baselines>"), keep_copies: bool = False
                   ) -> tuple[pd.DataFrame, list[Finding]]:
    """One row per (encoder, dataset, scheme, variant, length): ``score`` and ``oriented`` (lower = predicted
    better; higher-is-better estimators negated). Duplicates, empty scores and copied blocks (every variant
    of a checkpoint equal to another length's) are left out and reported."""
    parts, found = [], []
    if robustness is not None:
        _require(robustness, SCORE_COLUMNS, sources[0])
        r, dup = drop_duplicate_rows(robustness, sources[0])
        found += dup
        margin = pd.to_numeric(r["margin"], errors="coerce").astype(float)
        level = pd.to_numeric(r["level"], errors="coerce").fillna(-1).astype(int)
        pooled = _to_bool(r["pooled"])
        parts.append(pd.DataFrame({
            "source": sources[0], "family": "robustness",
            "variant": [_variant_name(m, g, lv, p) for m, g, lv, p in zip(r["metric"], margin, level, pooled)],
            "encoder_key": r["encoder"].map(lambda n: encoder_key(n, names)),
            "dataset_key": r["dataset"].map(lambda n: dataset_key(n, names)),
            "scheme_key": r["pretraining_scheme"].map(lambda n: scheme_key(n, names)),
            "length": pd.to_numeric(r["pretraining_length"], errors="coerce"),
            "score": pd.to_numeric(r["robustness"], errors="coerce"), "higher_is_better": False}))
    if baselines is not None:
        _require(baselines, ("dataset", "metric", "encoder", "pretraining_scheme", "level", "pretraining_length",
                             "score"), sources[1])
        b, dup = drop_duplicate_rows(baselines, sources[1])
        found += dup
        higher = _to_bool(b["higher_is_better"]) if "higher_is_better" in b.columns else pd.Series(True, index=b.index)
        level = pd.to_numeric(b["level"], errors="coerce").fillna(-1).astype(int)
        parts.append(pd.DataFrame({
            "source": sources[1], "family": "baseline estimator",
            "variant": [f"{m} level={lv}" for m, lv in zip(b["metric"], level)],
            "encoder_key": b["encoder"].map(lambda n: encoder_key(n, names)),
            "dataset_key": b["dataset"].map(lambda n: dataset_key(n, names)),
            "scheme_key": b["pretraining_scheme"].map(lambda n: scheme_key(n, names)),
            "length": pd.to_numeric(b["pretraining_length"], errors="coerce"),
            "score": pd.to_numeric(b["score"], errors="coerce"), "higher_is_better": higher}))
    if not parts:
        raise ConfigError("analyze: give a robustness table (and/or a baselines table)")
    scores = pd.concat(parts, ignore_index=True)
    empty = scores["length"].isna() | scores["score"].isna()
    for source, count in scores[empty].groupby("source").size().items():
        found.append(Finding("no score value", source, f"{int(count)} row(s)", LEFT_OUT,
                             "empty score or pretraining length"))
    scores = scores[~empty]
    scores["oriented"] = np.where(scores["higher_is_better"], -scores["score"], scores["score"])
    keys = ["family", "variant", "encoder_key", "dataset_key", "scheme_key", "higher_is_better", "length"]
    # Several scorings of one checkpoint (e.g. seeds of the score) are averaged.
    scores = scores.groupby(keys + ["source"], as_index=False)[["score", "oriented"]].mean()
    for source, part in scores.groupby("source"):
        blocks = part.pivot_table(index=SCORE_BLOCK + ["length"], columns="variant", values="score")
        for keys_, copy, kept in copied_blocks(blocks, "length"):
            where = " | ".join(str(k) for k in keys_) + f" | length {copy:g}"
            found.append(Finding("copied block", str(source), where, FLAGGED if keep_copies else LEFT_OUT,
                                 f"all {blocks.shape[1]} variants equal those at length {kept:g}"))
            if not keep_copies:
                scores = scores[~((scores["source"] == source) & _matches(scores, SCORE_BLOCK, keys_)
                                  & (scores["length"] == copy))]
    return scores.drop(columns="source").reset_index(drop=True), found


# --------------------------------------------------------------------------------------------------
# Per-group curves


def build_curves(downstream: pd.DataFrame, scores: pd.DataFrame, source: str = "<downstream>"
                 ) -> tuple[list[GroupCurves], list[Finding]]:
    """One :class:`GroupCurves` per group with scores, over the lengths that have both Dice and scores.

    Reported: groups without scores, lengths present in one table only, lengths with fewer seeds than
    the group's others, variants constant over a group's lengths."""
    found: list[Finding] = []
    curves = []
    by_block = {key: frame for key, frame in scores.groupby(SCORE_BLOCK)}
    for key, rows in downstream.groupby(GROUP_COLUMNS, sort=True):
        model, dataset, scheme, frozen, enc, ds, sk = key
        where = f"{model} | {dataset} | {scheme or '-'} | {'frozen' if frozen else 'fine-tuned'}"
        block = by_block.get((enc, ds, sk))
        if block is None:
            found.append(Finding("group without scores", source, where, LEFT_OUT,
                                 f"no score for encoder {enc!r}, dataset {ds!r}, scheme {sk or '-'!r}"))
            continue
        dice_lengths = set(rows["length"].astype(float))
        score_lengths = set(block["length"].astype(float))
        lengths = np.array(sorted(dice_lengths & score_lengths))
        only_dice, only_score = sorted(dice_lengths - score_lengths), sorted(score_lengths - dice_lengths)
        if only_dice or only_score:
            found.append(Finding("lengths in one table only", source, where, LEFT_OUT,
                                 (f"Dice without scores at {_lengths_text(only_dice)}" if only_dice else "")
                                 + ("; " if only_dice and only_score else "")
                                 + (f"scores without Dice at {_lengths_text(only_score)}" if only_score else "")))
        if len(lengths) < 2:
            found.append(Finding("too few lengths", source, where, LEFT_OUT,
                                 f"{len(lengths)} length(s) with both Dice and scores"))
            continue
        rows = rows[rows["length"].isin(lengths)]
        by_seed = rows.pivot_table(index="length", columns="seed", values="dice", aggfunc="mean").reindex(lengths)
        counts = by_seed.notna().sum(axis=1)
        if counts.nunique() > 1:
            short = counts[counts < counts.max()]
            found.append(Finding("uneven seeds", source, where, FLAGGED,
                                 "fewer seeds at " + ", ".join(f"{n:g} ({c} of {counts.max()})"
                                                               for n, c in short.items())))
        accuracy = rows.groupby("length")["imagenet_accuracy"].mean().reindex(lengths).to_numpy(float)
        variants = {}
        constant = []
        table = block.pivot(index="length", columns="variant", values="oriented").reindex(lengths)
        for variant in table.columns:
            values = table[variant].to_numpy(float)
            variants[str(variant)] = values
            if is_constant(values):
                constant.append(str(variant))
        if constant:
            found.append(Finding("constant variant", "scores", where, "not eligible for selection",
                                 f"{len(constant)} variant(s) score every length alike (argmin would be a tie), "
                                 f"e.g. {constant[0]}"))
        curves.append(GroupCurves(
            model=model, dataset=dataset, pretraining_scheme=scheme, freeze_encoder=bool(frozen), encoder_key=enc,
            dataset_key=ds, scheme_key=sk, lengths=lengths, dice=by_seed.mean(axis=1).to_numpy(float),
            dice_by_seed=by_seed.to_numpy(float), seeds=tuple(by_seed.columns), imagenet_accuracy=accuracy,
            scores=variants))
    matched = {(g.encoder_key, g.dataset_key, g.scheme_key) for g in curves}
    for key in sorted(set(by_block) - matched - {(k[4], k[5], k[6]) for k in
                                                  downstream.groupby(GROUP_COLUMNS).groups}):
        found.append(Finding("scores without downstream results", "scores", " | ".join(key), LEFT_OUT))
    if not curves:
        raise DataError("analyze: no (model, dataset, scheme) group has both downstream results and scores at "
                        "two or more common pretraining lengths; check the name mapping")
    return curves, found


def _lengths_text(lengths: Sequence[float]) -> str:
    return "length(s) " + ", ".join(f"{n:g}" for n in lengths)


# --------------------------------------------------------------------------------------------------
# Statistics


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
    wins/ties/losses against always longest (tie: within the group's seed noise), mean correlations of
    the rule's variant, ties of argmin."""
    by_key = {g.key: g for g in groups}
    variant_of = {r.name: r.variant for r in rules}
    family_of = {r.name: r.family for r in rules}
    online = {r.name for r in rules if r.stop_rule is not None}
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


# --------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class AnalysisResult:
    summary: pd.DataFrame  # one row per evaluated rule
    decisions: pd.DataFrame  # one row per (rule, group): decisions.csv
    correlations: pd.DataFrame  # one row per (group, predictor)
    claims: pd.DataFrame  # the reference study's claims, checked
    quality: list[Finding]  # every problem found in the inputs and what was done
    groups: list[GroupCurves]
    recommended: Optional[str]
    best_variant: Optional[str]  # the variant selected in-sample (argmin)
    paths: dict[str, Path] = field(default_factory=dict)
    recommended_rule: Optional[dict[str, Any]] = None  # recommended_rule.json: the online rule and its figures

    @property
    def best_rule(self) -> Optional[str]:  # the name the demo prints
        return self.recommended

    @property
    def lodo(self) -> pd.DataFrame:
        """Per fitted rule and held-out dataset: what was selected on the other datasets, and its regret."""
        frame = self.decisions[self.decisions["evaluation"] == LODO]
        if frame.empty:
            return pd.DataFrame(columns=["rule", "held_out", "selected", "n_groups", "regret_mean", "saved_mean"])
        return frame.groupby(["rule", "dataset_key"], as_index=False).agg(
            selected=("detail", lambda d: "; ".join(sorted(set(map(str, d))))), n_groups=("regret", "size"),
            regret_mean=("regret", "mean"), saved_mean=("saved", "mean")).rename(columns={"dataset_key": "held_out"})


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
    down_table, down_source = _read_table(downstream, "downstream")
    robust_table, robust_source = (None, "<robustness>") if robustness is None else _read_table(robustness, "robustness")
    base_table, base_source = (None, "<baselines>") if baselines is None else _read_table(baselines, "baselines")
    down, found = prepare_downstream(down_table, names, down_source, test_set, keep_copies)
    scores, score_found = prepare_scores(robust_table, base_table, names, (robust_source, base_source), keep_copies)
    groups, curve_found = build_curves(down, scores, down_source)
    quality = found + score_found + curve_found
    variants = sorted({v for g in groups for v in g.scores})
    robustness_variants = sorted(set(scores.loc[scores["family"] == "robustness", "variant"]))
    rules = builtin_rules(robustness_variants or variants, patience) + [
        Rule(f"{v} | argmin", score_rule(v), "baseline estimator", variant=v)
        for v in variants if v not in robustness_variants] + stop_rule_families(min_saved) + list(extra_rules)
    decisions = evaluate_rules(groups, rules)
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
    claims = paper_claims(summary, decisions, correlation_table, len(groups))
    result = AnalysisResult(summary, decisions, correlation_table, claims, quality, groups, recommended, best_variant,
                            recommended_rule=recommended_rule_record(summary, recommended, rules, groups, min_saved))
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


def write_outputs(result: AnalysisResult, out: Path, figures: bool = True) -> dict[str, Path]:
    from medxfer.io import atomic_write_text

    tables = {"decisions": ("decisions.csv", result.decisions), "summary": ("analysis_summary.csv", result.summary),
              "correlations": ("correlations.csv", result.correlations), "claims": ("claims.csv", result.claims),
              "data_quality": ("data_quality.csv", findings_frame(result.quality)),
              "lodo": ("lodo.csv", result.lodo)}
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


def _save_figure(fig, path: Path) -> Path:
    from medxfer.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    return path


def write_figures(result: AnalysisResult, folder: Path, max_panels: int = 12) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medxfer.report.plots import SkipFigure, plot_regret_vs_saved

    paths = {}
    try:
        figure = plot_regret_vs_saved(result.summary, result.recommended)
    except SkipFigure as exc:
        log.info("no regret-vs-saved figure: %s", exc)
    else:
        paths["regret_vs_saved"] = _save_figure(figure, folder / "regret_vs_saved.png")
    if result.best_variant is not None:
        panels = [g for g in result.groups if result.best_variant in g.scores][:max_panels]
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, g in zip(axes.flat, panels):
            ax.set_title(g.label, fontsize=7)
            ax.plot(g.lengths, g.dice, "o-", color="tab:green", ms=3)
            ax.set_xlabel("pretraining length")
            ax.set_ylabel("Dice")
            twin = ax.twinx()
            twin.plot(g.lengths, g.scores[result.best_variant], "s-", color="tab:blue", ms=3)
            twin.set_ylabel("score (lower = better)", color="tab:blue")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"best variant (in-sample): {result.best_variant}", fontsize=9)
        fig.tight_layout()
        paths["score_vs_dice"] = _save_figure(fig, folder / "score_vs_dice.png")
        plt.close(fig)
    return paths


def summary_for_print(result: AnalysisResult, top: int = 5) -> pd.DataFrame:
    """Every rule that is not one of many single-variant rules (baselines, oracles, ImageNet rules, selected
    variants, added rules), the recommended one, and the ``top`` best single-variant rules of each coverage
    set (best of many: in-sample), as text columns."""
    s = result.summary
    key = s[~s["family"].isin(SINGLE_VARIANT) | s["recommended"]]
    singles = s[~s.index.isin(key.index)].sort_values(["regret_mean", "rule"]).groupby("coverage").head(top)
    rows = []
    for _, r in pd.concat([key, singles]).iterrows():
        rows.append({
            "rule": ("* " if r["recommended"] else "") + r["rule"], "groups": r["coverage"],
            "regret [95% CI]": f"{r['regret_mean']:.4f} [{r['regret_ci_low']:.4f}, {r['regret_ci_high']:.4f}]",
            "saved": f"{r['saved_mean']:.0%}", "vs longest W/T/L": f"{r['wins']}/{r['ties']}/{r['losses']}",
            "Spearman": "" if math.isnan(r["spearman_mean"]) else f"{r['spearman_mean']:+.2f}",
            "note": ("oracle (knows the Dice)" if r["bound"] else "chosen in-sample" if r["evaluation"] == IN_SAMPLE
                     else "best of many: in-sample" if r["family"] in SINGLE_VARIANT else "")})
    return pd.DataFrame(rows)


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


def seeds_text(groups: Sequence[GroupCurves]) -> str:
    """How many seeds the Dice means rest on: ``3 seeds per length (2 at 14 of 340 lengths)``."""
    counts = np.concatenate([np.isfinite(g.dice_by_seed).sum(axis=1) for g in groups])
    tally = np.bincount(counts)
    most = int(len(tally) - 1 - np.argmax(tally[::-1]))  # the most common count; ties: the larger
    text = f"{most} seed{'s' if most != 1 else ''} per length"
    other = counts != most
    if other.any():
        text += f" ({', '.join(str(c) for c in sorted(set(counts[other])))} at {int(other.sum())} of {len(counts)})"
    if most == 1:
        text = "ONE seed: differences below the seed noise cannot be told apart; " + text
    return text
