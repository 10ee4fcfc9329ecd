"""``medxfer demo``: the pipeline on the embedded data, offline.

Source -> target transfer on the nuclei demo (see ``medxfer.data.demo``): a U-Net is trained on
domain A, then fine-tuned on a few domain-B images, and evaluated on the test images of both domains
(how well it learns the target, and what it keeps of the source). A U-Net trained from scratch on the
same few B images is the baseline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medxfer.config import DataConfig, EvalConfig, ModelConfig, PretrainedConfig, RunConfig, TrainConfig
from medxfer.finetune import run_finetune, summary_dice
from medxfer.sweep.store import collect

log = logging.getLogger(__name__)


def demo_configs(quick: bool = False, n_target_images: int = 5, seed: int = 0) -> tuple[RunConfig, list[RunConfig]]:
    """The source run and the target runs that start from it (their checkpoint is filled in later)."""
    model = ModelConfig(preset="unet", width=8 if quick else 16, depth=4)
    epochs_source, epochs_target = (2, 2) if quick else (40, 30)
    source = RunConfig(
        name="demo-source",
        seed=seed,
        data=DataConfig(name="demo", options={"domain": "A"}),
        model=model,
        train=TrainConfig(strategy="scratch", max_epochs=epochs_source, batch_size=8, lr=3e-3),
    )
    target_data = DataConfig(name="demo", options={"domain": "B"}, train_images=n_target_images)
    source_test = DataConfig(name="demo", options={"domain": "A"})
    scratch = RunConfig(
        name="demo-target-scratch", seed=seed, data=target_data, model=model,
        train=TrainConfig(strategy="scratch", max_epochs=epochs_target, batch_size=4, lr=3e-3),
        evaluation=EvalConfig(source_test=source_test),
    )
    transfer = RunConfig(
        name="demo-target-transfer", seed=seed, data=target_data, model=model,
        train=TrainConfig(strategy="full", max_epochs=epochs_target, batch_size=4, lr=1e-3),
        evaluation=EvalConfig(source_test=source_test),
    )
    return source, [scratch, transfer]


def run_demo(out: str | Path, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    out = Path(out)
    source_cfg, (scratch_cfg, transfer_cfg) = demo_configs(quick)
    source = run_finetune(source_cfg, out, progress=progress)
    transfer_cfg = transfer_cfg.model_copy(update={"pretrained": PretrainedConfig(
        checkpoint=source.run_dir / "model.pt", load="full", scheme="segmentation:demo-nuclei-A")})
    runs = [("source (A, scratch)", source), ("target (B, scratch)", run_finetune(scratch_cfg, out, progress=progress)),
            ("target (B, from source)", run_finetune(transfer_cfg, out, progress=progress))]
    results_csv = collect(out)
    rows = []
    for label, run in runs:
        target = summary_dice(run.record, "target")
        source_dice = summary_dice(run.record, "source") if "source" in run.record["metrics"] else target
        rows.append([label, run.run_id, run.record["n_train_images"], target if "source" in run.record["metrics"]
                     else float("nan"), source_dice])
    # For the source run the "target" test set is domain A itself.
    return {
        "columns": ["run", "run id", "train images", "dice on B test", "dice on A test"],
        "rows": rows,
        "runs_dir": out / "runs",
        "results_csv": results_csv,
    }
