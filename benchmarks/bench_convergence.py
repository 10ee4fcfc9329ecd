"""Convergence on few images: medxfer's default recipe against a bare PyTorch loop and an nnU-Net-style recipe.

Set-up: the Colin27 T1 target (``medxfer.data.colin27``) with 5 and 20 training slices, several seeds; every side
trains the same model (``efficientnet_lite0_unet``, width 8, the demo's) from the same initial weights on the same
tensors (the run's seeded subset of slices, normalised as medxfer does) and is scored every ``EVAL_EVERY`` steps on
the test slices with the pooled Dice per foreground class (true/false positives and false negatives summed over all
test slices, then the mean over classes: predicting nothing scores 0).

Sides:
- **medxfer**: ``run_finetune`` with the default ``TrainConfig`` (only ``max_steps``, ``val_every_n_steps`` and the
  strategy set); the curve comes from a callback that scores the model (time spent scoring is not counted).
- **bare**: a plain loop: AdamW (lr 1e-3, weight decay 1e-2, constant), batches of ``BATCH`` slices drawn with
  replacement, cross-entropy + soft Dice (MONAI ``DiceCELoss``), no augmentation.
- **nnunet**: the nnU-Net v2 recipe where it is cheap: SGD (Nesterov, momentum 0.99, lr 1e-2, weight decay 3e-5)
  with the poly schedule ``(1 - step / total) ** 0.9``, Dice + CE, batches drawn with replacement, random flips
  and 90-degree rotations, intensity scaling.

Per curve: the plateau (mean Dice over the last quarter of the steps), the first step (and the training seconds up
to it) where Dice reaches 95% of that plateau. Targets: medxfer's time to a Dice level within 1.1x of the bare
loop's, the level being 95% of the lower of the two plateaus on each seed (time to a side's own plateau would
reward the side that plateaus low); medxfer's plateau no more than 0.02 below the best side's (means over seeds); the fixed set-up of a run
in a sweep (``run_finetune`` until its first optimizer step, imports already done) under 3 s.

``--ablation`` instead measures the recipe's parts one at a time (``recipe.json``): batches drawn with
replacement vs epochs with a last short batch, the encoder learning rate of a pretrained encoder, the
transposed-conv vs upsample+conv decoder, and the nnU-Net recipe, scratch and ImageNet, 5 and 20 slices.

``--variants`` runs medxfer's default against itself with one setting changed back to the previous default
(augmentation on, batch 8), paired by seed (``recipe_variants.json``).

``python benchmarks/bench_convergence.py [--ablation FILE | --variants] [--seeds N] [--steps N] [--workers N]``
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from common import NOTES_KEY, RESULTS, row, write_result

PRESET, WIDTH = "efficientnet_lite0_unet", 8
SIZES = (5, 20)
SEEDS = (0, 1, 2)
STEPS = 200  # the demo's fine-tuning length
EVAL_EVERY = 10
BATCH = 4
PLATEAU_SHARE = 0.25  # the plateau is the mean over this last share of the curve
REACH = 0.95
TIME_RATIO_TARGET = 1.1
PLATEAU_MARGIN = 0.02
SETUP_TARGET_S = 3.0
# Training and set-up seconds are this process's CPU seconds: each side runs on one thread in this process, so
# its CPU time is what it costs, whatever else the (shared) machine runs meanwhile; wall time would also
# measure the other users, differently for each side.
CLOCK = time.process_time


# ------------------------------------------------------------------------------------------- data
@dataclass
class Tensors:
    train_x: torch.Tensor  # (N, 1, H, W) float32, normalised
    train_y: torch.Tensor  # (N, H, W) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int


def load_tensors(n_train: int, seed: int, shape: Optional[int] = None) -> Tensors:
    """The run's training subset and the test slices, as medxfer prepares them (per-image z-score)."""
    from medxfer.config import DataConfig
    from medxfer.data import load_data, select_subset
    from medxfer.data.transforms import normalize_image

    root = os.environ.get("MEDXFER_COLIN27_ROOT")  # a copy of the mricron-data files (another machine)
    data = load_data(DataConfig(name="colin27", options={"domain": "t1"}, root=root))
    train = select_subset(data.train, n_train, seed)

    def stack(cases):
        x = torch.from_numpy(np.stack([normalize_image(c.image) for c in cases]))
        y = torch.from_numpy(np.stack([c.label for c in cases]))
        if shape is not None:  # tiny settings for the smoke test
            x, y = x[..., :shape, :shape].contiguous(), y[..., :shape, :shape].contiguous()
        return x, y

    (tx, ty), (vx, vy) = stack(train), stack(data.test)
    return Tensors(tx, ty, vx, vy, data.n_classes)


def pooled_dice(logits: torch.Tensor, truth: torch.Tensor, n_classes: int) -> float:
    """Mean over foreground classes of 2TP / (2TP + FP + FN), counts summed over all images; a class absent
    from truth and prediction everywhere is left out (never in these test slices)."""
    predicted = logits.argmax(1)
    scores = []
    for c in range(1, n_classes):
        p, t = predicted == c, truth == c
        tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 1.0


@torch.no_grad()
def score(model: torch.nn.Module, tensors: Tensors) -> float:
    was_training = model.training
    model.eval()
    try:
        return pooled_dice(model(tensors.test_x), tensors.test_y, tensors.n_classes)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ model
def imagenet_encoder(folder: Path) -> Path:
    """The genuine ImageNet EfficientNet-Lite0 encoder imported once into ``folder`` (the demo's)."""
    from medxfer.models.importing import IMPORTED_NAME, import_weights

    path = folder / "imagenet" / IMPORTED_NAME
    if not path.is_file():
        import_weights("efficientnet-lite0", PRESET, path.parent)
    return path


def make_model(seed: int, n_classes: int, start: Optional[Path], upsample: Optional[str] = None,
               width: int = WIDTH) -> torch.nn.Module:
    from medxfer.models import build_segmenter
    from medxfer.models.weights import load_encoder_weights

    torch.manual_seed(seed)
    extra = {} if upsample is None else {"upsample": upsample}
    model = build_segmenter(preset=PRESET, in_channels=1, n_classes=n_classes, width=width, **extra)
    if start is not None:
        load_encoder_weights(model, start)
    return model


# ----------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """A plain training loop's settings (what ``--ablation`` varies one at a time)."""

    name: str
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    encoder_lr_factor: float = 1.0  # encoder lr = lr * this (a pretrained encoder's)
    weight_decay: float = 1e-2
    momentum: float = 0.99  # sgd
    schedule: str = "constant"  # constant | cosine | poly
    sampling: str = "replacement"  # replacement: fixed batches drawn with replacement; epochs: shuffled epochs
    augment: bool = False
    upsample: Optional[str] = None  # the decoder's upsampling (None = the preset's default)


BARE = Recipe("bare")
NNUNET = Recipe("nnunet", optimizer="sgd", lr=1e-2, weight_decay=3e-5, momentum=0.99, schedule="poly",
                augment=True)


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    encoder = list(model.encoder.parameters())
    ids = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": encoder, "lr": recipe.lr * recipe.encoder_lr_factor}, {"params": rest, "lr": recipe.lr}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _factor(schedule: str, step: int, total: int) -> float:
    if schedule == "poly":
        return (1 - step / total) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    return 1.0


def _batches(n: int, batch: int, steps: int, sampling: str, generator: torch.Generator):
    """Index batches: ``replacement`` draws ``batch`` of ``n`` with replacement each step; ``epochs`` shuffles
    every epoch and ends it with the remainder (what a DataLoader with drop_last=False gives)."""
    if sampling == "replacement":
        for _ in range(steps):
            yield torch.randint(n, (batch,), generator=generator)
        return
    done = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            if done == steps:
                return
            yield order[start:start + batch]
            done += 1


def _augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
    """Flips, 90-degree rotations and intensity scaling per image (cheap parts of nnU-Net's augmentation)."""
    xs, ys = [], []
    for xi, yi in zip(x, y):
        k = int(torch.randint(4, (1,), generator=generator))
        xi, yi = torch.rot90(xi, k, (1, 2)), torch.rot90(yi, k, (0, 1))
        if torch.rand(1, generator=generator) < 0.5:
            xi, yi = xi.flip(2), yi.flip(1)
        scale = 1 + 0.1 * (2 * torch.rand(1, generator=generator) - 1)
        xs.append(xi * scale.to(xi.device))
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def train_curve(model: torch.nn.Module, recipe: Recipe, tensors: Tensors, steps: int, seed: int,
                eval_every: int = EVAL_EVERY, batch: int = BATCH, device: str = "cpu") -> dict[str, Any]:
    """Train ``model`` with ``recipe``; the test Dice every ``eval_every`` steps against the training seconds
    (scoring time excluded)."""
    from monai.losses import DiceCELoss

    model = model.to(device)
    tensors = Tensors(*(t.to(device) for t in (tensors.train_x, tensors.train_y, tensors.test_x, tensors.test_y)),
                      tensors.n_classes)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = _optimizer(model, recipe)
    base = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed)
    curve = {"step": [], "seconds": [], "dice": [], "loss": []}
    trained_s, losses = 0.0, []
    model.train()
    started = CLOCK()
    for step, index in enumerate(_batches(len(tensors.train_x), batch, steps, recipe.sampling, generator), 1):
        x, y = tensors.train_x[index.to(device)], tensors.train_y[index.to(device)]
        if recipe.augment:
            x, y = _augment(x, y, generator)
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * _factor(recipe.schedule, step - 1, steps)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y[:, None])
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if step % eval_every == 0 or step == steps:
            trained_s += CLOCK() - started
            curve["step"].append(step)
            curve["seconds"].append(trained_s)
            curve["dice"].append(score(model, tensors))
            curve["loss"].append(float(torch.stack(losses[-eval_every:]).mean()))
            started = CLOCK()
    return curve


def summarise(curve: dict[str, list[float]]) -> dict[str, Optional[float]]:
    """Plateau (mean over the last quarter of the evaluations), and the first step / seconds reaching 95% of
    it; ``rising``: the last quarter's trend is still up by more than 0.02 Dice (a run not converged)."""
    dice = np.asarray(curve["dice"], dtype=float)
    tail = max(1, int(round(len(dice) * PLATEAU_SHARE)))
    plateau = float(dice[-tail:].mean())
    reached = np.flatnonzero(dice >= REACH * plateau)
    first = int(reached[0]) if len(reached) and plateau > 0 else None
    slope = float(np.polyfit(np.arange(tail), dice[-tail:], 1)[0] * tail) if tail > 2 else 0.0
    return {"plateau": plateau, "final": float(dice[-1]),
            "steps_to_95": None if first is None else int(curve["step"][first]),
            "seconds_to_95": None if first is None else float(curve["seconds"][first]),
            "seconds_per_step": float(curve["seconds"][-1] / curve["step"][-1]), "rising": slope > 0.02}


# ---------------------------------------------------------------------------------------- ablation
OLD_DEFAULT = Recipe("medxfer before (adam 3e-3 cosine, epochs, transposed conv, augment)", optimizer="adam",
                     lr=3e-3, weight_decay=0.0, schedule="cosine", sampling="epochs", augment=True,
                     upsample="transposed")
ABLATION: list[tuple[Recipe, tuple[str, ...]]] = [
    (OLD_DEFAULT, ("scratch", "imagenet")),
    (replace(OLD_DEFAULT, name="+ batches drawn with replacement", sampling="replacement"), ("scratch", "imagenet")),
    (replace(OLD_DEFAULT, name="+ replacement + upsample decoder", sampling="replacement", upsample="interpolate"),
     ("scratch", "imagenet")),
    (replace(OLD_DEFAULT, name="+ replacement + upsample + encoder lr x0.1", sampling="replacement",
             upsample="interpolate", encoder_lr_factor=0.1), ("imagenet",)),
    (replace(OLD_DEFAULT, name="+ replacement + upsample, adam 1e-3", sampling="replacement", upsample="interpolate",
             lr=1e-3), ("scratch", "imagenet")),
    (replace(OLD_DEFAULT, name="+ replacement + upsample, adam 1e-3, encoder lr x0.1", sampling="replacement",
             upsample="interpolate", lr=1e-3, encoder_lr_factor=0.1), ("imagenet",)),
    (replace(BARE, name="bare (adamw 1e-3 constant, no augment)", upsample="interpolate"), ("scratch", "imagenet")),
    (replace(NNUNET, name="nnunet (sgd nesterov 0.99, 1e-2 poly, augment)", upsample="interpolate"),
     ("scratch", "imagenet")),
    (replace(NNUNET, name="nnunet, encoder lr x0.1", upsample="interpolate", encoder_lr_factor=0.1), ("imagenet",)),
]


def ablation_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (recipe, start, size, seed) curve; runs in a worker process."""
    torch.set_num_threads(1)
    recipe = Recipe(**job["recipe"])
    tensors = load_tensors(job["size"], job["seed"])
    start = Path(job["imagenet"]) if job["start"] == "imagenet" else None
    model = make_model(job["seed"], tensors.n_classes, start, recipe.upsample)
    curve = train_curve(model, recipe, tensors, job["steps"], job["seed"], eval_every=job["eval_every"],
                        device=job["device"])
    return {**{k: v for k, v in job.items() if k != "recipe"}, "recipe": recipe.name, "curve": curve,
            **summarise(curve)}


def run_ablation(seeds, steps: int, workers: int, device: str, out: Path, eval_every: int = 20) -> list[dict]:
    """Every ablation curve, written line by line to ``out`` (JSON lines) as it finishes."""
    import json
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    imagenet = str(imagenet_encoder(Path(os.environ.get("MEDXFER_BENCH_CACHE", tempfile.gettempdir()))))
    jobs = [{"recipe": asdict(recipe), "start": start, "size": size, "seed": seed, "steps": steps,
             "eval_every": eval_every, "device": device, "imagenet": imagenet}
            for seed in seeds for size in SIZES for recipe, starts in ABLATION for start in starts]
    results = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool, open(out, "a", encoding="utf-8") as f:
        finished = (map(ablation_job, jobs) if workers == 1 else
                    (future.result() for future in as_completed([pool.submit(ablation_job, job) for job in jobs])))
        for result in finished:
            results.append(result)
            f.write(json.dumps(result) + "\n")
            f.flush()
            print(f"{result['recipe'][:40]:40s} {result['start']:8s} n={result['size']:2d} seed={result['seed']} "
                  f"plateau {result['plateau']:.3f} steps95 {result['steps_to_95']}", flush=True)
    return results


def ablation_summary(results: list[dict]) -> list[dict[str, Any]]:
    """Per (recipe, start, size): plateau mean and per seed, steps to 95% of it, and the same seeds' plateau of
    the recipe before (``OLD_DEFAULT``) for a paired difference."""
    import json

    out = []
    keys = sorted({(r["recipe"], r["start"], r["size"]) for r in results}, key=lambda k: (k[1], k[2]))
    for recipe, start, size in keys:
        mine = sorted((r for r in results if (r["recipe"], r["start"], r["size"]) == (recipe, start, size)),
                      key=lambda r: r["seed"])
        before = {r["seed"]: r["plateau"] for r in results
                  if (r["recipe"], r["start"], r["size"]) == (OLD_DEFAULT.name, start, size)}
        paired = [r["plateau"] - before[r["seed"]] for r in mine if r["seed"] in before]
        out.append({"recipe": recipe, "start": start, "slices": size, "seeds": [r["seed"] for r in mine],
                    "plateau": float(np.mean([r["plateau"] for r in mine])),
                    "plateau_per_seed": [round(r["plateau"], 4) for r in mine],
                    "steps_to_95": [r["steps_to_95"] for r in mine],
                    "vs_before": float(np.mean(paired)) if paired and recipe != OLD_DEFAULT.name else None,
                    "not_converged": sum(bool(r["rising"]) for r in mine)})
    json.dumps(out)
    return out


def write_ablation(lines: Path, steps: int) -> Path:
    """``results/recipe.json`` from the ablation's JSON lines (curves kept)."""
    import json

    results = [json.loads(line) for line in lines.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary = ablation_summary(results)
    rows = [row(f"{s['recipe']}: {s['start']}, {s['slices']} slices, plateau Dice", OLD_DEFAULT.name.split(" (")[0],
                s["plateau"], None, "Dice", s["vs_before"]) for s in summary]
    notes = [f"Colin27 T1, {PRESET} width {WIDTH}, batch {BATCH}, {steps} steps, test Dice (pooled per class) every "
             f"20 steps; plateau = mean over the last quarter; 'ratio' = the paired difference to the recipe before "
             f"(same seeds). Seeds: {sorted({r['seed'] for r in results})}. Load average during the runs "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared)."]
    return write_result("recipe", rows, {NOTES_KEY: notes, "recipes": summary, "runs": results})


# -------------------------------------------------------------------------------------- variants
# medxfer's default against itself with one setting changed back (what the default was before, measured)
VARIANTS: dict[str, dict[str, dict]] = {
    "default": {},
    "augment: true (flips, quarter turns, intensity)": {"data": {"augment": True}},
    "batch_size: 8": {"train": {"batch_size": 8}},
}


def variant_job(job: dict[str, Any]) -> dict[str, Any]:
    """One medxfer run of a variant (a worker process, one thread)."""
    torch.set_num_threads(1)
    tensors = load_tensors(job["size"], job["seed"])
    with tempfile.TemporaryDirectory(prefix="medxfer-bench-variant-") as tmp:
        run = medxfer_curve(job["size"], job["seed"], job["steps"], tensors, Path(tmp), job["eval_every"],
                            **VARIANTS[job["variant"]])
    return {**job, **run, **summarise(run["curve"])}


def run_variants(seeds, steps: int, workers: int, eval_every: int) -> Path:
    """Every variant at 5 and 20 slices over ``seeds``; ``results/recipe_variants.json`` with each variant's
    plateau and its paired difference to the default (same seeds) with a 95% t-interval."""
    from concurrent.futures import ProcessPoolExecutor

    from medxfer.report.tables import t_interval

    load = os.getloadavg()
    jobs = [{"variant": v, "size": size, "seed": seed, "steps": steps, "eval_every": eval_every}
            for size in SIZES for seed in seeds for v in VARIANTS]
    with ProcessPoolExecutor(workers) as pool:
        runs = list(pool.map(variant_job, jobs))
    rows, summary = [], []
    for size in SIZES:
        base = {r["seed"]: r for r in runs if r["size"] == size and r["variant"] == "default"}
        for variant in VARIANTS:
            mine = sorted((r for r in runs if r["size"] == size and r["variant"] == variant), key=lambda r: r["seed"])
            diffs = [r["plateau"] - base[r["seed"]]["plateau"] for r in mine]
            low, high = t_interval(diffs) if variant != "default" and len(diffs) > 1 else (None, None)
            entry = {"variant": variant, "slices": size, "seeds": [r["seed"] for r in mine],
                     "plateau": float(np.mean([r["plateau"] for r in mine])),
                     "plateau_per_seed": [round(r["plateau"], 4) for r in mine],
                     "cpu_s_per_step": float(np.mean([r["seconds_per_step"] for r in mine])),
                     "not_converged": sum(bool(r["rising"]) for r in mine)}
            if variant != "default":
                entry.update(vs_default=float(np.mean(diffs)), vs_default_low=low, vs_default_high=high)
                rows.append(row(f"{variant}, {size} slices: plateau Dice minus the default's (same seeds)", "default",
                                entry["plateau"], float(np.mean([b["plateau"] for b in base.values()])), "Dice",
                                entry["vs_default"]))
            summary.append(entry)
    notes = [f"Colin27 T1, {PRESET} width {WIDTH}, scratch, {steps} steps, seeds {list(seeds)}; medxfer's default "
             "recipe and the same with one setting changed; plateau = mean test Dice (pooled per class) over the "
             "last quarter; intervals: 95% t over the seeds' paired differences.",
             f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} "
             f"cores (shared with other work); {workers} worker processes of one thread."]
    return write_result("recipe_variants", rows, {NOTES_KEY: notes, "variants": summary,
                                                  "runs": runs})


# -------------------------------------------------------------------------------------- comparison
class CurveCallback:
    """Lightning callback: the test Dice every ``eval_every`` steps of a medxfer run, the training seconds up to
    each (scoring excluded), and the set-up seconds (from ``started`` to the first step)."""

    def __new__(cls, *args, **kwargs):  # a Lightning Callback subclass, made on first use (import cost)
        from lightning.pytorch.callbacks import Callback

        class _Curve(Callback):
            def __init__(self, tensors: Tensors, eval_every: int, started: float, initial: dict):
                self.tensors, self.eval_every, self.started, self.initial = tensors, eval_every, started, initial
                self.curve = {"step": [], "seconds": [], "dice": [], "loss": []}
                self.setup_s: Optional[float] = None
                self.same_init: Optional[bool] = None
                self._clock, self._trained, self._losses = 0.0, 0.0, []

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if self.setup_s is None:
                    self.setup_s = CLOCK() - self.started
                    state = module.model.state_dict()
                    self.same_init = all(torch.equal(state[k], v) for k, v in self.initial.items())
                    self._clock = CLOCK()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self._losses.append(loss.detach())
                step = trainer.global_step
                if step % self.eval_every == 0 or step == trainer.max_steps:
                    self._trained += CLOCK() - self._clock
                    self.curve["step"].append(step)
                    self.curve["seconds"].append(self._trained)
                    self.curve["dice"].append(score(module.model, self.tensors))
                    self.curve["loss"].append(float(torch.stack(self._losses[-self.eval_every:]).mean()))
                    self._clock = CLOCK()

        return _Curve(*args, **kwargs)


def medxfer_config(size: int, seed: int, steps: int, width: int = WIDTH, data: Optional[dict] = None,
                   **train: Any):
    """medxfer's default recipe on the target: only the length, the validation interval and the strategy set
    (``data`` / ``train``: overrides, for ``--variants``)."""
    from medxfer.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    root = os.environ.get("MEDXFER_COLIN27_ROOT")
    return RunConfig(seed=seed, data=DataConfig(name="colin27", options={"domain": "t1"}, train_images=size,
                                                root=root, **(data or {})),
                     model=ModelConfig(preset=PRESET, width=width),
                     train=TrainConfig(strategy="scratch", max_steps=steps, val_every_n_steps=max(1, steps // 10),
                                       **train))


def medxfer_curve(size: int, seed: int, steps: int, tensors: Tensors, out: Path, eval_every: int = EVAL_EVERY,
                  width: int = WIDTH, data: Optional[dict] = None, train: Optional[dict] = None) -> dict[str, Any]:
    from medxfer.finetune import run_finetune

    initial = make_model(seed, tensors.n_classes, None, width=width).state_dict()
    config = medxfer_config(size, seed, steps, width, data, **(train or {}))
    started, wall = CLOCK(), time.perf_counter()
    callback = CurveCallback(tensors, eval_every, started, initial)
    result = run_finetune(config, out, callbacks=[callback])
    return {"curve": callback.curve, "setup_s": callback.setup_s, "same_init": callback.same_init,
            "run_s": time.perf_counter() - wall, "loss": result.record["loss"]["name"],
            "recipe": {k: result.record["config"]["train"][k] for k in
                       ("optimizer", "lr", "scheduler", "batch_size", "sampling", "pretrained_encoder_lr_factor")}
            | {"upsample": result.record["config"]["model"]["upsample"]}}


def compare(sizes=SIZES, seeds=SEEDS, steps: int = STEPS, eval_every: int = EVAL_EVERY, width: int = WIDTH,
            shape: Optional[int] = None, on_run=None) -> dict[str, Any]:
    """Every side's curve per (size, seed), in turn (medxfer, bare, nnunet, then the order rotates);
    ``on_run(runs so far)`` after each (the benchmark writes its file then, so a stopped run keeps its data)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="medxfer-bench-convergence-") as tmp:
        for size in sizes:
            for seed in seeds:
                tensors = load_tensors(size, seed, shape)
                sides = ["medxfer", "bare", "nnunet"]
                rotation = (seed + len(runs)) % 3
                for side in sides[rotation:] + sides[:rotation]:
                    load = os.getloadavg()[0]
                    cpu = time.process_time()
                    if side == "medxfer":
                        run = medxfer_curve(size, seed, steps, tensors, Path(tmp) / f"{size}-{seed}",
                                            eval_every, width)
                    else:
                        model = make_model(seed, tensors.n_classes, None, width=width)
                        run = {"curve": train_curve(model, BARE if side == "bare" else NNUNET, tensors, steps, seed,
                                                    eval_every)}
                    run.update(side=side, size=size, seed=seed, load_before=load, load_after=os.getloadavg()[0],
                               cpu_s=time.process_time() - cpu, **summarise(run["curve"]))
                    runs.append(run)
                    if on_run is not None:
                        on_run(runs)
                    print(f"{side:8s} n={size:2d} seed={seed} plateau {run['plateau']:.3f} "
                          f"95% at {run['steps_to_95']} steps / {run['seconds_to_95'] or float('nan'):.1f} s "
                          f"(load {load:.1f})", flush=True)
    return {"runs": runs, "summary": summary(runs)}


def summary(runs: list[dict]) -> dict[str, dict[str, dict[str, Optional[float]]]]:
    """Per size and side: means over seeds of the plateau, steps and seconds to 95% (runs that never got there
    are counted at their last step)."""
    out: dict[str, dict[str, dict[str, Optional[float]]]] = {}
    for size in sorted({r["size"] for r in runs}):
        out[str(size)] = {}
        for side in ("medxfer", "bare", "nnunet"):
            mine = [r for r in runs if r["size"] == size and r["side"] == side]
            if not mine:
                continue
            steps = [r["steps_to_95"] or r["curve"]["step"][-1] for r in mine]
            seconds = [r["seconds_to_95"] or r["curve"]["seconds"][-1] for r in mine]
            out[str(size)][side] = {"plateau": float(np.mean([r["plateau"] for r in mine])),
                                    "plateau_sd": float(np.std([r["plateau"] for r in mine], ddof=1))
                                    if len(mine) > 1 else None,
                                    "steps_to_95": float(np.mean(steps)), "seconds_to_95": float(np.mean(seconds)),
                                    "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in mine])),
                                    "n_seeds": len(mine), "not_converged": sum(bool(r["rising"]) for r in mine)}
    return out


def seconds_to(curve: dict[str, list[float]], level: float) -> Optional[float]:
    """Training seconds at the first evaluation whose Dice reaches ``level`` (None: never)."""
    reached = [s for s, d in zip(curve["seconds"], curve["dice"]) if d >= level]
    return float(reached[0]) if reached else None


def time_to_common_dice(runs: list[dict], size: int) -> tuple[Optional[float], Optional[float], int]:
    """Mean seconds for medxfer and for the bare loop to reach the same Dice: per seed, 95% of the lower of
    their two plateaus (both reach it by definition); time to 95% of each side's own plateau rewards a side
    that plateaus low, so the target compares time to one Dice level."""
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        if r["size"] == size and r["side"] in ("medxfer", "bare"):
            by_seed.setdefault(r["seed"], {})[r["side"]] = r
    pairs = []
    for pair in by_seed.values():
        if len(pair) < 2:
            continue
        level = REACH * min(pair["medxfer"]["plateau"], pair["bare"]["plateau"])
        times = [seconds_to(pair[side]["curve"], level) for side in ("medxfer", "bare")]
        if None not in times and level > 0:
            pairs.append(times)
    if not pairs:
        return None, None, 0
    return float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs])), len(pairs)


def rows_for(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for size, sides in result["summary"].items():
        if len(sides) < 3:  # a stopped benchmark: only sizes with every side
            continue
        mx = sides["medxfer"]
        mx_s, bare_s, n = time_to_common_dice(result["runs"], int(size))
        ratio = mx_s / bare_s if mx_s is not None and bare_s else None
        rows.append(row(f"seconds to a common Dice (95% of the lower plateau of the pair), {size} slices",
                        "bare loop", mx_s, bare_s, "s", ratio, f"<= {TIME_RATIO_TARGET}",
                        ratio is not None and ratio <= TIME_RATIO_TARGET))
        best_side = max(sides, key=lambda k: sides[k]["plateau"])
        gap = mx["plateau"] - sides[best_side]["plateau"]
        rows.append(row(f"plateau Dice, {size} slices (difference to the best side)", f"best: {best_side}",
                        mx["plateau"], sides[best_side]["plateau"], "Dice", gap, f">= -{PLATEAU_MARGIN}",
                        gap >= -PLATEAU_MARGIN))
        rows.append(row(f"seconds to 95% of each side's own plateau, {size} slices", "bare loop",
                        sides["medxfer"]["seconds_to_95"], sides["bare"]["seconds_to_95"], "s",
                        sides["medxfer"]["seconds_to_95"] / sides["bare"]["seconds_to_95"]
                        if sides["bare"]["seconds_to_95"] else None))
    setups = [r["setup_s"] for r in result["runs"] if r["side"] == "medxfer"][1:]  # the first pays the imports
    if setups:
        setup = float(np.median(setups))
        rows.append(row("fixed set-up of a run in a sweep (to its first step)", "target", setup, SETUP_TARGET_S, "s",
                        setup / SETUP_TARGET_S, "<= 1", setup <= SETUP_TARGET_S))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", type=Path, default=None, help="run the recipe ablation into this JSON-lines file")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-ablation", type=Path, default=None, help="only write recipe.json from these lines")
    parser.add_argument("--variants", action="store_true",
                        help="medxfer's default against itself with one setting changed (recipe_variants.json)")
    args = parser.parse_args(argv)
    if args.variants:
        print(f"wrote {run_variants(range(args.seeds), args.steps, args.workers, args.eval_every)}")
        return 0
    if args.write_ablation is not None:
        print(f"wrote {write_ablation(args.write_ablation, args.steps)}")
        return 0
    if args.ablation is not None:
        run_ablation(range(args.seeds), args.steps, args.workers, args.device, args.ablation)
        print(f"wrote {write_ablation(args.ablation, args.steps)}")
        return 0
    torch.set_num_threads(1)  # one thread per run, as a sweep worker on this 2-core machine runs it
    load, cpu, wall = os.getloadavg(), time.process_time(), time.perf_counter()

    def write(runs: list[dict]) -> Path:
        return write_results({"runs": runs, "summary": summary(runs)}, args, load, cpu, wall)

    result = compare(seeds=range(args.seeds), steps=args.steps, eval_every=args.eval_every, on_run=write)
    print(f"wrote {write(result['runs'])}")
    return 0


def write_results(result: dict[str, Any], args, load, cpu: float, wall: float) -> Path:
    """``results/convergence.json``: rows, notes with the load, every curve."""
    complete = all(len(sides) == 3 for sides in result["summary"].values())
    seeds = sorted({r["seed"] for r in result["runs"]})
    notes = [f"Colin27 T1, {PRESET} width {WIDTH}, scratch, {args.steps} steps, seeds {seeds}, slices "
             f"{sorted({r['size'] for r in result['runs']})}{'' if complete else ' (incomplete)'}; bare and nnunet "
             f"at batch {BATCH}, medxfer at its default; 1 torch thread; test Dice = pooled per-class Dice on the 6 "
             f"test slices every {args.eval_every} steps; plateau = mean over the last quarter; times are CPU seconds of "
             "this single-thread process (scoring excluded).",
             f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the last write on "
             f"{os.cpu_count()} cores (shared with other work); this process: {time.process_time() - cpu:.0f} s CPU "
             f"in {time.perf_counter() - wall:.0f} s."]
    cpu_per_run = {f"{side} {size}": float(np.mean([r["cpu_s"] for r in result["runs"]
                                                    if r["side"] == side and r["size"] == size]))
                   for side in ("medxfer", "bare", "nnunet") for size in sorted({r["size"] for r in result["runs"]})
                   if any(r["side"] == side and r["size"] == size for r in result["runs"])}
    notes.append("CPU seconds per run (mean over seeds; scoring and set-up included): " + ", ".join(f"{k} slices {v:.0f}" for k, v in cpu_per_run.items()))
    for size, sides in result["summary"].items():
        notes.append(f"{size} slices: " + "; ".join(
            f"{side} plateau {v['plateau']:.3f}, 95% at {v['steps_to_95']:.0f} steps / {v['seconds_to_95']:.1f} s"
            for side, v in sides.items()))
    return write_result("convergence", rows_for(result),
                        {NOTES_KEY: notes, "load_average": list(load), "load_average_end": list(os.getloadavg()),
                         "cpu_s_per_run": cpu_per_run, **result})


if __name__ == "__main__":
    sys.exit(main())
