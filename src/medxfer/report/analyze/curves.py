"""Per-group curves: the prepared tables joined into one :class:`medxfer.report.rules.GroupCurves` per
(model, dataset, scheme, frozen encoder) over the lengths both tables have, every gap reported."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from medxfer.errors import DataError
from medxfer.report.analyze.inputs import GROUP_COLUMNS, SCORE_BLOCK
from medxfer.report.quality import FLAGGED, LEFT_OUT, Finding
from medxfer.report.rules import GroupCurves, is_constant


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


def settling_length(lengths: Sequence[float], values: Sequence[float], tolerance: float) -> float:
    """Where a curve settles: the first length after which no step between consecutive lengths changes it by
    more than ``tolerance`` x its range (max - min over ``lengths``). A curve whose last step is still larger
    settles only at its last length (it has not settled within the lengths given); a constant curve at its
    first length. The range is the curve's own, so the rule does not depend on the score's scale."""
    lengths = np.asarray(lengths, dtype=float)
    values = np.asarray(values, dtype=float)
    if lengths.ndim != 1 or lengths.shape != values.shape or len(lengths) == 0:
        raise ValueError(f"settling_length: lengths and values must be 1-D and of one size, got {lengths.shape} "
                         f"and {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("settling_length: values must be finite")
    if not 0 <= tolerance < 1:
        raise ValueError(f"settling_length: tolerance must be in [0, 1), got {tolerance}")
    large = np.flatnonzero(np.abs(np.diff(values)) > tolerance * np.ptp(values))
    return float(lengths[0] if len(large) == 0 else lengths[large[-1] + 1])


def score_settling(groups: Sequence[GroupCurves], variant, tolerance: float, min_length: float = 0.0
                   ) -> dict[str, float]:
    """:func:`settling_length` of one score variant (a stop-rule key, e.g.
    :data:`medxfer.transferability.stopping.DEFAULT_VARIANT`) in every group that has it, over the group's
    lengths >= ``min_length`` (``1``: without length 0, a random encoder): the median and quartiles over groups,
    and how many groups settle only at their last length (``not_settled``: still moving by more than the
    tolerance in their last step)."""
    settled, last = [], 0
    for g in groups:
        values = g.stop_curve.score(variant)
        keep = g.lengths >= min_length
        if values is None or keep.sum() < 2:
            continue
        length = settling_length(g.lengths[keep], values[keep], tolerance)
        settled.append(length)
        step = np.abs(np.diff(values[keep]))[-1]
        last += int(step > tolerance * np.ptp(values[keep]))
    if not settled:
        return {"tolerance": tolerance, "n_groups": 0, "median": math.nan, "q25": math.nan, "q75": math.nan,
                "not_settled": 0}
    q25, median, q75 = np.percentile(settled, [25, 50, 75])
    return {"tolerance": tolerance, "n_groups": len(settled), "median": float(median), "q25": float(q25),
            "q75": float(q75), "not_settled": last}
