"""Reading the downstream and score tables and preparing them: one row per run (downstream) and per
(encoder, dataset, scheme, variant, length) (scores); duplicates, empty values and copied blocks are left out,
each reported as a :class:`medxfer.report.quality.Finding`."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.config import NameMapConfig
from medxfer.errors import ConfigError, DataError
from medxfer.report.analyze.names import dataset_key, encoder_key, scheme_key
from medxfer.report.quality import FLAGGED, LEFT_OUT, Finding, copied_blocks, drop_duplicate_rows


log = logging.getLogger(__name__)

DOWNSTREAM_COLUMNS = ("model", "dataset", "pretraining length", "freeze encoder", "pretraining scheme")
SCORE_COLUMNS = ("dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                 "pretraining_length", "robustness")
# A group: names as in the downstream table, then the keys that join it with its scores.
GROUP_COLUMNS = ["model", "dataset", "pretraining_scheme", "frozen", "encoder_key", "dataset_key", "scheme_key"]
SCORE_BLOCK = ["encoder_key", "dataset_key", "scheme_key"]


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

    distinct = values.drop_duplicates()
    return values.map(dict(zip(distinct, map(one, distinct)))).astype(bool)


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
    infinite = np.isinf(frame["dice"]) | np.isinf(frame["length"])
    if infinite.any():
        found.append(Finding("infinite value", source, f"{int(infinite.sum())} row(s)", LEFT_OUT,
                             "an infinite Dice or pretraining length (a Dice lies in [0, 1])"))
    frame = frame[~no_length & ~no_dice & ~infinite]
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


# Score variants per table (metric x margin x level x pooled; the reference study has 150). Each is a rule
# over every group; the per-variant work is vectorised: 25,000 variants over 10^6 score rows took 62-166 s
# (idle to loaded 2 cores) and 1.5 GB (benchmarks/results/analyze.json). Beyond MANY_VARIANTS a warning says
# it takes a while; beyond MAX_VARIANTS analyze refuses rather than run for many minutes out of memory.
MANY_VARIANTS = 5000
MAX_VARIANTS = 50000


def _readable_variants(table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[Finding]]:
    """Rows whose ``level`` is a whole number and ``margin`` a number; the others (``level: top``) name no
    variant: left out and reported, never turned into a variant of their own."""
    level = pd.to_numeric(table["level"], errors="coerce")
    margin = pd.to_numeric(table["margin"], errors="coerce")
    bad_level = level.isna() | ~np.isfinite(level) | (level != level.round())
    bad_margin = margin.isna() | ~np.isfinite(margin)
    found = []
    for bad, column in ((bad_level, "level"), (bad_margin & ~bad_level, "margin")):
        if bad.any():
            values = ", ".join(repr(v) for v in table.loc[bad, column].astype(str).unique()[:3])
            found.append(Finding(f"unreadable {column}", source, f"{int(bad.sum())} row(s)", LEFT_OUT,
                                 f"{column} {values} is not a {'level number' if column == 'level' else 'number'}"))
    return table[~bad_level & ~bad_margin], found


def _variant_name(metric: str, margin: float, level: int, pooled: bool) -> str:
    return f"{metric} margin={margin:g} level={level} {'pooled' if pooled else 'flat'}"


def _each_unique(function, *columns: pd.Series) -> np.ndarray:
    """``function`` of every row's values, computed once per distinct combination: a score table has a
    million rows but few encoders, datasets and variants (name mapping costs microseconds a call)."""
    codes, uniques = pd.MultiIndex.from_arrays(list(columns)).factorize()
    return np.array([function(*values) for values in uniques], dtype=object)[codes]


def _keys(frame: pd.DataFrame, names: NameMapConfig, encoder: str, scheme: str) -> dict[str, np.ndarray]:
    """The canonical encoder, dataset and scheme keys of a score table's rows."""
    return {"encoder_key": _each_unique(lambda n: encoder_key(n, names), frame[encoder].fillna("")),
            "dataset_key": _each_unique(lambda n: dataset_key(n, names), frame["dataset"].fillna("")),
            "scheme_key": _each_unique(lambda n: scheme_key(n, names), frame[scheme].fillna(""))}


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
        r, unreadable = _readable_variants(r, sources[0])
        found += unreadable
        margin = pd.to_numeric(r["margin"], errors="coerce").astype(float)
        level = pd.to_numeric(r["level"], errors="coerce").astype(int)
        pooled = _to_bool(r["pooled"])
        parts.append(pd.DataFrame({
            "source": sources[0], "family": "robustness",
            "variant": _each_unique(_variant_name, r["metric"].astype(str), margin, level, pooled),
            **_keys(r, names, "encoder", "pretraining_scheme"),
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
            "variant": _each_unique(lambda m, lv: f"{m} level={lv}", b["metric"].astype(str), level),
            **_keys(b, names, "encoder", "pretraining_scheme"),
            "length": pd.to_numeric(b["pretraining_length"], errors="coerce"),
            "score": pd.to_numeric(b["score"], errors="coerce"), "higher_is_better": higher}))
    if not parts:
        raise ConfigError("analyze: give a robustness table (and/or a baselines table)")
    scores = pd.concat(parts, ignore_index=True)
    for source, count in scores.groupby("source")["variant"].nunique().items():
        if count > MAX_VARIANTS:  # every variant is a rule over every group: the cost grows with their number
            raise DataError(f"{source}: {count} score variants, more than the {MAX_VARIANTS} analyze evaluates "
                            "(the reference study has 150); keep the variants you study")
        if count > MANY_VARIANTS:
            log.warning("%s: %d score variants (the reference study has 150): analyze takes minutes (25,000 "
                        "variants over 10^6 rows: 1-3 min); keep the variants you study to make it faster",
                        source, count)
    empty = scores["length"].isna() | scores["score"].isna()
    for source, count in scores[empty].groupby("source").size().items():
        found.append(Finding("no score value", source, f"{int(count)} row(s)", LEFT_OUT,
                             "empty score or pretraining length"))
    infinite = ~empty & (np.isinf(scores["score"]) | np.isinf(scores["length"]))
    for source, count in scores[infinite].groupby("source").size().items():
        found.append(Finding("infinite value", source, f"{int(count)} row(s)", LEFT_OUT,
                             "an infinite score or pretraining length"))
    scores = scores[~empty & ~infinite]
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
