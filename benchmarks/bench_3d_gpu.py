"""3D training throughput on a GPU: ``unet3d`` and MONAI's ``DynUNet`` at 128^3, batch 2, bf16 autocast.

Skips (writes nothing) without a CUDA GPU. For each network, two sides in turn:

- **loader**: patches read from a preprocessed cache on disk (``CachedPatchDataset``, 16 synthetic cases of
  160^3, float32, augmentation on) through a ``DataLoader`` with the default ``num_workers`` of cache-backed
  data (``default_num_workers(True)``), pinned memory, copied to the GPU each step, as ``medxfer finetune``
  feeds a ``data.preprocess`` run;
- **fixed batch** (the baseline): the same step on one batch that stays on the GPU: the network alone.

A step = zero_grad, forward under ``torch.autocast(bfloat16)``, cross-entropy, backward, fused Adam
(``make_optimizer``), then ``torch.cuda.synchronize()`` so that the step's GPU time is inside it. Data wait =
time blocked in ``next(loader)`` plus the host-to-device copy; its share = wait / (wait + step). Peak GPU
memory = ``torch.cuda.max_memory_allocated`` over the network's steps. The ratio of a loader row is its
steps/s over the fixed batch's: 1.0 = the data pipeline costs nothing.

``python benchmarks/bench_3d_gpu.py`` takes about 2 minutes on one H200 (benchmarks/gpu_check.sh runs it).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import load_average, row, synthetic_cache, write_and_print

PATCH = (128, 128, 128)
BATCH = 2
N_CASES = 16
CASE_SHAPE = (160, 160, 160)
N_CLASSES = 3
WARMUP_STEPS = 5
STEPS = 30


def build_models(width: int = 32) -> dict[str, torch.nn.Module]:
    from monai.networks.nets import DynUNet

    from medxfer.models import build_segmenter

    torch.manual_seed(0)
    unet3d = build_segmenter(preset="unet3d", in_channels=1, n_classes=N_CLASSES, width=width)
    dynunet = DynUNet(spatial_dims=3, in_channels=1, out_channels=N_CLASSES, kernel_size=[3] * 5,
                      strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2, 2, 2, 2],
                      filters=[width * k for k in (1, 2, 4, 8, 16)], norm_name="instance", act_name="leakyrelu")
    return {"unet3d": unet3d, "DynUNet (nnU-Net)": dynunet}


def make_loader(cases, workers: int):
    from torch.utils.data import DataLoader

    from medxfer.data.patch_dataset import CachedPatchDataset
    from medxfer.data.sampling import EpochSeededSampler

    dataset = CachedPatchDataset(cases, N_CLASSES, PATCH, foreground_ratio=0.33, augment=True)
    # as many items as the steps need, cycling over the cases
    sampler = EpochSeededSampler(len(dataset), 0)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, pin_memory=True,
                      persistent_workers=workers > 0, drop_last=True)


def batches(loader):
    while True:
        yield from loader


def measure(model: torch.nn.Module, source, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Train ``steps`` steps (after ``warmup``) on batches from ``source`` (an iterator of CPU batches, or
    None = one fixed batch on the GPU)."""
    from medxfer.training.strategies import make_optimizer

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # the CPU path exists for the smoke test
    model = model.to(device).train()
    optimizer = make_optimizer("adam", [{"params": list(model.parameters())}], lr=1e-4)
    fixed = None
    if source is None:
        fixed = (torch.randn(BATCH, 1, *PATCH, device=device), torch.randint(0, N_CLASSES, (BATCH, *PATCH), device=device))
    wait = compute = 0.0
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = None
    for step in range(warmup + steps):
        if step == warmup:
            wait = compute = 0.0
            started = time.perf_counter()
        t0 = time.perf_counter()
        if fixed is None:
            batch = next(source)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
        else:
            image, label = fixed
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(image)
        loss = torch.nn.functional.cross_entropy(logits.float(), label)
        loss.backward()
        optimizer.step()
        sync()
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
    total = time.perf_counter() - started
    result = {"steps_per_s": steps / total, "wait_share": wait / (wait + compute), "wait_s": wait,
              "compute_s": compute,
              "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
              "loss": float(loss.detach())}
    model.cpu()
    del optimizer
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        print("bench_3d_gpu: skipped (no CUDA GPU); results/3d_gpu.json is left as it was")
        return []
    from medxfer.data.patch_dataset import default_num_workers

    device = torch.device("cuda")
    workers = default_num_workers(True)
    load_before = load_average()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_3d_gpu_") as tmp:
        started = time.perf_counter()
        cases = synthetic_cache(Path(tmp), N_CASES, CASE_SHAPE, "float32")
        cache_s = time.perf_counter() - started
        loader = make_loader(cases, workers)
        stream = batches(loader)
        for name, model in build_models().items():
            results[f"{name} fixed batch"] = measure(model, None, STEPS, WARMUP_STEPS, device)
            results[f"{name} loader"] = measure(model, stream, STEPS, WARMUP_STEPS, device)
            print(f"  {name}: " + "; ".join(f"{side} {results[f'{name} {side}']['steps_per_s']:.2f} steps/s"
                                           for side in ("fixed batch", "loader")), flush=True)
        del stream, loader
    rows = []
    for name in ("unet3d", "DynUNet (nnU-Net)"):
        fixed, fed = results[f"{name} fixed batch"], results[f"{name} loader"]
        rows.append(row(f"{name} 128^3 batch 2 bf16 training on {torch.cuda.get_device_name(0)}: steps/s with patches "
                        f"from the on-disk cache ({workers} loader workers; ratio = share of the network-only speed)",
                        "same step, fixed batch on the GPU", fed["steps_per_s"], fixed["steps_per_s"], "steps/s",
                        fed["steps_per_s"] / fixed["steps_per_s"]))
        rows.append(row(f"{name} 128^3 batch 2: share of step time waiting for data (loader + host-to-device copy)",
                        "-", fed["wait_share"], None, "share", None))
        rows.append(row(f"{name} 128^3 batch 2 bf16: peak GPU memory (ratio = unet3d / DynUNet)", "DynUNet",
                        fed["peak_gpu_gib"], results["DynUNet (nnU-Net) loader"]["peak_gpu_gib"], "GiB",
                        fed["peak_gpu_gib"] / results["DynUNet (nnU-Net) loader"]["peak_gpu_gib"]))
    notes = [f"{STEPS} timed steps after {WARMUP_STEPS} warm-up steps per side; {N_CASES} cached cases of "
             f"{'x'.join(map(str, CASE_SHAPE))} float32 written in {cache_s:.0f} s; {workers} loader workers "
             f"(default_num_workers(True)); load average {load_before} before, {load_average()} after."]
    notes.append("Per side: " + "; ".join(f"{k}: {v['steps_per_s']:.2f} steps/s, wait {v['wait_share']:.1%}, "
                                         f"peak {v['peak_gpu_gib']:.1f} GiB" for k, v in results.items()) + ".")
    return write_and_print("3d_gpu", rows, notes, {"results": results, "workers": workers,
                                                   "load_average_after": load_average()}, load_before)


if __name__ == "__main__":
    main()
