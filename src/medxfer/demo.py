"""``medxfer demo``: the whole study in miniature, offline, on the embedded data.

1. Pretrain a small U-Net encoder on the natural-image stand-in, keeping checkpoints at several
   pretraining lengths (0 = random init); the online transferability callback scores each checkpoint
   on the target images as it is saved (log only: the demo keeps every checkpoint).
2. Score every checkpoint on the target (nuclei domain B) and recommend where pretraining could have stopped.
3. Fine-tune U-Nets on 5/10/15/20 target images, 2 seeds: from scratch, and from each checkpoint with the
   encoder fine-tuned or frozen. Also the source -> target transfer: a U-Net trained on nuclei domain A,
   then fine-tuned on domain B. Every run is evaluated on the B test images and on the A test images.
4. Aggregate ``results.csv`` and ``robustness.csv``, relate scores to downstream Dice (``analysis/``).
5. Write the HTML report with every figure.

Steps 1-3 run through the sweep runner, so a second ``medxfer demo`` reuses every finished run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from medxfer.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.finetune import run_finetune, summary_dice
from medxfer.io import atomic_write_text

log = logging.getLogger(__name__)

SOURCE = {"name": "demo", "options": {"domain": "A"}}
TARGET = {"name": "demo", "options": {"domain": "B"}}
GRID_FILE = "demo_grid.yaml"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:  # every stage and figure, a few steps each (what the tests run)
        return {"width": 4, "lengths": [0, 2], "sizes": [5, 20], "seeds": [0], "steps": 4, "source_steps": 6,
                "n_per_class": 12, "val_per_class": 4, "score_images": 8, "bootstrap": 50}
    return {"width": 8, "lengths": [0, 1, 2, 4, 8], "sizes": [5, 10, 15, 20], "seeds": [0, 1], "steps": 120,
            "source_steps": 300, "n_per_class": 60, "val_per_class": 20, "score_images": 16, "bootstrap": 200}


def source_config(quick: bool = False) -> RunConfig:
    """The source model of the source -> target transfer: a U-Net trained on all of domain A."""
    s = _settings(quick)
    return RunConfig(
        name="demo-source", seed=0, data=DataConfig(**SOURCE),
        model=ModelConfig(preset="unet", width=s["width"], depth=4),
        train=TrainConfig(strategy="scratch", max_steps=s["source_steps"], batch_size=8, lr=3e-3),
        evaluation=EvalConfig(source_test=DataConfig(**TARGET)),
    )


def demo_grid(quick: bool = False, source_model: Optional[Path] = None) -> dict[str, Any]:
    """The study as a sweep grid (written to ``DIR/demo_grid.yaml``; ``medxfer sweep`` runs it too)."""
    s = _settings(quick)
    model = {"preset": "unet", "width": s["width"], "depth": 4}
    grid: dict[str, Any] = {
        "name": "demo-quick" if quick else "demo",
        "base": {
            "model": model,
            "pretrained": {"from": "natural-simple"},
            "train": {"max_steps": s["steps"], "batch_size": 4, "lr": 3e-3},
            "evaluation": {"source_test": SOURCE},
        },
        "datasets": {"nuclei-B": TARGET},
        "pretraining": [{
            "name": "natural-simple",
            "task": "classification",
            "scheme": "simple",
            "model": model,
            "classification": {"source": "natural", "n_per_class": s["n_per_class"],
                               "val_per_class": s["val_per_class"]},
            "schedule": {"unit": "epoch", "lengths": s["lengths"]},
            "train": {"batch_size": 32},
            "online_score": {"data": TARGET, "stop_early": False,
                             "settings": {"n_images": s["score_images"]}},
        }],
        "score": {"datasets": ["nuclei-B"],
                  "settings": {"n_images": s["score_images"], "bootstrap": s["bootstrap"],
                               "stop": {"rule": "patience", "patience": 2}}},
        "axes": {
            "dataset": ["nuclei-B"],
            "strategy": ["full", "frozen_encoder"],
            "pretraining.length": s["lengths"],
            "train_images": s["sizes"],
            "seed": s["seeds"],
        },
        "include": [{"strategy": "scratch", "pretraining": None, "pretraining.length": None}],
    }
    if source_model is not None:
        grid["include"].append({
            "strategy": "full", "pretraining": None, "pretraining.length": None,
            "pretrained.checkpoint": str(source_model), "pretrained.load": "full",
            "pretrained.scheme": "segmentation:nuclei-A",
        })
    return grid


def run_demo(out: str | Path, quick: bool = False, progress: bool = False,
             workers: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) the demo study into ``out``; return what the CLI prints."""
    from medxfer.report import write_report
    from medxfer.report.analyze import analyze
    from medxfer.report.html import findings
    from medxfer.report.tables import downstream_table, load_robustness
    from medxfer.sweep.runner import run_sweep
    from medxfer.records import iter_records

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    source = run_finetune(source_config(quick), out)
    grid = demo_grid(quick, (source.run_dir / "model.pt").resolve())  # absolute: the grid file is reusable
    atomic_write_text(out / GRID_FILE, yaml.safe_dump(grid, sort_keys=False))
    sweep = run_sweep(grid, out, workers=workers, progress=progress)
    if sweep.failed:
        log.warning("%d demo run(s) failed; see runs/*/error.json", len(sweep.failed))

    analysis = analyze(out / "results.csv", out / "robustness.csv", out_dir=out / "analysis")
    report = write_report(out)
    records = list(iter_records(out, kind="finetune"))
    table = downstream_table(records)
    sentences = findings(table, load_robustness(out / "robustness.csv"))
    recommendation = _recommendation(out)

    rows = []
    transfer = [r for r in records if (r.get("pretraining") or {}).get("scheme") == "segmentation:nuclei-A"]
    for label, record in [("source (A, scratch)", source.record)] + [
            (f"A -> B, {r['n_train_images']} B images, seed {r['seed']}", r)
            for r in sorted(transfer, key=lambda r: (r["n_train_images"], r["seed"]))]:
        on_b = summary_dice(record, "source" if record is source.record else "target")
        on_a = summary_dice(record, "target" if record is source.record else "source")
        rows.append([label, record["run_id"], on_b, on_a])
    return {
        "finding": sentences[0] if sentences else "no finding (too few runs)",
        "recommendation": recommendation,
        "best_rule": analysis.best_rule,
        "counts": sweep.counts(),
        "columns": ["source -> target run", "run id", "dice on B test", "dice on A test"],
        "rows": rows,
        "report": report,
        "results_csv": out / "results.csv",
        "robustness_csv": out / "robustness.csv",
        "analysis_dir": out / "analysis",
    }


def _recommendation(out: Path) -> Optional[dict[str, Any]]:
    """The stop recommendation written by the scoring stage (``scores/*/recommendation.json``)."""
    import json

    for path in sorted((out / "scores").glob("*/recommendation.json")):
        return json.loads(path.read_text(encoding="utf-8"))
    return None
