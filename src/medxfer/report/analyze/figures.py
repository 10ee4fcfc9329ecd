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
        figure = dice_vs_length(result.groups, plt)
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


def dice_vs_length(groups, plt):
    """Dice against pretraining length for every group (small multiples, one row per model and scheme), the
    mean over seeds with a band from the lowest to the highest seed."""
    import numpy as np

    cols = min(6, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        with np.errstate(all="ignore"):
            low, high = np.nanmin(g.dice_by_seed, axis=1), np.nanmax(g.dice_by_seed, axis=1)
        ax.fill_between(g.lengths, low, high, color="tab:green", alpha=0.25, linewidth=0)
        ax.plot(g.lengths, g.dice, "o-", color="tab:green", ms=2, lw=1)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title(f"{g.model}\n{g.dataset} | {g.pretraining_scheme or '-'} | "
                     f"{'frozen' if g.freeze_encoder else 'fine-tuned'}", fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"Dice vs pretraining length, all {len(groups)} groups (line: mean over seeds; band: lowest to "
                 "highest seed)", fontsize=8)
    fig.tight_layout()
    return fig
