"""Training throughput: medxfer's Lightning loop against a bare PyTorch loop, and against the machine's peak.

For each model, both sides train a copy of the same initial weights on the same batches (CaseDataset +
the MONAI augmentation finetune uses, DataLoader with finetune's settings), in turn (A B, then B A):

- medxfer: ``SegmentationTask`` in a ``lightning.Trainer`` built with finetune's settings (logger off,
  no progress bar or model summary, no sanity validation, finetune's resume checkpoint callback that
  writes ``last.ckpt`` every 60 s of training; its cost is timed on its own);
- bare: ``for batch in loader: zero_grad; loss = loss_fn(model(x), y); backward; step; scheduler.step``.

Per step we record when the batch arrived and when the optimizer step finished. The step time is the
span between the end of the first step and the end of the last, divided by the steps in it (the first
step, which allocates optimizer state, is left out); loader wait = batch arrival - previous step's end
(on the medxfer side this also holds Lightning's own bookkeeping between steps). Both sides must produce
the same per-step losses. Rounds alternate the order (A B, B A) so that neither side always runs
second. FLOPs of a forward + backward pass are counted with
``torch.utils.flop_counter.FlopCounterMode``; the machine's peak is the best matrix-multiply rate in the
dtype the model computes in (fp32; bf16/fp16 under AMP), measured in the same run.

Both sides use medxfer's own device choices (``resolve_precision("auto")``, ``prefers_channels_last``):
fp32 on the CPU; on a GPU mixed precision (bf16, else fp16 with a GradScaler on the bare side) and
channels-last weights for 2D models (on the CPU for those with depthwise convolutions), as finetune does.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from common import NOTES_KEY, blob_pair, in_turn, row, timed, write_result

LOADER_WAIT_TARGET = 0.10  # loader wait / step time: "data loading never the bottleneck"
OVERHEAD_TARGET = 0.95  # medxfer images/s >= 95% of the bare loop's

# (name, preset, model options, batch, spatial shape, steps per measurement, rounds)
# The 2D models are the presets as they are (width 32). unet3d is reduced to width 8 (depth 4): at its
# default width one step takes ~10 s on 2 cores, beyond this benchmark's minutes.
MODELS = [
    ("unet", "unet", {}, 2, (256, 256), 6, 4),
    ("resnet50_attention_unet", "resnet50_attention_unet", {}, 2, (256, 256), 4, 4),
    ("unet3d", "unet3d", {"width": 8, "depth": 4}, 1, (96, 96, 96), 4, 4),
]


def _quiet_lightning() -> None:
    import lightning  # noqa: F401  (creates its loggers, which set their own levels)

    names = [n for n in logging.root.manager.loggerDict if n.startswith("lightning")]
    for name in ["lightning", "lightning.pytorch", "lightning.fabric", *names]:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def synthetic_cases(n: int, shape: tuple[int, ...], seed: int = 0):
    """Grayscale images of a few bright blobs on noise, labelled 1 inside the blobs."""
    from medxfer.data.base import Case

    cases = []
    for i in range(n):
        _, gt = blob_pair(shape, seed * 1000 + i)
        rng = np.random.default_rng(seed * 1000 + i)
        image = gt.astype(np.float32) + rng.normal(0, 0.5, shape).astype(np.float32)
        cases.append(Case(image[None], gt.astype(np.int64), case_id=f"case{i}"))
    return cases


def make_loader(cases, in_channels: int, batch_size: int, seed: int = 0):
    """finetune's training loader: CaseDataset + training_augmentation, num_workers 0 (its default)."""
    from monai.data import DataLoader

    from medxfer.data.transforms import CaseDataset, training_augmentation

    torch.manual_seed(seed)  # CaseDataset seeds the augmentation from torch's initial seed
    spatial_dims = cases[0].image.ndim - 1
    dataset = CaseDataset(cases, n_classes=2, normalization="zscore", in_channels=in_channels,
                          transform=training_augmentation(spatial_dims, None, 0.5, True))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator,
                      drop_last=False)


def device_settings() -> dict[str, Any]:
    """medxfer's own choices for this machine (``train.precision: auto``), used by both sides."""
    from medxfer.training.strategies import resolve_precision

    precision = resolve_precision("auto")
    amp_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return {"device": torch.device("cuda" if torch.cuda.is_available() else "cpu"), "precision": precision,
            "amp": amp_dtype is not None, "amp_dtype": amp_dtype or torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare_model(model: torch.nn.Module, spatial_dims: int) -> torch.nn.Module:
    """Channels-last weights where medxfer's finetune uses them (2D on a GPU; on the CPU 2D models with depthwise
    convolutions)."""
    from medxfer.training.strategies import prefers_channels_last

    if prefers_channels_last(model, spatial_dims):
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class StepLog:
    """Per-step timestamps of one training run (perf_counter seconds)."""

    arrived: list[float] = field(default_factory=list)  # batch in hand, step about to start
    finished: list[float] = field(default_factory=list)  # optimizer step done
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0  # the whole run, set-up and tear-down included
    checkpoint_s: float = 0.0  # medxfer: writing one Lightning checkpoint (weights + optimizer state)
    checkpoint_mb: float = 0.0

    def step_s(self) -> float:
        n = len(self.finished)
        return (self.finished[-1] - self.finished[0]) / (n - 1)

    def wait_s(self) -> float:
        return statistics.mean(self.arrived[i] - self.finished[i - 1] for i in range(1, len(self.finished)))

    def compute_s(self) -> float:
        return statistics.mean(self.finished[i] - self.arrived[i] for i in range(1, len(self.finished)))

    def fixed_s(self) -> float:
        """Set-up and tear-down of the run (for Lightning: Trainer set-up, checkpoint save)."""
        return self.wall_s - (self.finished[-1] - self.arrived[0])


def run_bare(model: torch.nn.Module, loader, loss_fn, lr: float, steps: int, settings: dict[str, Any]) -> StepLog:
    """The plain PyTorch loop with the same optimizer and schedule as medxfer's ``full`` strategy."""
    from medxfer.training.strategies import make_optimizer

    device = settings["device"]
    log = StepLog()
    started = time.perf_counter()
    model = model.to(device).train()
    optimizer = make_optimizer("adam", [{"params": list(model.parameters())}], lr)  # medxfer's (fused) Adam
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    autocast = torch.autocast("cuda", dtype=settings["amp_dtype"], enabled=settings["amp"])
    scaler = torch.amp.GradScaler("cuda", enabled=settings["amp_dtype"] == torch.float16)
    iterator = iter(loader)
    for _ in range(steps):
        batch = next(iterator)
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        annotated = batch["annotated"].to(device, non_blocking=True)
        _sync(device)
        log.arrived.append(time.perf_counter())
        # The usual order (and medxfer's TrainingTask's): the old gradients are released before the
        # forward pass, so they do not sit in memory beside its activations.
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(image)
            loss = loss_fn(logits, label, annotated=annotated)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        log.losses.append(float(loss.detach()))  # as Lightning's logging of train_loss, one sync per step
        _sync(device)
        log.finished.append(time.perf_counter())
    log.wall_s = time.perf_counter() - started
    return log


def run_medxfer(model: torch.nn.Module, loader, loss_fn, lr: float, steps: int, settings: dict[str, Any]) -> StepLog:
    """SegmentationTask in a Trainer configured as ``medxfer.finetune.run_finetune`` configures it."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from medxfer.config import TrainConfig
    from medxfer.finetune import resume_checkpoint
    from medxfer.training.tasks import SegmentationTask

    device = settings["device"]
    log = StepLog()

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            log.arrived.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            log.losses.append(float(outputs["loss"].detach()))
            _sync(device)
            log.finished.append(time.perf_counter())

    train = TrainConfig(strategy="full", optimizer="adam", lr=lr, scheduler="cosine", max_steps=steps,
                        batch_size=loader.batch_size, precision=settings["precision"])
    started = time.perf_counter()
    task = SegmentationTask(model, loss_fn, train, n_classes=2, size_multiple=int(model.required_multiple),
                            total_steps=steps)
    with tempfile.TemporaryDirectory() as directory:
        checkpointing = resume_checkpoint(Path(directory), train.checkpoint_every_s)  # as run_finetune
        trainer = L.Trainer(
            default_root_dir=directory, max_epochs=-1, max_steps=steps, accelerator="auto", devices=1,
            precision=train.precision, callbacks=[checkpointing, StepTimer()], logger=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=train.log_every_n_steps,
            num_sanity_val_steps=0, deterministic=False,
        )
        trainer.fit(task, loader)
        log.wall_s = time.perf_counter() - started
        # What finetune's ModelCheckpoint writes after every epoch (last.ckpt), timed on its own.
        probe = Path(directory) / "probe.ckpt"
        log.checkpoint_s, _ = timed(lambda: trainer.save_checkpoint(probe))
        log.checkpoint_mb = probe.stat().st_size / 2**20
    return log


def flops_per_step(model: torch.nn.Module, batch: dict, loss_fn, settings: dict[str, Any]) -> int:
    """FLOPs of one forward + backward pass (the optimizer update is negligible and not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = settings["device"]
    model = model.to(device).train()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=settings["amp_dtype"], enabled=settings["amp"]):
            loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def matmul_peak_gflops(settings: dict[str, Any], size: Optional[int] = None, repeat: int = 5) -> float:
    """Best rate of an n x n matrix multiply in the dtype the model computes in (fp32; bf16/fp16 with AMP)."""
    device = settings["device"]
    size = size or (8192 if device.type == "cuda" else 2048)
    dtype = settings["amp_dtype"]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def measure_model(preset: str, options: dict[str, Any], batch_size: int, shape: tuple[int, ...], steps: int,
                  rounds: int, settings: Optional[dict[str, Any]] = None, lr: float = 1e-3,
                  budget_s: float = 60.0) -> dict[str, Any]:
    """Both loops on the same model and batches, alternating; the best of ``rounds`` per side (fewer
    rounds once ``budget_s`` is spent, at least one)."""
    from medxfer.models import build_segmenter
    from medxfer.training.losses import build_loss

    _quiet_lightning()
    settings = settings or device_settings()
    torch.manual_seed(0)
    initial = build_segmenter(preset=preset, in_channels=1, n_classes=2, **options)
    initial = prepare_model(initial, len(shape))
    loss_fn = build_loss("dice_ce")
    cases = synthetic_cases(batch_size * steps, shape)  # one epoch = the measured steps
    in_channels = initial.encoder.in_channels
    flops = flops_per_step(copy.deepcopy(initial), next(iter(make_loader(cases, in_channels, batch_size))),
                           loss_fn, settings)
    logs: dict[str, list[StepLog]] = {"bare": [], "medxfer": []}
    runners = {"bare": run_bare, "medxfer": run_medxfer}
    started = time.perf_counter()
    for round_index in range(rounds):
        for side in in_turn("bare", "medxfer", round_index):
            loader = make_loader(cases, in_channels, batch_size)
            logs[side].append(runners[side](copy.deepcopy(initial), loader, loss_fn, lr, steps, settings))
        if time.perf_counter() - started > budget_s:  # a heavily loaded machine: keep the total in bounds
            break
    best = {side: min(runs, key=StepLog.step_s) for side, runs in logs.items()}
    losses_bare, losses_medxfer = logs["bare"][0].losses, logs["medxfer"][0].losses
    return {
        "preset": preset, "options": options, "batch_size": batch_size, "shape": list(shape), "steps": steps,
        "rounds": len(logs["bare"]), "flops_per_step": flops,
        "same_losses": bool(np.allclose(losses_bare, losses_medxfer, rtol=1e-4, atol=1e-5)),
        "losses": {"bare": losses_bare, "medxfer": losses_medxfer},
        **{f"{side}_{key}": getattr(best[side], f"{key}")() for side in best
           for key in ("step_s", "wait_s", "compute_s", "fixed_s")},
        "all_step_s": {side: [log.step_s() for log in runs] for side, runs in logs.items()},
        "checkpoint_s": min(log.checkpoint_s for log in logs["medxfer"]),
        "checkpoint_mb": logs["medxfer"][0].checkpoint_mb,
    }


def main(models=MODELS) -> list[dict[str, Any]]:
    settings = device_settings()
    peak_before = matmul_peak_gflops(settings)
    results = []
    for name, preset, options, batch_size, shape, steps, rounds in models:
        started = time.perf_counter()
        result = measure_model(preset, options, batch_size, shape, steps, rounds, settings)
        result["name"], result["seconds"] = name, time.perf_counter() - started
        results.append(result)
        print(f"   {name}: bare {result['bare_step_s']:.3f} s/step, medxfer {result['medxfer_step_s']:.3f} s/step, "
              f"loader wait {result['medxfer_wait_s'] * 1e3:.1f} ms, same losses: {result['same_losses']} "
              f"({result['seconds']:.0f} s)", flush=True)
    peak = max(peak_before, matmul_peak_gflops(settings))
    # Lightning's own cost per step, where it is not hidden by the model: a tiny U-Net on 64x64 crops.
    tiny = measure_model("unet", {"width": 4, "depth": 3}, 2, (64, 64), 12, 3, settings)

    rows = []
    for r in results:
        label = f"{r['name']} {'x'.join(map(str, r['shape']))} batch {r['batch_size']}"
        ips_bare, ips_medxfer = r["batch_size"] / r["bare_step_s"], r["batch_size"] / r["medxfer_step_s"]
        ratio = ips_medxfer / ips_bare
        rows.append(row(f"{label}: training images/s (medxfer / bare; same losses: {r['same_losses']})",
                        "bare PyTorch loop", ips_medxfer, ips_bare, "images/s", ratio,
                        f">= {OVERHEAD_TARGET}", bool(ratio >= OVERHEAD_TARGET and r["same_losses"])))
        achieved = r["flops_per_step"] / r["medxfer_step_s"] / 1e9
        rows.append(row(f"{label}: achieved GFLOP/s (ratio = model FLOPs utilisation)",
                        f"{str(settings['amp_dtype']).replace('torch.', '')} matmul peak", achieved, peak, "GFLOP/s",
                        achieved / peak))
        wait_share = r["medxfer_wait_s"] / r["medxfer_step_s"]
        rows.append(row(f"{label}: loader wait per step (ratio = share of the step)", "step time",
                        r["medxfer_wait_s"] * 1e3, r["medxfer_step_s"] * 1e3, "ms", wait_share,
                        f"<= {LOADER_WAIT_TARGET}", bool(wait_share <= LOADER_WAIT_TARGET)))
        rows.append(row(f"{label}: writing last.ckpt ({r['checkpoint_mb']:.0f} MB, weights + Adam state), which "
                        "finetune writes every train.checkpoint_every_s (default 60 s) of training (ratio = in training steps)", "one training step",
                        r["checkpoint_s"], r["medxfer_step_s"], "s", r["checkpoint_s"] / r["medxfer_step_s"]))
    overhead_ms = (tiny["medxfer_step_s"] - tiny["bare_step_s"]) * 1e3
    rows.append(row(f"Lightning's own cost per step: tiny unet (width 4) 64x64 batch 2, where it dominates "
                    f"(medxfer - bare = {overhead_ms:.1f} ms; same losses: {tiny['same_losses']})", "bare PyTorch loop",
                    tiny["medxfer_step_s"] * 1e3, tiny["bare_step_s"] * 1e3, "ms/step",
                    tiny["medxfer_step_s"] / tiny["bare_step_s"]))
    notes = [
        f"Device {settings['device']}, precision {settings['precision']} (medxfer's `train.precision: auto`: "
        "bf16/fp16 mixed precision on a GPU, fp32 on the CPU); channels-last weights where finetune uses them "
        "(2D models on a GPU; 3D stays NCDHW). Both sides use the same settings, so the ratio is the loop's.",
        "Models: " + "; ".join(f"{r['name']} {r['options']} ({r['flops_per_step'] / 1e9:.1f} GFLOP per forward"
                               f"+backward, batch {r['batch_size']})" for r in results)
        + ". The 2D models are the presets at their default width; unet3d is reduced to fit the time budget.",
        "Trainer as in run_finetune: logger off, finetune's resume checkpoint (last.ckpt every 60 s of training, "
        "outside the measured steps), no sanity validation. Set-up + checkpoint + tear-down per fit (s): "
        + ", ".join(f"{r['name']} {r['medxfer_fixed_s']:.2f} (bare loop {r['bare_fixed_s']:.2f})" for r in results)
        + ".",
        "Loader: CaseDataset + training_augmentation (MONAI flips, rot90, intensity), num_workers=0 as in "
        "finetune's default; the medxfer side's wait includes Lightning's bookkeeping between steps.",
        "Step times per round (s): " + "; ".join(
            f"{r['name']} bare {[round(t, 3) for t in r['all_step_s']['bare']]}, "
            f"medxfer {[round(t, 3) for t in r['all_step_s']['medxfer']]}" for r in results),
    ]
    write_result("training", rows, {"results": results, "tiny": tiny, "peak_gflops": peak, "settings": {
        k: str(v) for k, v in settings.items()}, NOTES_KEY: notes})
    return rows


if __name__ == "__main__":
    main()
