"""``medxfer demo --study 3d``: the offline 3D sparse-label transfer study, end to end, on 2 CPU cores.

A small version of a published 3D transfer study (a 3D U-Net pretrained on a large, sparsely annotated CT
set, transferred to new organ tasks at several training-set sizes, and CT -> MR), on a stand-in built from
installed data (Debian ``mricron-data``) by :mod:`medxfer.data.colin27_subjects`:

- **real**: the T1 intensities of one brain (Colin27) and its hand-drawn AAL labels;
- **simulated**: every difference between subjects (random affine, elastic warp, gamma, bias field, noise),
  so the results say how the pipeline and the transfer behave, not how a method does on patients.

Stages (all resumable; a second run reuses every finished piece):

1. the data, written into ``DIR/data`` by the deterministic generator (reused when present and complete):
   ``source`` (5 deep grey-matter structures, each subject annotating a random 2-3 of them), ``target``
   (hippocampus + amygdala: outside the source classes), ``source_t2like`` (the source classes in the stated
   T1 -> "T2-like" contrast: the second domain);
2. the grid (:func:`study_grid`, written to ``DIR/study3d_grid.yaml``) through the sweep runner: sparse-label
   pretraining of a 3D U-Net (partial Dice + CE: unannotated structures are neither foreground nor
   background), then on the target at 2, 4 and 8 volumes scratch vs full fine-tuning vs frozen encoder vs
   gradual unfreeze, and the whole base model fine-tuned on the second domain with its source score before
   (the base model's own) and after fine-tuning: the forgetting;
3. the report (``DIR/report/report.html``) opened by :func:`study_answer`'s sentences and table.

One source of truth for the grid: :func:`study_grid`. ``configs/study3d/sweep.yaml`` is written from it
(:func:`write_config_file`; ``python -m medxfer.study3d`` regenerates it, a test checks it has not drifted).

Sizing (:func:`settings`): the full study is cut to finish within 15 minutes on 2 CPU cores (measured by
``benchmarks/bench_study3d.py``); ``GPU_SETTINGS`` says what a GPU run would use instead.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from medxfer.io import atomic_write_text
from medxfer.progress import ProgressLog
from medxfer.sweep.grid import grid_yaml

log = logging.getLogger(__name__)

PRETRAINING_NAME = "sparse-source"
TARGET, SECOND = "target", "source-t2like"  # the grid's dataset names (also the records' dataset names)
DATA_DIR = "data"
GRID_FILE = "study3d_grid.yaml"
CONFIG_FILE = Path("configs") / "study3d" / "sweep.yaml"  # in the repository: written from study_grid
CONFIG_DATA_ROOT = "../../study3d_data"  # configs/study3d/sweep.yaml reads the data from the repository root
ARMS = ("full", "frozen_encoder", "gradual")  # each against scratch
ARM_NAMES = {"full": "full fine-tuning", "frozen_encoder": "frozen encoder", "gradual": "gradual unfreeze"}

# What a GPU run of the same study would use instead of the CPU sizes of ``settings(False)`` (not run here): the
# issue's subject counts, the whole 40 x 56 x 64 volume as the patch, a wider network, longer training and
# 5 seeds for every arm.
GPU_SETTINGS = {"subjects": {"source": 40, "target": 16, "source_t2like": 12}, "width": 16, "patch": [40, 56, 64],
                "pretraining_steps": 2000, "steps": 300, "seeds": [0, 1, 2, 3, 4], "arm_seeds": [0, 1, 2, 3, 4]}


def settings(quick: bool) -> dict[str, Any]:
    """The study's sizes. ``quick``: every stage with tiny settings (what the tests run).

    Full (sized for 15 min on 2 CPU cores; measured 930 s on a loaded machine, benchmarks/results/study3d.json):
    24 sparse source subjects, 16 target, 10 T2-like; ``unet3d`` width 8,
    depth 4, 32^3 patches, batch 2; 300 pretraining steps; 100 fine-tuning steps per run at lr 0.01 (at 0.003
    scratch stayed near Dice 0 in a 150-step trial); scratch and full fine-tuning over 3 seeds (a 95% interval
    for transfer vs scratch at every size), frozen encoder and gradual unfreeze (encoder frozen for the first
    30% of the steps) over 1; the second-domain fine-tune (4 T2-like volumes) over 1: 25 runs."""
    if quick:
        return {"subjects": {"source": 6, "target": 8, "source_t2like": 5}, "width": 4, "depth": 3, "patch": 16,
                "pretraining_steps": 4, "pretraining_lr": 0.003, "steps": 4, "lr": 0.01, "val_every": 2,
                "sizes": [2, 4], "seeds": [0], "arm_seeds": [0], "second_size": 2, "second_seeds": [0],
                "target_val_fraction": 0.2}
    return {"subjects": {"source": 24, "target": 16, "source_t2like": 10}, "width": 8, "depth": 4, "patch": 32,
            "pretraining_steps": 300, "pretraining_lr": 0.003, "steps": 100, "lr": 0.01, "val_every": 25,
            "sizes": [2, 4, 8], "seeds": [0, 1, 2], "arm_seeds": [0], "second_size": 4, "second_seeds": [0],
            "target_val_fraction": 0.25}


def write_study_data(root: str | os.PathLike, quick: bool = False, seed: int = 0) -> dict[str, Path]:
    """The stand-in's three datasets under ``root`` (each written once: a folder whose stamp says the same
    parameters is reused; a half-written one is written again)."""
    from medxfer.data.colin27_subjects import write_subjects

    root = Path(root)
    return {task: write_subjects(root / task, task, n, seed=seed) for task, n in settings(quick)["subjects"].items()}


def _dataset(root: str, task: str, patch: int, test_fraction: float,
             val_fraction: Optional[float] = None) -> dict[str, Any]:
    # augment: flips, quarter turns, intensity (on in the measured run; medxfer's default is now off, for 2D)
    data: dict[str, Any] = {"name": "msd", "root": f"{root}/{task}", "spatial_dims": 3,
                            "patch_size": [patch] * 3, "augment": True}
    if val_fraction is not None:
        data["val_fraction"] = val_fraction
    data["options"] = {"test_fraction": test_fraction}
    return data


def study_grid(quick: bool = False, data_root: str = CONFIG_DATA_ROOT) -> dict[str, Any]:
    """The study as a sweep grid; ``data_root`` holds ``source``, ``target`` and ``source_t2like`` (relative
    paths are relative to the grid file)."""
    s = settings(quick)
    patch, steps = s["patch"], s["steps"]
    model = {"preset": "unet3d", "width": s["width"], "depth": s["depth"]}
    source = _dataset(data_root, "source", patch, 0.2)
    include: list[dict[str, Any]] = [{"strategy": "scratch", "pretraining": None, "pretraining.length": None}]
    include += [{"strategy": "full"}]
    unfreeze = max(1, round(0.3 * steps))
    for seed in s["arm_seeds"]:
        include.append({"strategy": "frozen_encoder", "seed": seed})
        include.append({"strategy": "gradual", "train.unfreeze_after_steps": unfreeze, "seed": seed})
    # the second domain: the whole base model (its head: the source classes) fine-tuned on T2-like subjects;
    # its source Dice before (the base model's own) and after fine-tuning is the forgetting
    for seed in s["second_seeds"]:
        include.append({"dataset": SECOND, "strategy": "full", "train_images": s["second_size"], "seed": seed,
                        "pretrained.load": "full", "evaluation.source_test": source})
    return {
        "name": "study3d-quick" if quick else "study3d",
        "datasets": {
            TARGET: _dataset(data_root, "target", patch, 0.25, s["target_val_fraction"]),
            SECOND: _dataset(data_root, "source_t2like", patch, 0.25),
        },
        "pretraining": [{
            "name": PRETRAINING_NAME, "task": "segmentation", "model": model, "data": source,
            "schedule": {"unit": "step", "lengths": [s["pretraining_steps"]]},
            "train": {"batch_size": 2, "optimizer": "adam", "lr": s["pretraining_lr"], "loss": "partial_dice_ce",
                      "log_every_n_steps": max(1, s["pretraining_steps"] // 20)},
        }],
        "base": {
            "model": model,
            # new classes: the pretrained encoder + decoder, a new head
            "pretrained": {"from": PRETRAINING_NAME, "length": s["pretraining_steps"], "load": "encoder_decoder"},
            "train": {"max_steps": steps, "batch_size": 2, "lr": s["lr"], "loss": "dice_ce",
                      "val_every_n_steps": s["val_every"]},
        },
        # the crossed axes hold no run of their own: every arm is an ``include`` entry crossed with them
        "axes": {"dataset": [TARGET], "train_images": s["sizes"], "seed": s["seeds"]},
        "exclude": [{"dataset": TARGET}],
        "include": include,
    }


def _config_header() -> str:
    n = settings(False)["subjects"]
    return f"""\
# The offline 3D sparse-label transfer study (docs/study3d.md). WRITTEN BY `python -m medxfer.study3d` from
# medxfer.study3d.study_grid: edit that function, not this file (tests/test_study3d.py checks they agree).
# `medxfer demo --study 3d --out DIR` builds the data and runs this grid in one go; by hand (repository root):
#   medxfer data colin27-subjects study3d_data --source {n['source']} --target {n['target']} --t2like {n['source_t2like']}
#   medxfer sweep configs/study3d/sweep.yaml --out study3d_out
#   medxfer report study3d_out
# Real: Colin27 T1 intensities and AAL labels (one brain). Simulated: subject variability.
"""


def grid_text(grid: dict[str, Any], header: str = "") -> str:
    return header + grid_yaml(grid, flat_lists_inline=True, width=120)


def config_file_text() -> str:
    """What ``configs/study3d/sweep.yaml`` holds: the full grid, data read from ``study3d_data``."""
    return grid_text(study_grid(False, CONFIG_DATA_ROOT), _config_header())


def write_config_file(repo: str | os.PathLike) -> Path:
    path = Path(repo) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_file_text())
    return path


def run_study3d(out: str | os.PathLike, quick: bool = False, progress: bool = False,
                workers: Optional[int] = None) -> dict[str, Any]:
    """Build the data, run (or resume) the study into ``out``, write the report; return what the CLI prints."""
    from medxfer.records import iter_records
    from medxfer.report import write_report
    from medxfer.sweep.runner import run_sweep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    stages = ProgressLog("study3d", 3)
    stages.note("building the simulated subjects from Colin27 + AAL (stage 1 of 3)")
    data = write_study_data(out / DATA_DIR, quick)
    stages.step("stages done: data ready; the sweep follows (sparse-label pretraining, then the runs)")
    grid = study_grid(quick, str((out / DATA_DIR).resolve()))  # absolute: the written grid is reusable
    atomic_write_text(out / GRID_FILE, grid_text(grid))
    sweep = run_sweep(out / GRID_FILE, out, workers=workers, progress=progress)
    stages.step("stages done: sweep finished; the report follows")
    if sweep.failed:
        log.warning("%d study run(s) failed; see runs/*/error.json", len(sweep.failed))
    answer = study_answer(out)
    report = write_report(out, headline=answer["headline"], answer=answer["answer_table"])
    stages.step("stages done: report written")
    return {**answer, "counts": sweep.counts(), "report": report, "data": data, "grid": out / GRID_FILE,
            "n_records": len(list(iter_records(out, kind="finetune"))), "results_csv": out / "results.csv"}


# ---------------------------------------------------------------------------------------- the answers
def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _difference_text(row: Any) -> str:
    from medxfer.report.tables import MIN_INTERVAL_SEEDS, format_difference, no_interval_text

    n = int(row["n seeds"])
    if n < MIN_INTERVAL_SEEDS:
        return f"{format_difference(row)} ({no_interval_text(n)})"
    return f"{format_difference(row)} (95% t-interval over {_seeds(n)}): {row['verdict']}"


def study_answer(out: str | os.PathLike) -> dict[str, Any]:
    """The study's answers from the run records: each arm vs scratch per number of target volumes (paired by
    seed; a 95% t-interval where there are >= 3 seeds), and the forgetting of the second-domain fine-tune
    against the base model's own source score."""
    from medxfer.records import iter_records
    from medxfer.report.tables import downstream_table, forgetting_table, format_difference, versus_scratch

    table = downstream_table(iter_records(Path(out), kind="finetune"))
    rows, headline = [], []
    if table.empty:
        return {"headline": ["No finished runs to answer the study's questions yet."],
                "answer_table": pd.DataFrame(), "forgetting": pd.DataFrame()}
    target = table[(table["dataset"] == TARGET) & (table["test set"] == "target")]
    versus = versus_scratch(target)
    for size in sorted(versus["n train images"].unique()) if not versus.empty else []:
        for arm in ARMS:
            match = versus[(versus["n train images"] == size) & (versus["starting point"].str.startswith(arm + ","))]
            if match.empty:
                continue
            row = match.iloc[0]
            rows.append({"question": f"{ARM_NAMES[arm]} vs scratch", "training volumes": int(size),
                         "seeds": int(row["n seeds"]), "Dice scratch": row["dice scratch"], "Dice": row["dice"],
                         "difference [95% CI]": format_difference(row), "verdict": row["verdict"]})
            if arm == "full":
                headline.append(f"Sparse-label pretraining -> hippocampus + amygdala with {int(size)} volumes, "
                                f"full fine-tuning vs scratch: Dice {row['dice']:.3f} vs {row['dice scratch']:.3f}, "
                                f"difference {_difference_text(row)}.")
    forgetting = forgetting_table(table)
    second = forgetting[forgetting["dataset"] == SECOND] if not forgetting.empty else forgetting
    for _, row in second.iterrows():
        on_second = table[(table["dataset"] == SECOND) & (table["test set"] == "target")]["dice"]
        before, after = row["source Dice before fine-tuning"], row["source Dice after fine-tuning"]
        headline.append(
            f"Forgetting: the base model's own Dice on the sparse T1 source test set is {before:.3f}; after "
            f"fine-tuning on {int(row['n train images'])} T2-like volumes it is {after} ({_seeds(int(row['n seeds']))}), "
            f"a change of {row['change']:+.3f}, while it reaches Dice {on_second.mean():.3f} on the T2-like test set.")
        rows.append({"question": "forgetting: base model's source Dice, after vs before the T2-like fine-tune",
                     "training volumes": int(row["n train images"]), "seeds": int(row["n seeds"]),
                     "Dice scratch": math.nan, "Dice": before + row["change"],
                     "difference [95% CI]": f"{row['change']:+.3f} (before: {before:.3f})",
                     "verdict": "forgot" if row["change"] < 0 else "kept"})
    if not headline:
        headline = ["No finished runs to answer the study's questions yet."]
    else:
        headline.append("Dice here is the pooled Dice of the test volumes over the classes each volume annotates "
                        "(evaluation.headline); the subjects are simulated from one real brain (docs/study3d.md).")
    return {"headline": headline, "answer_table": pd.DataFrame(rows), "forgetting": second}


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m medxfer.study3d [REPO]``: write configs/study3d/sweep.yaml from :func:`study_grid`."""
    argv = sys.argv[1:] if argv is None else argv
    repo = Path(argv[0]) if argv else Path(__file__).resolve().parents[2]
    print(write_config_file(repo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
