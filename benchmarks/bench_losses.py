"""Loss selection: ``auto`` against every fixed loss on small synthetic tasks with known answers.

Each task is one regime that :func:`medxfer.training.losses.select_loss` tells apart (balanced, small
objects under 0.5% of the image, a rare class present in few training cases, many classes, sparse
labels), in 2D and in 3D. A tiny U-Net (medxfer's ``unet`` / ``unet3d`` preset) is trained for a few
Adam steps with each loss, on the same seeds (model initialisation and batch order), and scored on
held-out cases with the pooled Dice per foreground class (sums over all test cases, then the mean over
classes). The predicted foreground fraction is compared with the truth, overall and per class, to catch
the "foreground everywhere" collapse.

Target: ``auto`` within 0.02 Dice of the best fixed loss on every task (means over seeds), and no
collapse (the predicted foreground fraction within 2x of the truth; the largest ratio of a single class is
reported beside it).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from common import NOTES_KEY, RESULTS, row, write_result

from medxfer.io import atomic_write_text
from medxfer.models import build_segmenter
from medxfer.training.losses import LOSS_NAMES, PARTIAL_PREFIX, build_loss, label_statistics, select_loss

TASKS = ("balanced", "small_objects", "rare_class_few_cases", "many_classes", "sparse_labels")
SHAPES = {2: (48, 48), 3: (16, 16, 16)}
SEEDS = (0, 1)
STEPS = {2: 100, 3: 300}
BATCH = {2: 4, 3: 2}
N_TRAIN, N_TEST = 8, 4
DICE_MARGIN = 0.02  # auto may trail the best fixed loss by this much
COLLAPSE_FACTOR = 2.0  # predicted foreground fraction beyond [truth / 2, 2 * truth]: collapse
NOISE = 0.35
LR = 3e-2


@dataclass
class Task:
    name: str
    spatial_dims: int
    n_classes: int
    train_images: list[np.ndarray]  # (1, *S) float32
    train_labels: list[np.ndarray]  # (*S) int64
    test_images: list[np.ndarray]
    test_labels: list[np.ndarray]
    annotated: Optional[list[Optional[tuple[int, ...]]]] = None  # per training case; None = all
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.name} {self.spatial_dims}D"


# ------------------------------------------------------------------------------------------- tasks


def _ellipsoid(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def _blob(rng: np.random.Generator, shape: Sequence[int], fraction: float, jitter: float = 0.15) -> np.ndarray:
    """An ellipsoid covering about ``fraction`` of the image, at a random place inside it."""
    n_dims, n_pixels = len(shape), float(np.prod(shape))
    unit_volume = np.pi if n_dims == 2 else 4 * np.pi / 3
    radius = (fraction * n_pixels / unit_volume) ** (1 / n_dims)
    radii = radius * rng.uniform(1 - jitter, 1 + jitter, size=n_dims)
    centre = [rng.uniform(r + 1, n - r - 2) if n - r - 2 > r + 1 else (n - 1) / 2 for r, n in zip(radii, shape)]
    return _ellipsoid(shape, centre, radii)


def _image(label: np.ndarray, means: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    image = np.asarray(means, dtype=np.float32)[label] + rng.normal(0, NOISE, label.shape).astype(np.float32)
    return image[None]


def _labels(name: str, shape: tuple[int, ...], rng: np.random.Generator, case: int, train: bool) -> np.ndarray:
    """One label map of task ``name``; ``case`` decides which cases hold the rare class."""
    label = np.zeros(shape, dtype=np.int64)
    if name == "balanced":  # one object of ~40% of the image
        label[_blob(rng, shape, 0.4, jitter=0.05)] = 1
    elif name == "small_objects":  # one object of ~0.35% of the image
        label[_blob(rng, shape, 0.0035, jitter=0.05)] = 1
    elif name == "rare_class_few_cases":  # a big object everywhere, a small "lesion" in 2 of 8 training cases
        label[_blob(rng, shape, 0.25)] = 1
        if (case in (0, 1)) if train else (case % 2 == 0):
            label[_blob(rng, shape, 0.015, jitter=0.05)] = 2
    elif name == "many_classes":  # six classes of 2-8% each
        for k, fraction in enumerate((0.08, 0.06, 0.045, 0.035, 0.025, 0.02), start=1):
            label[_blob(rng, shape, fraction)] = k
    elif name == "sparse_labels":  # two classes; half the training cases annotate only class 1
        label[_blob(rng, shape, 0.15)] = 1
        label[_blob(rng, shape, 0.04)] = 2
    else:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return label


N_CLASSES = {"balanced": 2, "small_objects": 2, "rare_class_few_cases": 3, "many_classes": 7, "sparse_labels": 3}
MEANS = {"balanced": (0.0, 1.0), "small_objects": (0.0, 1.5), "rare_class_few_cases": (0.0, 1.0, 2.0),
         "many_classes": (0.0, 1.5, -1.5, 3.0, -3.0, 4.5, -4.5), "sparse_labels": (0.0, 1.0, -1.0)}


def make_task(name: str, spatial_dims: int, shape: Optional[tuple[int, ...]] = None,
              n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 1234) -> Task:
    """Task ``name`` with seeded label maps and noisy images (``seed`` fixes the data, not the training)."""
    shape = tuple(shape or SHAPES[spatial_dims])
    rng = np.random.default_rng([seed, spatial_dims, TASKS.index(name)])
    labels = {"train": [], "test": []}
    images = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for case in range(n):
            label = _labels(name, shape, rng, case, train=split == "train")
            labels[split].append(label)
            images[split].append(_image(label, MEANS[name], rng))
    annotated = None
    if name == "sparse_labels":
        annotated = [(1,) if case % 2 else None for case in range(n_train)]
        for case, entry in enumerate(annotated):
            if entry is not None:  # class 2 not annotated: its pixels read as background in the label map
                labels["train"][case] = np.where(labels["train"][case] == 2, 0, labels["train"][case])
    return Task(name, spatial_dims, N_CLASSES[name], images["train"], labels["train"], images["test"],
                labels["test"], annotated)


# -------------------------------------------------------------------------------------- train, score


def fixed_losses(task: Task) -> list[str]:
    """Every fixed loss name, as the partial (marginal) version where the task has sparse labels."""
    prefix = PARTIAL_PREFIX if task.annotated is not None else ""
    return [prefix + name for name in LOSS_NAMES]


def auto_choice(task: Task) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    stats = label_statistics(task.train_labels, task.n_classes, task.annotated)
    name, options, reason = select_loss(stats)
    return name, options, reason, stats


def _model(task: Task, width: int):
    preset = "unet" if task.spatial_dims == 2 else "unet3d"
    return build_segmenter(preset=preset, in_channels=1, n_classes=task.n_classes, width=width, depth=3)


def train_and_score(task: Task, loss_name: str, options: dict[str, Any], seed: int, steps: int,
                    batch_size: int, width: int = 8, lr: float = LR) -> dict[str, Any]:
    """Train a fresh tiny U-Net on the task with one loss; pooled Dice and foreground fractions on its test cases."""
    torch.manual_seed(seed)
    model = _model(task, width)
    loss_fn = build_loss(loss_name, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    images = torch.from_numpy(np.stack(task.train_images))
    labels = torch.from_numpy(np.stack(task.train_labels))
    annotated = task.annotated
    order = np.random.default_rng(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = order.choice(len(images), size=min(batch_size, len(images)), replace=False)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images[batch])
        loss = loss_fn(logits, labels[batch], None if annotated is None else [annotated[i] for i in batch])
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(np.stack(task.test_images))).argmax(1).numpy()
    truth = np.stack(task.test_labels)
    return {"loss": loss_name, "options": options, "seed": seed, "train_s": train_s,
            **score(predicted, truth, task.n_classes)}


def score(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Pooled Dice per foreground class and predicted / true fractions (per class and all foreground)."""
    dice, pred_fraction, true_fraction = [], [], []
    for k in range(1, n_classes):
        p, g = predicted == k, truth == k
        tp, n_p, n_g = int(np.count_nonzero(p & g)), int(np.count_nonzero(p)), int(np.count_nonzero(g))
        dice.append(1.0 if n_p + n_g == 0 else 2 * tp / (n_p + n_g))
        pred_fraction.append(n_p / p.size)
        true_fraction.append(n_g / g.size)
    fg_pred, fg_true = float(np.mean(predicted > 0)), float(np.mean(truth > 0))
    return {"dice": float(np.mean(dice)), "class_dice": dice, "pred_fraction": pred_fraction,
            "true_fraction": true_fraction, "fg_ratio": fg_pred / fg_true,
            "collapsed": collapsed(fg_pred, fg_true)}


def collapsed(fg_pred: float, fg_true: float) -> bool:
    """Issue 22's collapse: the predicted foreground fraction outside [truth / 2, 2 x truth]. (A single class
    over-predicted is reported as ``max_class_ratio`` beside it.)"""
    return not (fg_true / COLLAPSE_FACTOR <= fg_pred <= COLLAPSE_FACTOR * fg_true)


def _job(args: tuple) -> dict[str, Any]:
    """One training run in a worker process (the task is rebuilt there: cheap, seeded, nothing to pickle)."""
    name, spatial_dims, shape, key, loss_name, options, seed, steps, batch_size, width = args
    torch.set_num_threads(1)
    task = _cached_task(name, spatial_dims, shape)
    return {"key": key, **train_and_score(task, loss_name, options, seed, steps, batch_size, width)}


@functools.lru_cache(maxsize=None)
def _cached_task(name: str, spatial_dims: int, shape: Optional[tuple[int, ...]]) -> Task:
    return make_task(name, spatial_dims, shape)


def run_tasks(specs: Sequence[tuple[str, int]], seeds: Sequence[int] = SEEDS, workers: int = 2,
              shape: Optional[dict[int, tuple[int, ...]]] = None, steps: Optional[dict[int, int]] = None,
              width: int = 8) -> list[dict[str, Any]]:
    """``auto`` and every fixed loss on each ``(task name, spatial dims)``, on the same seeds.

    Runs go to ``workers`` processes of one thread each (small convolutions gain little from a second
    thread; two single-thread runs at once use 2 cores fully). Every run seeds itself, so the result does
    not depend on which worker ran it.
    """
    shape, steps = shape or SHAPES, steps or STEPS
    jobs, plans = [], []
    for name, dims in specs:
        task = _cached_task(name, dims, shape[dims])
        auto_name, auto_options, reason, stats = auto_choice(task)
        candidates = {"auto": (auto_name, auto_options)} | {fixed: (fixed, {}) for fixed in fixed_losses(task)}
        plans.append((task, auto_name, auto_options, reason, stats, list(candidates)))
        for seed in seeds:
            for key, (loss_name, options) in candidates.items():
                jobs.append((name, dims, shape[dims], key, loss_name, options, seed, steps[dims], BATCH[dims], width))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_job, jobs))
    else:
        done = [_job(job) for job in jobs]
    results = []
    for task, auto_name, auto_options, reason, stats, keys in plans:
        mine = [(job, run) for job, run in zip(jobs, done) if job[:2] == (task.name, task.spatial_dims)]
        runs = {key: [run for job, run in mine if job[3] == key] for key in keys}
        summary = {key: _summarise(task_runs) for key, task_runs in runs.items()}
        fixed = {key: value for key, value in summary.items() if key != "auto"}
        best = max(fixed, key=lambda key: fixed[key]["dice"])
        gap = summary["auto"]["dice"] - fixed[best]["dice"]
        results.append({
            "task": task.name, "spatial_dims": task.spatial_dims, "shape": list(task.train_labels[0].shape),
            "n_classes": task.n_classes, "seeds": list(seeds), "steps": steps[task.spatial_dims],
            "batch_size": BATCH[task.spatial_dims], "width": width,
            "auto": {"loss": auto_name, "options": auto_options, "reason": reason},
            "min_foreground_fraction": stats["min_foreground_fraction"],
            "imbalance_ratio": stats["imbalance_ratio"], "sparse_cases": stats["sparse_cases"],
            "cases_with_class": stats["cases_with_class"], "summary": summary, "best_fixed": best, "gap": gap,
            "met": bool(gap >= -DICE_MARGIN and not summary["auto"]["any_collapse"]), "runs": runs,
        })
    return results


def _summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    dice = np.array([r["dice"] for r in results])
    ratio = np.array([r["fg_ratio"] for r in results])
    return {"dice": float(dice.mean()), "dice_min": float(dice.min()), "dice_max": float(dice.max()),
            "fg_ratio": float(ratio.mean()), "fg_ratio_max": float(ratio.max()),
            "max_class_ratio": max(max((p / t for p, t in zip(r["pred_fraction"], r["true_fraction"]) if t > 0),
                                       default=0.0) for r in results),
            "any_collapse": any(r["collapsed"] for r in results),
            "train_s": float(np.mean([r["train_s"] for r in results]))}


# ------------------------------------------------------------------------------------------ report


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One line per task: auto's choice, the Dice of every loss (mean over seeds), the verdict."""
    names = list(LOSS_NAMES)
    lines = ["| task | auto -> | auto | " + " | ".join(names) + " | best - auto | auto fg ratio | met |",
             "|---|---|---|" + "---|" * len(names) + "---|---|---|"]
    for result in results:
        summary = result["summary"]
        cells = []
        for name in names:
            key = name if name in summary else PARTIAL_PREFIX + name
            cell = f"{summary[key]['dice']:.3f}"
            if summary[key]["any_collapse"]:
                cell += " (c)"
            cells.append(f"**{cell}**" if key == result["best_fixed"] else cell)
        auto = summary["auto"]
        lines.append(
            f"| {result['task']} {result['spatial_dims']}D | {_describe(result['auto'])} | {auto['dice']:.3f} "
            f"({auto['dice_min']:.3f}-{auto['dice_max']:.3f}) | " + " | ".join(cells)
            + f" | {-result['gap']:+.3f} | {auto['fg_ratio']:.2f} (max class {auto['max_class_ratio']:.2f}) | "
            + ("yes" if result["met"] else "NO") + " |")
    return "\n".join(lines) + "\n"


def _describe(choice: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={_short(v)}" for k, v in choice["options"].items())
    return f"`{choice['loss']}`" + (f" ({options})" if options else "")


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--dims", nargs="*", type=int, default=[2, 3])
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    results = run_tasks([(name, dims) for dims in args.dims for name in args.tasks], args.seeds, args.workers)
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
    for r in results:
        print(f"{r['task']} {r['spatial_dims']}D: auto -> {r['auto']['loss']} {r['summary']['auto']['dice']:.3f}, "
              f"best fixed {r['best_fixed']} {r['summary'][r['best_fixed']]['dice']:.3f}, met {r['met']}")
    table = markdown_table(results)
    rows = [row(f"{r['task']} {r['spatial_dims']}D: Dice of auto ({r['auto']['loss']})", f"best fixed ({r['best_fixed']})",
                r["summary"]["auto"]["dice"], r["summary"][r["best_fixed"]]["dice"], "Dice", r["gap"],
                f"auto - best >= -{DICE_MARGIN:g}, no collapse", r["met"]) for r in results]
    seeds = ", ".join(map(str, args.seeds))
    notes = [f"Dice = pooled Dice per foreground class on {N_TEST} held-out cases, mean over classes, then mean "
             f"over seeds {seeds} (range in brackets for auto); the same seeds (initialisation, batch order) "
             f"for every loss. Tiny U-Net (width 8, depth 3), Adam lr {LR:g}, "
             f"{STEPS[2]} steps of {BATCH[2]} in 2D ({'x'.join(map(str, SHAPES[2]))}), "
             f"{STEPS[3]} steps of {BATCH[3]} in 3D ({'x'.join(map(str, SHAPES[3]))}).",
             "(c) = collapse on some seed: predicted foreground outside [truth/2, 2 x truth]. fg ratio = "
             "predicted / true foreground fraction (mean over seeds); max class = the largest predicted / true "
             "fraction of one class on any seed.",
             f"Whole benchmark {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU ({args.workers} worker processes "
             "of one thread)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "losses.md", table + "\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    write_result("losses", rows, {NOTES_KEY: notes, "table": table,
                                  "tasks": [{k: v for k, v in r.items() if k != "runs"} for r in results],
                                  "runs": {f"{r['task']} {r['spatial_dims']}D": r["runs"] for r in results}})
    print(table)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
