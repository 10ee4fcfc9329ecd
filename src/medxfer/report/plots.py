"""The report's figures, drawn from the downstream table (``tables.downstream_table``) and robustness.csv.

Each ``plot_*`` function returns a matplotlib ``Figure`` or raises :class:`SkipFigure` saying which data
are missing. Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas, never pyplot, so
no GUI backend or global figure state is involved.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any, Optional

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medxfer.records import SOURCE_BEFORE
from medxfer.report.tables import VALUE, arm_label, deepest_level, default_variant, not_converged

log = logging.getLogger(__name__)

PANEL_SIZE = (5.4, 4.0)  # inches per panel: about 650 px at PNG_DPI, two panels fill the report column
MAX_LEGEND_ENTRIES = 6  # more lines than this in one panel are split into more panels
MIN_DICE_SPAN = 0.1  # a Dice axis spans at least this much, so that seed noise of 0.0001 is not blown up
MIN_SCORE_SPAN = 0.05  # the same for the robustness score


class SkipFigure(Exception):
    """The data this figure needs are not there; the message says what is missing."""


def new_figure(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


PNG_DPI = 120
LEGEND_FONT = 9
TITLE_FONT = 10


def png_bytes(figure: Figure, dpi: int = PNG_DPI) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _target_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table["test set"] == "target") & table[VALUE].notna()]


def _mean_sd(group: pd.DataFrame, x: str) -> pd.DataFrame:
    stats = group.groupby(x)[VALUE].agg(["mean", "std", "count"]).reset_index().sort_values(x)
    stats["std"] = stats["std"].fillna(0.0)  # one seed: no spread to draw
    return stats


def _draw_line(ax, stats: pd.DataFrame, x: str, label: str, **style: Any) -> None:
    xs, mean, sd = stats[x].to_numpy(float), stats["mean"].to_numpy(float), stats["std"].to_numpy(float)
    line = ax.errorbar(xs, mean, yerr=sd, marker="o", capsize=3, label=label, **style)
    ax.fill_between(xs, mean - sd, mean + sd, alpha=0.12, color=line[0].get_color())


def _length_axis(ax, lengths: np.ndarray, unit: str = "") -> None:
    positive = lengths[lengths > 0]
    if len(positive) and positive.max() / positive.min() > 20:
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.set_xlabel("pretraining length" + (f" ({unit})" if unit else " (as the pretraining scheduled it)"))


def length_unit(rows: pd.DataFrame) -> str:
    """What the pretraining lengths of ``rows`` count (``steps of fashion-mnist``), when one thing."""
    if "pretraining length unit" not in rows.columns:
        return ""
    units = {str(u) for u in rows["pretraining length unit"].dropna() if str(u)}
    return units.pop() if len(units) == 1 else ""


def seeds_text(rows: pd.DataFrame, per: Optional[str] = None) -> str:
    """``3 seeds``: the seeds behind a mean; for a line whose points (``rows`` grouped by the column ``per``)
    rest on different numbers of seeds, their range (``3-10 seeds``), never the largest alone. "" when
    ``rows`` name no seeds."""
    if "seed" not in rows.columns or rows.empty:
        return ""
    counts = rows.groupby(per)["seed"].nunique() if per is not None else pd.Series([rows["seed"].nunique()])
    fewest, most = int(counts.min()), int(counts.max())
    if most == 0:
        return ""
    return (f"{fewest}-{most}" if fewest != most else f"{most}") + f" seed{'s' if most != 1 else ''}"


def _seeds_text(rows: pd.DataFrame, per: Optional[str] = None) -> str:
    text = seeds_text(rows, per)
    return f" ({text})" if text else ""


def images_label(n_images: Any, rows: pd.DataFrame, per: Optional[str] = None) -> str:
    """``5 images, 3 seeds``: training images and the seeds behind a mean (never a bare "n=5"); ``per``: the
    x column of a line, whose points may rest on different numbers of seeds (:func:`seeds_text`)."""
    n = int(float(n_images))
    seeds = seeds_text(rows, per)
    return f"{n} image{'s' if n != 1 else ''}" + (f", {seeds}" if seeds else "")


def _finish(ax, ylabel: str, title: str, min_span: Optional[float] = MIN_DICE_SPAN,
            limits: Optional[tuple[float, float]] = (0.0, 1.0)) -> None:
    """Labels, grid, a y-axis at least ``min_span`` wide (inside ``limits``), and the legend outside the
    axes (below them), so that it never covers data."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=TITLE_FONT)
    ax.grid(alpha=0.3)
    if min_span is not None:
        widen_axis(ax, min_span, limits)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=LEGEND_FONT, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)


def widen_axis(ax, min_span: float, limits: Optional[tuple[float, float]] = None) -> None:
    """Widen the y-axis to at least ``min_span`` around its data, kept inside ``limits`` where possible."""
    low, high = ax.get_ylim()
    if high - low >= min_span:
        return
    centre = (low + high) / 2
    low, high = centre - min_span / 2, centre + min_span / 2
    if limits is not None:
        if low < limits[0]:
            low, high = limits[0], limits[0] + min_span
        if high > limits[1]:
            low, high = limits[1] - min_span, limits[1]
    ax.set_ylim(low, high)


def chunks(items: list, size: int = MAX_LEGEND_ENTRIES) -> list[list]:
    """``items`` in consecutive groups of at most ``size`` (one panel each); at least one, maybe empty."""
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def _several(values) -> bool:
    return len(set(values)) > 1


def scratch_as_full_at_length_zero(data: pd.DataFrame) -> pd.DataFrame:
    """Add scratch runs as the length-0 point of full fine-tuning (fine-tuning everything from an encoder
    pretrained for 0 steps is training from scratch) where no full run at length 0 exists. Frozen or
    partly frozen strategies get no such point: a frozen random encoder is not scratch."""
    keys = ["dataset", "model", "n train images", "test set"]
    full_zero = data[(data["strategy"] == "full") & (data["pretraining length"] == 0)]
    has_full = data[data["strategy"] == "full"][keys].drop_duplicates()
    scratch = data[data["strategy"] == "scratch"].merge(has_full, on=keys)
    if not full_zero.empty:
        scratch = scratch.merge(full_zero[keys].drop_duplicates(), on=keys, how="left", indicator=True)
        scratch = scratch[scratch["_merge"] == "left_only"].drop(columns="_merge")
    scratch = scratch.assign(strategy="full", **{"pretraining length": 0.0})
    return pd.concat([data, scratch], ignore_index=True)


# ------------------------------------------------------------------------------------ the figures
def _panel_grid(n_panels: int, max_cols: int = 2) -> tuple[Figure, list]:
    cols = min(max_cols, max(1, n_panels))
    rows = math.ceil(max(1, n_panels) / cols)
    figure, axes = new_figure(rows, cols)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return figure, flat[:n_panels]


def plot_dice_vs_pretraining_length(table: pd.DataFrame) -> Figure:
    """Downstream Dice vs pretraining length: panels per dataset and frozen vs fine-tuned encoder (split
    further when a panel would hold more than ``MAX_LEGEND_ENTRIES`` lines); a line per model / strategy /
    n images with two or more lengths, mean ± sd over seeds. Scratch runs are the length-0 point of full
    fine-tuning, and a grey dashed line in the panels of other strategies; starting points without a length
    (imported weights such as ImageNet) are dashed horizontal lines at their mean."""
    data = _target_rows(table)
    unlengthed = data[data["pretraining length"].isna() & (data["strategy"] != "scratch")]
    data = data[data["pretraining length"].notna()]
    pretrained = data[data["strategy"] != "scratch"]
    if pretrained.empty or data["pretraining length"].nunique() < 2:
        raise SkipFigure("needs target-test runs at two or more pretraining lengths (scratch counts as 0)")
    scratch = data[data["strategy"] == "scratch"]
    lines = scratch_as_full_at_length_zero(data)
    lines = lines[lines["strategy"] != "scratch"]
    keys = ["model", "strategy", "n train images"]
    panels = []
    for dataset in sorted(pretrained["dataset"].unique()):
        for frozen in sorted(pretrained[pretrained["dataset"] == dataset]["freeze encoder"].unique()):
            panel = lines[(lines["dataset"] == dataset) & (lines["freeze encoder"] == frozen)]
            drawn = [key for key, rows in panel.groupby(keys) if rows["pretraining length"].nunique() >= 2]
            for part in chunks(drawn, max(1, MAX_LEGEND_ENTRIES // 2)):  # room for each line's references
                if part:
                    panels.append((dataset, frozen, panel, part))
    if not panels:
        raise SkipFigure("no starting point was fine-tuned at two or more pretraining lengths")
    show_model = _several(lines["model"])
    figure, axes = _panel_grid(len(panels))
    for ax, (dataset, frozen, panel, part) in zip(axes, panels):
        for model, strategy, n_images in part:
            rows = panel[(panel["model"] == model) & (panel["strategy"] == strategy)
                         & (panel["n train images"] == n_images)]
            line_of = images_label(n_images, rows, "pretraining length")  # seeds may differ point to point
            label = (f"{model}, " if show_model else "") + f"{strategy}, {line_of}"
            _draw_line(ax, _mean_sd(rows, "pretraining length"), "pretraining length", label)
            same = lambda frame: frame[(frame["dataset"] == dataset) & (frame["model"] == model)  # noqa: E731
                                       & (frame["n train images"] == n_images)]
            if strategy != "full":
                reference = same(scratch)[VALUE]
                if not reference.empty:
                    ax.axhline(reference.mean(), linestyle="--", linewidth=1, color="grey",
                               label=f"scratch, {images_label(n_images, same(scratch))}")
            for (arm_strategy, scheme), arm in same(unlengthed).groupby(["strategy", "pretraining scheme"]):
                ax.axhline(arm[VALUE].mean(), linestyle="--", linewidth=1.2,
                           color="black" if arm_strategy == "full" else "dimgrey",
                           label=f"{arm_label(arm_strategy, None, scheme)}, {images_label(n_images, arm)}")
        _length_axis(ax, data["pretraining length"].to_numpy(float), length_unit(panel))
        _finish(ax, "Dice (target test)", f"{dataset}: {'frozen' if frozen else 'fine-tuned'} encoder")
    return figure


def plot_dice_vs_n_images(table: pd.DataFrame) -> Figure:
    """Data-scarcity curve: Dice vs number of target training images, a line per starting point run with
    two or more numbers of images (at most ``MAX_LEGEND_ENTRIES`` per panel; scratch in every panel)."""
    data = _target_rows(table)
    if data["n train images"].nunique() < 2:
        raise SkipFigure("needs target-test runs with two or more numbers of training images")
    groups = []
    for dataset in sorted(data["dataset"].unique()):
        panel = data[data["dataset"] == dataset]
        groups.append((str(dataset), panel, panel["n train images"]))
    panels = _image_count_panels(groups, scratch_in_every_panel=True)
    return _image_count_figure(panels, _several(data["model"]), "Dice (target test)")


def plot_per_class_dice_vs_n_images(table: pd.DataFrame) -> tuple[Figure, str]:
    """Per-class data-scarcity curves: each foreground class's Dice (pooled over the test images; the
    per-image mean for records without it) vs the number of target training images, one panel per dataset
    and class, a line per starting point run with two or more numbers of images (mean ± sd over seeds).
    A class mean can fall while a class rises: this figure shows which class moved."""
    from medxfer.report.tables import per_class_long

    long = per_class_long(table[table["test set"] == "target"])
    if long.empty or long["n train images"].nunique() < 2:
        raise SkipFigure("needs target-test runs with two or more numbers of training images")
    metric = "pooled Dice" if long["pooled Dice"].notna().any() else "per-image Dice"
    long = long.assign(**{VALUE: long[metric]}).dropna(subset=[VALUE])
    groups = [(f"{dataset}: {name}", panel, long["n train images"])
              for (dataset, name), panel in long.groupby(["dataset", "class"], sort=False)]
    panels = _image_count_panels(groups, scratch_in_every_panel=False)
    return _image_count_figure(panels, _several(long["model"]), f"{metric} (target test)"), f"y: {metric} per class"


IMAGE_COUNT_ARM = ["model", "strategy", "pretraining length", "pretraining scheme"]


def _arms_over_image_counts(panel: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """The starting points (model, strategy, length, scheme) of ``panel`` run with two or more numbers of
    training images, each with its rows."""
    return [(key, rows) for key, rows in panel.groupby(IMAGE_COUNT_ARM, dropna=False)
            if rows["n train images"].nunique() >= 2]


def _image_count_panels(groups: list[tuple[str, pd.DataFrame, pd.Series]],
                        scratch_in_every_panel: bool) -> list[tuple[str, list, pd.Series]]:
    """The panels of an image-count figure from ``(title, rows, image counts for the x ticks)`` groups: the arms
    of each group (:func:`_arms_over_image_counts`), scratch first, at most ``MAX_LEGEND_ENTRIES`` lines per
    panel. ``scratch_in_every_panel``: every panel of a group repeats its scratch lines (the reference of the
    Dice figure), else they are drawn once (the per-class figure has a panel per class already)."""
    panels = []
    for title, rows, counts in groups:
        arms = _arms_over_image_counts(rows)
        scratch = [arm for arm in arms if arm[0][1] == "scratch"]
        others = [arm for arm in arms if arm[0][1] != "scratch"]
        parts = _with_own_scratch(scratch, others) if scratch_in_every_panel else chunks(scratch + others)
        panels += [(title, part, counts) for part in parts if part]
    return panels


def _with_own_scratch(scratch: list, others: list) -> list[list]:
    """``others`` in panels of at most ``MAX_LEGEND_ENTRIES`` lines, each panel led by the scratch lines of the
    models it shows (a model's reference is its own scratch run); scratch lines of models with no other arm get
    panels of their own."""
    scratch_of = {arm[0][0]: [s for s in scratch if s[0][0] == arm[0][0]] for arm in scratch + others}
    parts, part = [], []

    def references(arms):
        return [s for model in dict.fromkeys(a[0][0] for a in arms) for s in scratch_of[model]]

    for arm in others:
        if part and len(part) + 1 + len(references(part + [arm])) > MAX_LEGEND_ENTRIES:
            parts.append(references(part) + part)
            part = []
        part.append(arm)
    if part:
        parts.append(references(part) + part)
    shown = {arm[0][0] for arm in others}
    return parts + chunks([s for s in scratch if s[0][0] not in shown])


def _image_count_figure(panels: list[tuple[str, list, pd.Series]], show_model: bool, ylabel: str) -> Figure:
    """A panel per ``(title, arms, image counts for the x ticks)``: a line per arm, mean ± sd over seeds
    against the number of training images (scratch dashed, in black)."""
    if not panels:
        raise SkipFigure("no starting point was run with two or more numbers of training images")
    figure, axes = _panel_grid(len(panels))
    for ax, (title, arms, counts) in zip(axes, panels):
        for (model, strategy, length, scheme), rows in arms:
            label = (f"{model}, " if show_model else "") + arm_label(strategy, length, scheme) + _seeds_text(rows, "n train images")
            style = {"color": "black", "linestyle": "--"} if strategy == "scratch" else {}
            _draw_line(ax, _mean_sd(rows, "n train images"), "n train images", label, **style)
        _image_count_axis(ax, counts)
        _finish(ax, ylabel, title)
    return figure


def _image_count_axis(ax, counts: pd.Series) -> None:
    """x: numbers of training images, ticks at the numbers run (never 7.5 images)."""
    values = sorted({int(v) for v in pd.to_numeric(counts, errors="coerce").dropna()})
    ax.set_xticks(values)
    ax.set_xlabel("target training images")


def plot_source_vs_target(table: pd.DataFrame) -> Figure:
    """What is kept of the source task: source-test vs target-test Dice of each run (points) and the
    mean ± sd of each starting point (crosses)."""
    source = table[(table["test set"] == "source") & table[VALUE].notna()]
    if source.empty:
        raise SkipFigure("no run was evaluated on a source test set (evaluation.source_test)")
    target = _target_rows(table)[["run id", VALUE]].rename(columns={VALUE: "target"})
    pairs = source.rename(columns={VALUE: "source"}).merge(target, on="run id")
    if pairs.empty:
        raise SkipFigure("no run has both a source and a target test result")
    keys = ["strategy", "pretraining length", "pretraining scheme", "n train images"]
    panels = []  # at most MAX_LEGEND_ENTRIES - 1 set-ups per panel (room for the baseline's line)
    for dataset in sorted(pairs["dataset"].unique()):
        groups = list(pairs[pairs["dataset"] == dataset].groupby(keys, dropna=False))
        panels += [(dataset, part) for part in chunks(groups, MAX_LEGEND_ENTRIES - 1) if part]
    figure, axes = _panel_grid(len(panels))
    for ax, (dataset, groups) in zip(axes, panels):
        panel = pd.concat([rows for _, rows in groups])
        for (strategy, length, scheme, n_images), rows in groups:
            label = f"{arm_label(strategy, length, scheme)}, {images_label(n_images, rows)}"
            points = ax.scatter(rows["target"], rows["source"], s=18, alpha=0.6)
            ax.errorbar(rows["target"].mean(), rows["source"].mean(), xerr=rows["target"].std(ddof=1) or 0.0,
                        yerr=rows["source"].std(ddof=1) or 0.0, marker="x", capsize=3, label=label,
                        color=points.get_facecolor()[0])
        baseline = table[(table["test set"] == SOURCE_BEFORE) & table["run id"].isin(panel["run id"])][VALUE]
        if baseline.notna().any():
            ax.axhline(float(baseline.mean()), linestyle=":", color="black", linewidth=1.5,
                       label="starting model, before fine-tuning")
        ax.set_xlabel("Dice, target test")
        _finish(ax, "Dice, source test", f"{dataset}: source kept after fine-tuning")
        low, high = ax.get_xlim()
        if high - low < MIN_DICE_SPAN:
            centre = min(max((low + high) / 2, MIN_DICE_SPAN / 2), 1 - MIN_DICE_SPAN / 2)
            ax.set_xlim(centre - MIN_DICE_SPAN / 2, centre + MIN_DICE_SPAN / 2)
    return figure


def plot_transferability_vs_length(robustness: Optional[pd.DataFrame],
                                   table: Optional[pd.DataFrame] = None) -> tuple[Figure, str]:
    """The robustness score vs pretraining length (default variant), a line per encoder and level; the length
    axis says what a length counts when the run records (``table``) agree on it."""
    unit = length_unit(table) if table is not None else ""
    if robustness is None or robustness.empty:
        raise SkipFigure("no robustness.csv in the results folder")
    variant, description = default_variant(robustness)
    variant = variant[variant["robustness"].notna() & variant["pretraining_length"].notna()]
    if variant["pretraining_length"].nunique() < 2:
        raise SkipFigure("robustness.csv has fewer than two pretraining lengths for the default variant")
    keys = ["dataset", "encoder", "pretraining_scheme"]
    variant = variant.assign(dataset=variant["dataset"].astype(str))
    groups = list(variant.groupby(keys, dropna=False, sort=True))
    figure, axes = _panel_grid(len(groups))
    for ax, ((dataset, encoder, scheme), panel) in zip(axes, groups):
        for level, rows in panel.groupby("level", dropna=False):
            stats = rows.groupby("pretraining_length")["robustness"].mean().sort_index()
            ax.plot(stats.index.to_numpy(float), stats.to_numpy(float), marker="o", label=f"level {level}")
        _length_axis(ax, variant["pretraining_length"].to_numpy(float), unit)
        title = f"{dataset}: {encoder} {scheme}".strip()
        _finish(ax, "robustness score (lower = more robust)", f"{title}\n({description})", min_span=MIN_SCORE_SPAN,
                limits=None)
    return figure, description


def score_dice_pairs(table: pd.DataFrame, robustness: Optional[pd.DataFrame]) -> pd.DataFrame:
    """(robustness at the deepest level of the default variant, mean downstream Dice) per dataset,
    strategy, n images and pretraining length. Joined on the model too where encoder names match."""
    if robustness is None or robustness.empty:
        return pd.DataFrame()
    variant, _ = default_variant(robustness)
    scores = deepest_level(variant)
    scores = scores[scores["robustness"].notna() & scores["pretraining_length"].notna()]
    downstream = scratch_as_full_at_length_zero(_target_rows(table))
    downstream = downstream[(downstream["strategy"] != "scratch") & downstream["pretraining length"].notna()]
    if scores.empty or downstream.empty:
        return pd.DataFrame()
    by_model = bool(set(scores["encoder"]) & set(downstream["model"].astype(str)))
    score_keys = ["dataset", "pretraining_length"] + (["encoder"] if by_model else [])
    scores = scores.groupby(score_keys)["robustness"].mean().reset_index()
    scores = scores.rename(columns={"pretraining_length": "pretraining length", "encoder": "model"})
    keys = ["dataset", "model", "strategy", "n train images", "pretraining length"]
    dice = downstream.groupby(keys)[VALUE].agg(["mean", "count"]).reset_index()
    dice = dice.rename(columns={"mean": "dice mean", "count": "n seeds"})
    dice["dataset"] = dice["dataset"].astype(str)
    scores["dataset"] = scores["dataset"].astype(str)
    return dice.merge(scores, on=["dataset", "pretraining length"] + (["model"] if by_model else []))


def score_dice_correlations(pairs: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation between score and mean Dice per dataset / model / strategy / n images
    (over pretraining lengths); NaN with fewer than 3 lengths."""
    from scipy import stats

    rows = []
    if pairs.empty:
        return pd.DataFrame(columns=["dataset", "model", "strategy", "n train images", "n lengths", "spearman rho",
                                     "p value"])
    for key, group in pairs.groupby(["dataset", "model", "strategy", "n train images"]):
        rho, p = math.nan, math.nan
        if len(group) >= 3 and group["robustness"].nunique() > 1 and group["dice mean"].nunique() > 1:
            result = stats.spearmanr(group["robustness"], group["dice mean"])
            rho, p = float(result.statistic), float(result.pvalue)
        rows.append(dict(zip(["dataset", "model", "strategy", "n train images"], key),
                         **{"n lengths": len(group), "spearman rho": rho, "p value": p}))
    return pd.DataFrame(rows)


def plot_score_vs_dice(table: pd.DataFrame, robustness: Optional[pd.DataFrame]) -> Figure:
    """Transferability score (deepest level) vs downstream Dice, one colour per strategy / n images,
    with the Spearman rank correlation of each in the legend."""
    if robustness is None or robustness.empty:
        raise SkipFigure("no robustness.csv in the results folder")
    pairs = score_dice_pairs(table, robustness)
    if pairs.empty:
        raise SkipFigure("no pretrained run shares a dataset and pretraining length with robustness.csv")
    correlations = score_dice_correlations(pairs).set_index(["dataset", "model", "strategy", "n train images"])
    datasets = sorted(pairs["dataset"].unique())
    figure, axes = new_figure(1, len(datasets))
    show_model = _several(pairs["model"])
    for c, dataset in enumerate(datasets):
        ax = axes[0, c]
        panel = pairs[pairs["dataset"] == dataset]
        for key, rows in panel.groupby(["dataset", "model", "strategy", "n train images"]):
            if len(rows) < 2:  # one length (e.g. scratch alone at a size no checkpoint was run with): no curve
                continue
            rho = correlations.loc[key, "spearman rho"]
            rho_text = "n/a" if math.isnan(rho) else f"{rho:+.2f}"
            label = (f"{key[1]}, " if show_model else "") + f"{key[2]}, {int(key[3])} images: rho {rho_text}"
            rows = rows.sort_values("pretraining length")  # the line follows pretraining, checkpoint by checkpoint
            ax.plot(rows["robustness"], rows["dice mean"], marker="o", linestyle=":", label=label)
            for _, row in rows.iterrows():
                ax.annotate(f"{row['pretraining length']:g}", (row["robustness"], row["dice mean"]),
                            fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("robustness score, deepest level (lower = more robust)")
        _finish(ax, "mean Dice (target test)", f"{dataset}\n(point labels: pretraining length; line in length order)")
        low, high = ax.get_xlim()
        if high - low < MIN_SCORE_SPAN:
            centre = (low + high) / 2
            ax.set_xlim(centre - MIN_SCORE_SPAN / 2, centre + MIN_SCORE_SPAN / 2)
    return figure


def pareto_front(saved: np.ndarray, regret: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both axes (saves at least as much with no more regret,
    better on one), ordered by saving."""
    saved, regret = np.asarray(saved, dtype=float), np.asarray(regret, dtype=float)
    keep = [i for i in range(len(saved))
            if not np.any((saved >= saved[i]) & (regret <= regret[i]) & ((saved > saved[i]) | (regret < regret[i])))]
    return np.array(sorted(keep, key=lambda i: (saved[i], regret[i])), dtype=int)


def plot_regret_vs_saved(summary: pd.DataFrame, recommended: Optional[str] = None,
                         min_saved: float = 0.5) -> Figure:
    """Mean Dice regret against mean pretraining saved, one point per rule (``medxfer analyze``'s summary):
    out-of-sample rules in colour with their Pareto front, in-sample choices faint, oracles (bounds) as
    squares, the recommended rule as a star and the goal (saves >= ``min_saved`` with no more regret than
    always pretraining longest) shaded. Only rules covering every group are drawn (like with like)."""
    if summary.empty:
        raise SkipFigure("no rule was evaluated")
    full = summary[summary["n_groups"] == summary["n_groups"].max()]
    out_of_sample = ~full["bound"] & (full["evaluation"] != "in-sample") & (full["family"] != "score")
    figure, axes = new_figure(1, 1)
    ax = axes[0, 0]
    figure.set_size_inches(7.0, 5.0)
    faint = full[~out_of_sample & ~full["bound"]]
    ax.scatter(faint["saved_mean"], faint["regret_mean"], s=8, c="lightgray", label="in-sample choices")
    honest = full[out_of_sample]
    for family, frame in honest.groupby("family"):
        ax.scatter(frame["saved_mean"], frame["regret_mean"], s=36, label=family, alpha=0.9)
    front = honest.iloc[pareto_front(honest["saved_mean"].to_numpy(), honest["regret_mean"].to_numpy())]
    ax.plot(front["saved_mean"], front["regret_mean"], "k--", lw=1, label="Pareto front (out of sample)")
    bounds = full[full["bound"]]
    ax.scatter(bounds["saved_mean"], bounds["regret_mean"], marker="s", s=50, c="tab:green", label="oracle (bound)")
    longest = full[full["rule"] == "always longest"]
    if len(longest):
        ax.fill_between([min_saved, 1.0], 0, float(longest["regret_mean"].iloc[0]), color="tab:green", alpha=0.12,
                        label=f"goal: saves >= {min_saved:.0%}, regret <= always longest")
    if recommended is not None and recommended in set(full["rule"]):
        rec = full[full["rule"] == recommended].iloc[0]
        ax.scatter([rec["saved_mean"]], [rec["regret_mean"]], marker="*", s=240, c="gold", edgecolors="k",
                   label="recommended", zorder=5)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("mean fraction of pretraining saved (at the stopped length)")
    ax.set_ylabel("mean Dice regret vs the best length")
    ax.set_title(f"stop rules on {int(full['n_groups'].iloc[0])} groups", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return figure


MAX_CURVE_PANELS = 12  # learning-curve panels in one figure; the rest are named in the caption


def plot_learning_curves(records: list[dict]) -> tuple[Figure, str]:
    """Small multiples of the runs' learning curves (the record's ``curves``): one panel per dataset, starting
    point and number of training images, a line per seed of the validation headline against the step (left
    axis) and its training loss per logged step (thin, right axis). A run the convergence rule flags as not
    converged ends in a red cross, and the panel title counts them."""
    runs = [r for r in records if (r.get("curves") or {}).get("val") or (r.get("curves") or {}).get("train_loss")]
    if not runs:
        raise SkipFigure("no run record holds learning curves (records written before runs kept them)")
    groups: dict[tuple, list[dict]] = {}
    for record in runs:
        pre = record.get("pretraining") or {}
        key = (str(record.get("dataset")), arm_label(record.get("strategy"), pre.get("length"), pre.get("scheme") or ""),
               int(record.get("n_train_images") or 0))
        groups.setdefault(key, []).append(record)
    keys = sorted(groups)
    shown = keys[:MAX_CURVE_PANELS]
    figure, axes = _panel_grid(len(shown))
    for ax, key in zip(axes, shown):
        loss_ax = ax.twinx()
        unconverged = 0
        for record in sorted(groups[key], key=lambda r: r.get("seed", 0)):
            curves = record["curves"]
            val = np.asarray(curves.get("val") or [], dtype=float).reshape(-1, 2)
            loss = np.asarray(curves.get("train_loss") or [], dtype=float).reshape(-1, 2)
            line = ax.plot(val[:, 0], val[:, 1], marker=".", markersize=3, label=f"seed {record.get('seed')}")[0] \
                if len(val) else None
            color = line.get_color() if line is not None else None
            if len(loss):
                loss_ax.plot(loss[:, 0], loss[:, 1], linewidth=0.7, alpha=0.45, color=color)
            if not_converged((record.get("convergence") or {}).get("converged")):
                unconverged += 1
                if len(val):
                    ax.plot(val[-1, 0], val[-1, 1], marker="x", color="red", markersize=9, mew=2)
        loss_ax.set_ylabel("training loss (thin)", fontsize=7)
        loss_ax.tick_params(labelsize=7)
        ax.set_xlabel("step")
        dataset, arm, n_images = key
        flag = f"; {unconverged} of {len(groups[key])} runs not converged" if unconverged else ""
        metric = next((r["curves"].get("val_metric") for r in groups[key] if r["curves"].get("val_metric")),
                      "validation Dice")
        _finish(ax, metric, f"{dataset}, {arm}, {n_images} images{flag}")
    detail = (f"{len(keys) - len(shown)} more configuration(s) not drawn: "
              + "; ".join(f"{d}, {a}, {n} images" for d, a, n in keys[len(shown):])) if len(keys) > len(shown) else ""
    return figure, detail
