"""Overlays: an image with label contours coloured per class, and the report's grid of chosen runs.

The grid re-runs saved models (``runs/<id>/model.pt``) on the first few test cases of the dataset
their record names, preprocessed exactly as the run was (``medxfer.inference``): column 1 the image,
column 2 the ground truth, then one column per run. A 3D case shows the axial slice (first spatial
axis) with the most ground-truth foreground.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medxfer.config import DataConfig, EvalConfig, parse_config
from medxfer.data import load_data
from medxfer.data.preprocess import is_preprocessed
from medxfer.data.base import IGNORE_INDEX
from medxfer.errors import MedxferError
from medxfer.inference import label_map, load_trained_model, preprocessing_from_record, probabilities
from medxfer.io import stable_hash
from medxfer.report.plots import SkipFigure, new_figure
from medxfer.report.tables import arm_label

log = logging.getLogger(__name__)

# tab10 without its grey, so that every foreground class has a clear colour.
CLASS_COLOURS = ["#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22",
                 "#8c564b"]


def class_colour(class_index: int) -> str:
    return CLASS_COLOURS[(class_index - 1) % len(CLASS_COLOURS)]


def slice_index(label: Optional[np.ndarray], depth: int) -> int:
    """The slice (first spatial axis) with the most foreground, else the middle one."""
    if label is not None:
        foreground = ((label > 0) & (label != IGNORE_INDEX)).reshape(label.shape[0], -1).sum(1)
        if foreground.max() > 0:
            return int(foreground.argmax())
    return depth // 2


def display_image(image: np.ndarray, index: Optional[int] = None) -> np.ndarray:
    """A ``(C, *S)`` image as a 2D grey ``(H, W)`` or RGB ``(H, W, 3)`` array in [0, 1] (1-99th
    percentile window); ``index`` picks the slice of a volume."""
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2 if index is None else index]
    image = image.astype(np.float32)
    shown = image[:3].transpose(1, 2, 0) if image.shape[0] >= 3 else image[0]
    lo, hi = np.percentile(shown, (1, 99))
    return np.clip((shown - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(shown)


def draw_contours(ax, label2d: np.ndarray, n_classes: int, linewidth: float = 1.0) -> None:
    """Contours of every foreground class of a 2D label map, one colour per class."""
    for c in range(1, n_classes):
        mask = label2d == c
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[class_colour(c)], linewidths=linewidth)


def class_handles(n_classes: int, class_names: Optional[Sequence[str]] = None) -> list[Line2D]:
    return [Line2D([0], [0], color=class_colour(c), lw=2,
                   label=class_names[c] if class_names and c < len(class_names) else f"class {c}")
            for c in range(1, n_classes)]


def class_legend(ax, n_classes: int, class_names: Optional[Sequence[str]] = None) -> None:
    """The class colours, below the image (never over it)."""
    handles = class_handles(n_classes, class_names)
    if handles:
        ax.legend(handles=handles, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.02),
                  ncol=min(len(handles), 4), frameon=False)


def overlay_figure(image: np.ndarray, label: np.ndarray, n_classes: int, title: str = "",
                   class_names: Optional[Sequence[str]] = None) -> Figure:
    """One image ``(C, *S)`` with the contours of ``label`` (``*S``): what ``predict`` writes per input; the
    legend names the classes (``class_names``, background first) where the run recorded them."""
    index = slice_index(label, label.shape[0]) if label.ndim == 3 else None
    figure, axes = new_figure(1, 1)
    ax = axes[0, 0]
    ax.imshow(display_image(image, index), cmap="gray", interpolation="nearest")
    draw_contours(ax, label[index] if index is not None else label, n_classes)
    class_legend(ax, n_classes, class_names)
    ax.set_title(title + (f" (slice {index})" if index is not None else ""), fontsize=8)
    ax.set_axis_off()
    return figure


# ------------------------------------------------------------------------------------- the run grid
def _has_model(results_dir: Path, record: dict[str, Any]) -> bool:
    return (results_dir / "runs" / str(record.get("run_id")) / "model.pt").is_file()


def _target_dice(record: dict[str, Any]) -> float:
    values = ((record.get("metrics") or {}).get("target") or {}).get("per_image_mean") or {}
    for key in ("dice index", "mean dice index"):
        value = values.get(key)
        if value is not None and value == value:
            return float(value)
    return float("nan")


def _arm(record: dict[str, Any]) -> str:
    pre = record.get("pretraining") or {}
    return arm_label(record.get("strategy"), pre.get("length"), pre.get("scheme") or "")


def select_overlay_runs(results_dir: str | Path, records: Sequence[dict[str, Any]], max_runs: int = 5) -> list[dict]:
    """Runs worth showing side by side: on the dataset with the most saved models and the lowest seed,
    a scratch run (the baseline, fewest images) then the best starting point's runs by number of images."""
    results_dir = Path(results_dir)
    candidates = [r for r in records if _has_model(results_dir, r) and (r.get("metrics") or {}).get("target")]
    if not candidates:
        return []
    datasets = sorted({str(r.get("dataset")) for r in candidates})
    dataset = max(datasets, key=lambda d: sum(str(r.get("dataset")) == d for r in candidates))
    candidates = [r for r in candidates if str(r.get("dataset")) == dataset]
    seed = min(r.get("seed", 0) for r in candidates)
    candidates = [r for r in candidates if r.get("seed", 0) == seed]
    by_images = lambda r: (r.get("n_train_images") or 0, r.get("run_id"))  # noqa: E731
    scratch = sorted((r for r in candidates if r.get("strategy") == "scratch"), key=by_images)
    pretrained = [r for r in candidates if r.get("strategy") != "scratch"]
    chosen = scratch[:1]
    if pretrained:
        arms: dict[str, list[dict]] = {}
        for r in pretrained:
            arms.setdefault(_arm(r), []).append(r)
        best = max(sorted(arms), key=lambda a: np.nanmean([_target_dice(r) for r in arms[a]] or [np.nan]))
        runs = sorted(arms[best], key=by_images)
    else:
        runs = scratch[1:]
    room = max_runs - len(chosen)
    if len(runs) > room:
        runs = [runs[int(i)] for i in np.linspace(0, len(runs) - 1, room).round().astype(int)]
    return chosen + runs


def max_overlays(record: dict[str, Any]) -> int:
    """The run config's ``evaluation.max_overlays`` (its default for a record that predates it)."""
    value = ((record.get("config") or {}).get("evaluation") or {}).get("max_overlays")
    return int(EvalConfig.model_fields["max_overlays"].default if value is None else value)


def _data_key(record: dict[str, Any]) -> str:
    data = dict((record.get("config") or {}).get("data") or {})
    data.pop("train_images", None)  # the test split does not depend on the training subset
    data.pop("subset", None)
    return stable_hash(data)


def _case_dice(record: dict[str, Any], case_id: str) -> Optional[float]:
    for row in ((record.get("metrics") or {}).get("target") or {}).get("per_image") or []:
        if row.get("case_id") == case_id:
            value = row.get("dice index", row.get("mean dice index"))
            return None if value is None else float(value)
    return None


def cases_to_show(cases: Sequence[Any], n_cases: int) -> list:
    """The labelled cases with the most foreground classes, then the most foreground pixels (ties: dataset
    order), shown in dataset order, so that the overlays show the structures rather than empty slices."""
    labelled = [(i, c) for i, c in enumerate(cases) if c.label is not None]

    def content(item: tuple[int, Any]) -> tuple[int, int, int]:
        i, case = item
        valid = case.label[case.label != IGNORE_INDEX]
        return (-len(np.setdiff1d(np.unique(valid), [0])), -int((valid > 0).sum()), i)

    chosen = sorted(sorted(labelled, key=content)[:n_cases], key=lambda item: item[0])
    return [case for _, case in chosen]


def plot_overlay_grid(results_dir: str | Path, records: Sequence[dict[str, Any]], n_cases: int = 3,
                      run_ids: Optional[Sequence[str]] = None, max_runs: int = 5) -> tuple[Figure, str]:
    """Image | ground truth | prediction of each chosen run, for up to ``n_cases`` test cases, and no more than
    the runs' configs allow (``evaluation.max_overlays``, the smallest among the runs shown; 0 = no grid).
    Returns the figure and a one-line description of what it shows."""

    results_dir = Path(results_dir)
    if run_ids:
        wanted = set(run_ids)
        runs = [r for r in records if r.get("run_id") in wanted and _has_model(results_dir, r)]
    else:
        runs = select_overlay_runs(results_dir, records, max_runs)
    if not runs:
        raise SkipFigure("no run folder keeps a model.pt to re-run on test cases")
    key = _data_key(runs[0])
    runs = [r for r in runs if _data_key(r) == key]
    n_cases = min(n_cases, *(max_overlays(r) for r in runs))
    if n_cases <= 0:
        raise SkipFigure("evaluation.max_overlays is 0 in the configs of the runs shown")
    try:
        data_config = parse_config((runs[0].get("config") or {}).get("data"), DataConfig, source="record data")
        data = load_data(data_config)
    except MedxferError as exc:
        raise SkipFigure(f"cannot load the test data of run {runs[0].get('run_id')}: {exc}") from None
    cases = cases_to_show(data.test, n_cases)
    if not cases:
        raise SkipFigure(f"dataset {data.name} has no labelled test case")

    columns: list[tuple[str, Any, dict]] = []
    for record in runs:
        try:
            model, _ = load_trained_model(results_dir / "runs" / record["run_id"])
        except MedxferError as exc:
            log.warning("overlay grid: run %s skipped: %s", record.get("run_id"), exc)
            continue
        columns.append((f"{_arm(record)}\n{record.get('n_train_images')} images", model, record))
    if not columns:
        raise SkipFigure("no saved model of the chosen runs could be loaded")

    figure, axes = new_figure(len(cases), 2 + len(columns))
    figure.set_size_inches(2.3 * (2 + len(columns)), 2.4 * len(cases))
    for r, case in enumerate(cases):
        index = slice_index(case.label, case.label.shape[0]) if case.label.ndim == 3 else None
        shown = display_image(case.image, index)
        pick = (lambda a: a[index]) if index is not None else (lambda a: a)  # noqa: E731
        for c in range(2 + len(columns)):
            axes[r, c].imshow(shown, cmap="gray", interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(case.case_id + (f"\nslice {index}" if index is not None else ""), fontsize=7)
        draw_contours(axes[r, 1], pick(case.label), data.n_classes)
        for c, (title, model, record) in enumerate(columns, start=2):
            settings = preprocessing_from_record(record)
            if is_preprocessed(case):  # read from the cache: already resampled and normalised by the plan
                settings = {**settings, "plan": None, "normalization": "none"}
            probs = probabilities(model, case.image, settings)
            draw_contours(axes[r, c], pick(label_map(probs, settings["threshold"])), data.n_classes)
            dice = _case_dice(record, case.case_id)
            axes[r, c].set_xlabel("" if dice is None else f"Dice {dice:.2f}", fontsize=7)
            if r == 0:
                axes[r, c].set_title(title, fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
            axes[r, 1].set_title("ground truth", fontsize=7)
    handles = class_handles(data.n_classes, data.class_names)
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8,
                      frameon=False)
    seed = columns[0][2].get("seed")
    return figure, f"{data.name}, seed {seed}: {len(columns)} run(s) on {len(cases)} test case(s)"
