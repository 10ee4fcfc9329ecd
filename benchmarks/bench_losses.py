"""Loss selection: ``auto`` against every fixed loss on small tasks with known answers, on medxfer's default recipe.

Each task is one regime that :func:`medxfer.training.losses.select_loss` tells apart (balanced, small
objects under 0.5% of the image, a rare class present in few training cases, many classes, sparse
labels), in 2D and in 3D, plus one real task: ``amygdala``, the AAL amygdala (left and right as one class)
on axial Colin27 T1 slices (the Debian package mricron-data, read by :func:`medxfer.data.colin27.axial_slices`)
over a range of slices where most miss it. A tiny U-Net (medxfer's ``unet`` / ``unet3d`` preset) is
trained with each loss on the same seeds (model initialisation and batch order) with medxfer's default
recipe, read at run time from ``medxfer.config.TrainConfig()`` (optimizer, lr, weight decay, schedule,
batch sampling; built by medxfer's own ``apply_strategy`` / ``build_optimizer`` / ``build_scheduler`` as a
scratch run), and scored on held-out cases with the pooled Dice per foreground class (sums over all test
cases, then the mean over classes: predicting nothing scores 0). The test Dice is also taken at 10 points
of each run for its curve, and medxfer's convergence rule (:func:`medxfer.training.convergence.convergence`)
flags a run whose curve still rose in its last quarter (the final model is scored either way). The
predicted foreground fraction is compared with the truth, overall and per class, to catch the "foreground
everywhere" collapse.

Target: ``auto`` within 0.02 Dice of the best fixed loss on every task, judged on the 95% t-interval of the
paired per-seed differences (auto - best fixed, the best fixed loss being the one with the highest mean):
met when the interval's lower end is >= -0.02, missed when its upper end is below -0.02, undecided
otherwise; and no collapse (the predicted foreground fraction within 2x of the truth on every seed; the
largest ratio of a single class is reported beside it).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
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

SYNTHETIC_TASKS = ("balanced", "small_objects", "rare_class_few_cases", "many_classes", "sparse_labels")
REAL_TASKS = ("amygdala",)  # 2D only
TASKS = SYNTHETIC_TASKS + REAL_TASKS
SHAPES = {2: (48, 48), 3: (16, 16, 16)}
SEEDS = (0, 1, 2, 3, 4)
STEPS = {2: 300, 3: 1000}
# The default run: 2D only, the real task first (see docs/losses.md: at the default lr the 3D tasks need several times the 2D
# steps, which this 2-core machine cannot give 5 seeds x 7 losses x 5 tasks in the benchmark's budget).
DEFAULT_DIMS = (2,)
TASKS_IN_ORDER = ("amygdala", "rare_class_few_cases", "many_classes", "small_objects", "sparse_labels", "balanced")
BATCH = {2: 4, 3: 2}
N_TRAIN, N_TEST = 8, 4
DICE_MARGIN = 0.02  # auto may trail the best fixed loss by this much
EARLIER_PREFIX = "Earlier run (the kept tasks): "
TIMING_PREFIXES = ("Whole benchmark", "PARTIAL", EARLIER_PREFIX)  # the notes that time a run, for --resume and --render
COLLAPSE_FACTOR = 2.0  # predicted foreground fraction beyond [truth / 2, 2 * truth]: collapse
NOISE = 0.35
CURVE_POINTS = 10  # test-Dice evaluations per run, for its convergence flag
CONFIDENCE = 0.95
# The amygdala task: axial slices z = 26, 29, ..., 119 (3 mm apart), alternately training and test, so each test
# slice lies between two training slices; the AAL amygdala spans z = 42..61, so it is in 3 of the 16 training
# and 3 of the 16 test slices.
AMYGDALA = {"amygdala": ("Amygdala_L", "Amygdala_R")}
AMYGDALA_Z = tuple(range(26, 122, 3))


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


def amygdala_task(z_values: Sequence[int] = AMYGDALA_Z) -> Task:
    """Colin27 T1 axial slices with the AAL amygdala (left + right) as class 1; even positions of ``z_values``
    train, odd ones test. Images normalised per image as medxfer's default ``data.normalization`` does."""
    from medxfer.config import DataConfig
    from medxfer.data.colin27 import axial_slices
    from medxfer.data.transforms import normalize_image

    method = DataConfig.model_fields["normalization"].default
    cases = axial_slices(AMYGDALA, z_values)
    images = [normalize_image(case.image, method) for case in cases]
    labels = [case.label.astype(np.int64) for case in cases]
    return Task("amygdala", 2, len(AMYGDALA) + 1, images[0::2], labels[0::2], images[1::2], labels[1::2],
                note=f"Colin27 T1, AAL amygdala, axial z {z_values[0]}..{z_values[-1]} step "
                     f"{z_values[1] - z_values[0]}, even slices train, odd ones test",
                extra={"train_z": list(z_values[0::2]), "test_z": list(z_values[1::2])})


def make_task(name: str, spatial_dims: int, shape: Optional[tuple[int, ...]] = None,
              n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 1234) -> Task:
    """Task ``name`` with seeded label maps and noisy images (``seed`` fixes the data, not the training);
    ``amygdala`` (2D only) is the real Colin27 task and ignores the other arguments."""
    if name in REAL_TASKS:
        if spatial_dims != 2:
            raise ValueError(f"task {name!r} is 2D only")
        return amygdala_task()
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


def default_recipe() -> dict[str, Any]:
    """medxfer's default optimisation settings, read now from ``TrainConfig()`` (never copied here)."""
    from medxfer.config import TrainConfig

    train = TrainConfig()
    return {key: getattr(train, key) for key in
            ("optimizer", "lr", "weight_decay", "momentum", "nesterov", "scheduler", "sampling")}


def _recipe_text(recipe: dict[str, Any]) -> str:
    text = f"{recipe['optimizer']} lr {recipe['lr']:g}"
    if recipe["weight_decay"]:
        text += f", weight decay {recipe['weight_decay']:g}"
    if recipe["optimizer"] == "sgd":
        text += f", momentum {recipe['momentum']:g}" + (" (Nesterov)" if recipe["nesterov"] else "")
    sampling = {"with_replacement": "batches drawn with replacement",
                "epochs": "each case once per epoch"}.get(recipe["sampling"], recipe["sampling"])
    return f"{text}, {recipe['scheduler']} schedule, {sampling}"


def batch_indices(n: int, batch_size: int, steps: int, sampling: str, rng: np.random.Generator):
    """The training batches as medxfer's loader draws them: ``with_replacement`` = ``batch_size`` cases drawn
    uniformly with replacement at every step; ``epochs`` = a fresh permutation per epoch, the last batch of
    an epoch shorter when ``batch_size`` does not divide ``n``."""
    if sampling == "with_replacement":
        for _ in range(steps):
            yield rng.integers(0, n, size=batch_size)
        return
    if sampling != "epochs":
        raise ValueError(f"unknown sampling {sampling!r} (with_replacement, epochs)")
    done = 0
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def _predict(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(1).numpy()
    model.train(was_training)
    return predicted


def train_and_score(task: Task, loss_name: str, options: dict[str, Any], seed: int, steps: int,
                    batch_size: int, width: int = 8) -> dict[str, Any]:
    """Train a fresh tiny U-Net on the task with one loss and medxfer's default recipe (a scratch run: one lr
    for the whole model); pooled Dice and foreground fractions on its test cases, and the test-Dice curve
    at ``CURVE_POINTS`` steps with medxfer's convergence verdict on it."""
    from medxfer.config import TrainConfig
    from medxfer.training.convergence import convergence
    from medxfer.training.strategies import apply_strategy, build_optimizer, build_scheduler

    torch.manual_seed(seed)
    model = _model(task, width)
    loss_fn = build_loss(loss_name, **options)
    train_config = TrainConfig(strategy="scratch")
    optimizer = build_optimizer(apply_strategy(model, train_config, pretrained=False), train_config)
    scheduler = build_scheduler(optimizer, train_config, steps)
    images = torch.from_numpy(np.stack(task.train_images))
    labels = torch.from_numpy(np.stack(task.train_labels))
    test_images = torch.from_numpy(np.stack(task.test_images))
    truth = np.stack(task.test_labels)
    annotated = task.annotated
    every = max(1, steps // CURVE_POINTS)
    curve, train_s = [], 0.0
    model.train()
    batches = batch_indices(len(images), min(batch_size, len(images)), steps, train_config.sampling,
                            np.random.default_rng(seed))
    started = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        optimizer.zero_grad(set_to_none=True)
        logits = model(images[batch])
        loss = loss_fn(logits, labels[batch], None if annotated is None else [annotated[i] for i in batch])
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % every == 0 or step == steps:
            train_s += time.perf_counter() - started
            curve.append([step, score(_predict(model, test_images), truth, task.n_classes)["dice"]])
            started = time.perf_counter()
    final = score(_predict(model, test_images), truth, task.n_classes)
    return {"loss": loss_name, "options": options, "seed": seed, "train_s": train_s, **final, "curve": curve,
            "converged": convergence(curve)["converged"]}


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
            "collapsed": collapsed(fg_pred, fg_true), "absent_fp": absent_false_positives(predicted, truth, n_classes)}


def absent_false_positives(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> list[Optional[float]]:
    """Per foreground class: the share of the test cases without the class that still get some of it
    predicted (None when every case holds the class); the false-positive side that pooled Dice folds in."""
    spatial = tuple(range(1, truth.ndim))
    shares = []
    for k in range(1, n_classes):
        absent = ~(truth == k).any(axis=spatial)
        shares.append(float((predicted[absent] == k).any(axis=spatial).mean()) if absent.any() else None)
    return shares


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


def task_specs(names: Sequence[str], dims: Sequence[int]) -> list[tuple[str, int]]:
    """``(task, spatial dims)`` pairs: every synthetic task in every dimension asked for, the real (2D-only)
    tasks in 2D."""
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    return [(name, d) for d in dims for name in names if name in SYNTHETIC_TASKS or d == 2]


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
        gaps = [a - b for a, b in zip(summary["auto"]["per_seed"], summary[best]["per_seed"])]
        mean, low, high = paired_interval(gaps)
        results.append({
            "task": task.name, "spatial_dims": task.spatial_dims, "shape": list(task.train_labels[0].shape),
            "n_classes": task.n_classes, "seeds": list(seeds), "steps": steps[task.spatial_dims],
            "batch_size": BATCH[task.spatial_dims], "width": width, "n_train": len(task.train_labels),
            "n_test": len(task.test_labels), "note": task.note, **task.extra,
            "auto": {"loss": auto_name, "options": auto_options, "reason": reason},
            "min_foreground_fraction": stats["min_foreground_fraction"],
            "imbalance_ratio": stats["imbalance_ratio"], "sparse_cases": stats["sparse_cases"],
            "cases_with_class": stats["cases_with_class"], "summary": summary, "best_fixed": best,
            "gap": mean, "gap_per_seed": gaps, "gap_low": low, "gap_high": high,
            "auto_is_best_fixed": (auto_name, auto_options) == (best, {}),
            "not_converged": sum(s["not_converged"] for s in summary.values()),
            "n_runs": sum(len(task_runs) for task_runs in runs.values()),
            "verdict": verdict(low, high, summary["auto"]["any_collapse"]), "runs": runs,
        })
    for result in results:
        result["met"] = target_met(result)
    return results


def paired_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and two-sided t-interval of paired per-seed differences; with one seed the interval is the
    mean itself (no spread to go on: the notes say so)."""
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, auto_collapsed: bool) -> str:
    """From the interval of auto - best fixed: "met" when it lies wholly above -DICE_MARGIN, "missed" when
    wholly below, else "undecided"; ", auto collapsed" added when auto's predicted foreground left [truth / 2,
    2 x truth] on some seed (the target then counts as missed whatever the interval says)."""
    by_interval = "missed" if high < -DICE_MARGIN else "met" if low >= -DICE_MARGIN else "undecided"
    return by_interval + (", auto collapsed" if auto_collapsed else "")


def target_met(result: dict[str, Any]) -> Optional[bool]:
    """The row's ``met``: True when the interval says met and auto never collapsed, False when it says missed
    or auto collapsed, None (undecided) otherwise."""
    if result["summary"]["auto"]["any_collapse"] or result["verdict"].startswith("missed"):
        return False
    return True if result["verdict"] == "met" else None


def _summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    dice = np.array([r["dice"] for r in results])
    ratio = np.array([r["fg_ratio"] for r in results])
    fp = [share for r in results for share in r["absent_fp"] if share is not None]
    return {"dice": float(dice.mean()), "dice_min": float(dice.min()), "dice_max": float(dice.max()),
            "per_seed": [float(d) for d in dice], "seeds": [r["seed"] for r in results],
            "fg_ratio": float(ratio.mean()), "fg_ratio_max": float(ratio.max()),
            "max_class_ratio": max(max((p / t for p, t in zip(r["pred_fraction"], r["true_fraction"]) if t > 0),
                                       default=0.0) for r in results),
            "any_collapse": any(r["collapsed"] for r in results),
            "absent_fp": float(np.mean(fp)) if fp else None,
            "not_converged": sum(r["converged"] is False for r in results),
            "train_s": float(np.mean([r["train_s"] for r in results]))}


# ------------------------------------------------------------------------------------------ report


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One line per task: auto's choice, the Dice of every loss (mean over seeds), auto - best fixed with its
    interval, the verdict."""
    names = list(LOSS_NAMES)
    lines = ["| task | auto -> | auto | " + " | ".join(names)
             + f" | auto - best [{CONFIDENCE:.0%} CI] | auto fg ratio | not converged | verdict |",
             "|---|---|---|" + "---|" * len(names) + "---|---|---|---|"]
    for result in results:
        summary = result["summary"]
        cells = []
        for name in names:
            key = name if name in summary else PARTIAL_PREFIX + name
            cell = f"{summary[key]['dice']:.3f}"
            if summary[key]["any_collapse"]:
                cell += " (c)"
            if summary[key]["not_converged"]:
                cell += " (n)"
            cells.append(f"**{cell}**" if key == result["best_fixed"] else cell)
        auto = summary["auto"]
        lines.append(
            f"| {result['task']} {result['spatial_dims']}D | {_describe(result['auto'])} | {auto['dice']:.3f} "
            f"({auto['dice_min']:.3f}-{auto['dice_max']:.3f}) | " + " | ".join(cells)
            + f" | {result['gap']:+.3f} [{result['gap_low']:+.3f}, {result['gap_high']:+.3f}] | "
            f"{auto['fg_ratio']:.2f} (max class {auto['max_class_ratio']:.2f}) | "
            f"{result['not_converged']}/{result['n_runs']} | {result['verdict']} |")
    return "\n".join(lines) + "\n"


def seed_table(results: list[dict[str, Any]]) -> str:
    """One line per task: the per-seed Dice of auto and of the best fixed loss, and their paired differences."""
    lines = ["| task | seeds | auto per seed | best fixed | best fixed per seed | auto - best per seed |",
             "|---|---|---|---|---|---|"]
    for result in results:
        auto, best = result["summary"]["auto"], result["summary"][result["best_fixed"]]
        lines.append(f"| {result['task']} {result['spatial_dims']}D | {', '.join(map(str, auto['seeds']))} | "
                     + " ".join(f"{d:.3f}" for d in auto["per_seed"]) + f" | `{result['best_fixed']}` | "
                     + " ".join(f"{d:.3f}" for d in best["per_seed"]) + " | "
                     + " ".join(f"{d:+.3f}" for d in result["gap_per_seed"]) + " |")
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
    parser.add_argument("--tasks", nargs="*", default=list(TASKS_IN_ORDER))
    parser.add_argument("--dims", nargs="*", type=int, default=list(DEFAULT_DIMS),
                        help="2 and/or 3 (the default run is 2D only: see DEFAULT_DIMS)")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps-2d", type=int, default=STEPS[2])
    parser.add_argument("--steps-3d", type=int, default=STEPS[3])
    parser.add_argument("--out", default="losses", help="results name: results/NAME.json and NAME.md")
    parser.add_argument("--render", action="store_true",
                        help="train nothing: rebuild the tables, verdicts and notes of results/NAME.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the tasks results/NAME.json finished and run only the others (refused when its "
                             "seeds, steps or recipe differ from this run's)")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.out)
    steps = {2: args.steps_2d, 3: args.steps_3d}
    specs = task_specs(args.tasks, args.dims)
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    results, earlier = finished_tasks(args.out, args.seeds, steps) if args.resume else ([], None)
    done = {(r["task"], r["spatial_dims"]) for r in results}
    if done:
        print(f"resuming: {len(done)} task(s) kept from results/{args.out}.json", flush=True)
    for spec in [s for s in specs if s not in done]:  # one task at a time, the files rewritten after each
        (result,) = run_tasks([spec], args.seeds, args.workers, steps=steps)
        results.append(result)
        r = result
        print(f"{r['task']} {r['spatial_dims']}D: auto -> {r['auto']['loss']} {r['summary']['auto']['dice']:.3f}, "
              f"best fixed {r['best_fixed']} {r['summary'][r['best_fixed']]['dice']:.3f}, auto - best "
              f"{r['gap']:+.3f} [{r['gap_low']:+.3f}, {r['gap_high']:+.3f}]: {r['verdict']} "
              f"({time.perf_counter() - started:.0f} s so far)", flush=True)
        write_files(results, args, steps, time.perf_counter() - started, _cpu_seconds() - cpu_started,
                    done=len(results) == len(specs), n_specs=len(specs), kept=len(done), earlier_timing=earlier)
    print(markdown_table(results))
    print(seed_table(results))
    return results


def finished_tasks(name: str, seeds: Sequence[int], steps: dict[int, int]) -> tuple[list[dict[str, Any]], Optional[str]]:
    """The tasks ``results/NAME.json`` holds, with their runs, for ``--resume``, and its timing notes (its own
    run's and any it kept) as one text: the kept tasks' times are not repeated, so a resumed run carries them.
    Refused (ValueError, one line) when that file was made with other seeds, steps or another default recipe:
    its tasks would not compare."""
    import json

    path = RESULTS / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], None
    theirs = {"seeds": list(data["seeds"]), "recipe": data["recipe"]}
    ours = {"seeds": list(seeds), "recipe": default_recipe()}
    for key in theirs:
        if theirs[key] != ours[key]:
            raise ValueError(f"{path}: cannot resume, its {key} {theirs[key]} differ from this run's {ours[key]}")
    for task in data["tasks"]:
        if int(data["steps"][str(task["spatial_dims"])]) != steps[task["spatial_dims"]]:
            raise ValueError(f"{path}: cannot resume, it trained {task['spatial_dims']}D tasks for "
                             f"{data['steps'][str(task['spatial_dims'])]} steps, this run for {steps[task['spatial_dims']]}")
    timing = [n.removeprefix(EARLIER_PREFIX) for n in data[NOTES_KEY] if n.startswith(TIMING_PREFIXES)]
    tasks = [dict(task, runs=data["runs"][f"{task['task']} {task['spatial_dims']}D"]) for task in data["tasks"]]
    return tasks, (" ".join(timing) if tasks and timing else None)


def render(name: str) -> list[dict[str, Any]]:
    """Rewrite results/NAME.md and NAME.json from the runs NAME.json holds (after a change to the report or the
    verdict rule; the training is not repeated). Timing and machine notes are kept as measured."""
    import json

    data = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    results = []
    for task in data["tasks"]:
        result = dict(task, runs=data["runs"][f"{task['task']} {task['spatial_dims']}D"])
        result["verdict"] = verdict(result["gap_low"], result["gap_high"], result["summary"]["auto"]["any_collapse"])
        result["met"] = target_met(result)
        results.append(result)
    timing = [n for n in data[NOTES_KEY] if n.startswith(TIMING_PREFIXES)]
    args = argparse.Namespace(seeds=data["seeds"], out=name, workers=None)
    write_files(results, args, {int(d): n for d, n in data["steps"].items()}, 0.0, 0.0, data["complete"],
                len(results), timing_notes=timing)
    return results


def write_files(results: list[dict[str, Any]], args: argparse.Namespace, steps: dict[int, int], seconds: float,
                cpu_seconds: float, done: bool, n_specs: int, timing_notes: Optional[list[str]] = None, kept: int = 0,
                earlier_timing: Optional[str] = None) -> None:
    """``results/NAME.md`` and ``NAME.json`` (atomically) for the tasks finished so far (``kept`` of them from an
    earlier run, ``--resume``: the times are this run's, and ``earlier_timing``, that run's notes, follows them)."""
    recipe = default_recipe()
    table, per_seed = markdown_table(results), seed_table(results)
    rows = [row(f"{r['task']} {r['spatial_dims']}D: Dice of auto ({r['auto']['loss']})", f"best fixed ({r['best_fixed']})",
                r["summary"]["auto"]["dice"], r["summary"][r["best_fixed"]]["dice"], "Dice", r["gap"],
                f"{CONFIDENCE:.0%} interval of auto - best >= -{DICE_MARGIN:g}, no collapse", r["met"])
            for r in results]
    seeds = ", ".join(map(str, args.seeds))
    not_converged = sum(r["not_converged"] for r in results)
    n_runs = sum(r["n_runs"] for r in results)
    dims = sorted({r["spatial_dims"] for r in results})
    dims_steps = "; ".join(f"{steps[d]} steps of {BATCH[d]} in {d}D (synthetic tasks "
                           f"{'x'.join(map(str, SHAPES[d]))}{', amygdala 64x64' if d == 2 else ''})" for d in dims)
    this_run_timing = ([(f"Whole benchmark {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU" if done else
                         f"PARTIAL: {len(results)} of {n_specs} tasks done after {seconds:.0f} s wall, "
                         f"{cpu_seconds:.0f} s CPU")
                        + f" ({args.workers} worker processes of one thread, load average {os.getloadavg()[0]:.1f} "
                          f"at the end)"
                        + (f"; {kept} task(s) kept from an earlier run (--resume), not in these times." if kept else ".")]
                       + ([EARLIER_PREFIX + earlier_timing] if earlier_timing else []))
    notes = [f"Dice = pooled Dice per foreground class on the held-out cases (sums over cases, then the mean over "
             f"classes; predicting nothing scores 0), mean over seeds {seeds} (range in brackets for auto); the "
             f"same seeds (initialisation, batch order) for every loss. Tiny U-Net (width 8, depth 3) trained "
             f"from scratch with medxfer's default recipe read from TrainConfig(): {_recipe_text(recipe)}; "
             f"{dims_steps}.",
             f"auto - best = paired per-seed difference from the fixed loss with the best mean, its mean and "
             f"{CONFIDENCE:.0%} t-interval over the seeds (choosing the best after the fact favours it). Verdict: "
             f"met when the interval's lower end is >= -{DICE_MARGIN:g}, missed when its upper end is below "
             f"-{DICE_MARGIN:g}, else undecided; 'auto collapsed' when auto's predicted foreground left "
             "[truth/2, 2 x truth] on some seed (predicting nothing included), which misses the target.",
             "(c) = collapse on some seed: predicted foreground outside [truth/2, 2 x truth]. (n) = not converged "
             "on some seed: the test Dice, taken at 10 points of the run, reached a new high in the last quarter "
             "by more than 0.01 (medxfer's convergence rule). fg ratio = predicted / true foreground fraction "
             "(mean over seeds); max class = the largest predicted / true fraction of one class on any seed.",
             f"Not converged: {not_converged} of {n_runs} runs.",
             *(timing_notes or this_run_timing)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.out}.md",
                      table + "\n" + per_seed + "\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    write_result(args.out, rows, {NOTES_KEY: notes, "complete": done, "recipe": recipe,
                                  "steps": {str(d): steps[d] for d in dims}, "seeds": list(args.seeds),
                                  "table": table, "seed_table": per_seed,
                                  "not_converged": not_converged, "n_runs": n_runs,
                                  "tasks": [{k: v for k, v in r.items() if k != "runs"} for r in results],
                                  "runs": {f"{r['task']} {r['spatial_dims']}D": r["runs"] for r in results}})


if __name__ == "__main__":
    main(sys.argv[1:])
