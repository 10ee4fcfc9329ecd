"""The analysis figures (``figures/*.png``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from medxfer.report.analyze.result import AnalysisResult

log = logging.getLogger(__name__)


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
    if result.groups:
        figure = dice_vs_length(result.groups, plt,
                                no_pretraining=result.evidence.no_pretraining if result.evidence else None)
        paths["dice_vs_length"] = _save_figure(figure, folder / "dice_vs_length.png")
        plt.close(figure)
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


MAX_GRID_COLUMNS = 8  # datasets x encoder states; more: the panels flow in rows of six, each fully titled


def _state(frozen: bool) -> str:
    return "frozen" if frozen else "fine-tuned"


def panel_grid(groups) -> tuple[list[tuple], list[tuple], dict[int, tuple[int, int]]]:
    """Where each group's panel goes: one row per (model, pretraining scheme), one column per (dataset, encoder
    state; fine-tuned first), so a column compares like with like. Returns (rows, columns, {group index: (row,
    column)}); with more than :data:`MAX_GRID_COLUMNS` columns, or a grid less than half full, the groups flow
    in rows of six instead (rows and columns then empty)."""
    rows = sorted({(g.model, g.pretraining_scheme) for g in groups})
    columns = sorted({(g.dataset, g.freeze_encoder) for g in groups})
    if len(columns) > MAX_GRID_COLUMNS or len(rows) * len(columns) > 2 * len(groups):
        width = min(6, len(groups))
        return [], [], {i: divmod(i, width) for i in range(len(groups))}
    return rows, columns, {i: (rows.index((g.model, g.pretraining_scheme)),
                               columns.index((g.dataset, g.freeze_encoder))) for i, g in enumerate(groups)}


def _length_ticks(lengths) -> list[float]:
    """Readable ticks for the symlog length axis: 0 where drawn, the powers of ten from the shortest positive
    length up, and the longest length unless a power of ten is close to it (no power of ten in between: the
    shortest and the longest)."""
    positive = sorted(float(n) for n in lengths if n > 0)
    ticks = [0.0] if min(lengths) <= 0 else []
    if not positive:
        return ticks
    power = 10.0 ** math.ceil(math.log10(positive[0]))
    while power <= positive[-1]:
        ticks.append(power)
        power *= 10
    if not ticks or ticks[-1] <= 0:  # no power of ten in between: the shortest and the longest
        ticks += sorted({positive[0], positive[-1]})
    elif positive[-1] / ticks[-1] >= 1.5:
        ticks.append(positive[-1])
    return ticks


def dice_vs_length(groups, plt, no_pretraining=None):
    """Dice against pretraining length for every group, as small multiples: a row per model and pretraining
    scheme, a column per dataset and encoder state (:func:`panel_grid`); the mean over seeds with a band from the
    lowest to the highest seed. Dice without pretraining (length 0: a random encoder) is a separate marker with
    its seed range, also where its scores were left out of the analysis (``no_pretraining``: the
    ``no_pretraining.csv`` table, columns ``dice_at_0``, ``dice_at_0_low``, ``dice_at_0_high``). Each panel has
    its own Dice axis: the datasets' Dice ranges differ by far more than a curve moves."""
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    zero = {}
    if no_pretraining is not None and len(no_pretraining):
        for r in no_pretraining.itertuples():
            zero[(r.model, r.dataset, r.pretraining_scheme, bool(r.freeze_encoder))] = (
                r.dice_at_0, r.dice_at_0_low, r.dice_at_0_high)
    rows, columns, place = panel_grid(groups)
    n_rows = len(rows) or max(r for r, _ in place.values()) + 1
    n_cols = len(columns) or min(6, len(groups))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.7 * n_cols, 2.2 * n_rows), squeeze=False)
    used = set(place.values())
    drawn: set[float] = set()
    for i, g in enumerate(groups):
        r, c = place[i]
        ax = axes[r][c]
        with np.errstate(all="ignore"):
            low, high = np.nanmin(g.dice_by_seed, axis=1), np.nanmax(g.dice_by_seed, axis=1)
        pretrained = g.lengths > 0
        ax.fill_between(g.lengths[pretrained], low[pretrained], high[pretrained], color="tab:green", alpha=0.25,
                        linewidth=0)
        ax.plot(g.lengths[pretrained], g.dice[pretrained], "o-", color="tab:green", ms=2.5, lw=1.2)
        at_zero = (g.dice[~pretrained][0], low[~pretrained][0], high[~pretrained][0]) if (~pretrained).any() \
            else zero.get(g.key)
        if at_zero is not None:
            mean, lo, hi = at_zero
            ax.errorbar([0.0], [mean], yerr=[[mean - lo], [hi - mean]], fmt="D", color="tab:orange", ms=3.5,
                        elinewidth=1, capsize=2)
        drawn.update(map(float, g.lengths[pretrained]))
        drawn.update([0.0] if at_zero is not None else [])
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3, lw=0.5)
        ax.set_title(f"{g.model} | {g.pretraining_scheme or '-'}\n{g.dataset} | {_state(g.freeze_encoder)}",
                     fontsize=7)
        if c == 0:
            ax.set_ylabel("Dice", fontsize=7)
        if (r + 1, c) not in used:  # the lowest panel of its column
            ax.set_xlabel("pretraining length", fontsize=7)
    # One length axis for every panel, so that a column (or the whole figure) reads like with like.
    ticks = _length_ticks(sorted(drawn))
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if (r, c) not in used:
                ax.axis("off")
                continue
            ax.set_xscale("symlog", linthresh=1, linscale=0.5)
            ax.set_xlim(-0.4 if min(drawn) <= 0 else min(drawn) * 0.8, max(drawn) * 1.15)  # -0.4: linear part
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    layout = ("rows: model | pretraining scheme; columns: dataset | encoder state" if rows else
              "one panel per group")
    fig.suptitle(f"Dice vs pretraining length, all {len(groups)} groups ({layout}); each panel its own Dice axis",
                 fontsize=9, y=0.995)
    handles = [Line2D([], [], color="tab:green", marker="o", ms=3, lw=1.2, label="mean over seeds"),
               plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.25, label="lowest to highest seed")]
    if 0.0 in drawn:
        handles.append(Line2D([], [], color="tab:orange", marker="D", ms=3.5, lw=0,
                              label="no pretraining (length 0), seed range"))
    top = 1 - 0.5 / (2.2 * n_rows)  # room for the title and the legend: about half an inch
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, top), ncol=len(handles), fontsize=7,
               frameon=False)
    return fig
