"""Lazy 3D training data: peak memory against the number of cases, and the share of a step spent waiting.

Two sides, each in a fresh process, each training the same small network for the same steps on patches read
from a preprocessed cache on disk (``CachedPatchDataset`` + ``EpochSeededSampler``, the default ``num_workers`` of
cache-backed data, as ``medxfer finetune`` feeds a ``data.preprocess`` run):

- **200 cases** of 128^3 (float16 images, uint8 labels: 1.2 GB on disk, deleted afterwards);
- **20 cases** of 128^3 (the baseline).

Every case is visited (one patch each per epoch) before the steps are timed, so a pipeline that kept what it
read would grow with the cases. Peak memory = the training process's peak RSS (``VmHWM``) plus, for each
loader worker, the largest worker peak (``RUSAGE_CHILDREN``). The target: 200 cases need at most 1.3x the
memory of 20. Data wait = time blocked in ``next(loader)`` over the step time (``unet3d`` width 8, depth 4,
64^3 patches, batch 2, fp32 on the CPU).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (load_average, load_note, peak_rss_since_reset_mb, reset_peak_rss, row, synthetic_cache,
                    write_and_print)

CASE_SHAPE = (128, 128, 128)
SIDES = (200, 20)
PATCH = (64, 64, 64)
BATCH = 2
STEPS = 8
WIDTH = 8
RSS_TARGET = 1.3


def pipeline(cases, patch=PATCH, steps=STEPS, width=WIDTH, workers=None) -> dict[str, Any]:
    """Visit every case once through the loader, then time ``steps`` training steps; memory and wait."""
    import torch
    from torch.utils.data import DataLoader

    from medxfer.data.patch_dataset import CachedPatchDataset, default_num_workers
    from medxfer.data.sampling import EpochSeededSampler
    from medxfer.models import build_segmenter
    from medxfer.training.strategies import make_optimizer

    workers = default_num_workers(True) if workers is None else workers
    torch.manual_seed(0)
    model = build_segmenter(preset="unet3d", in_channels=1, n_classes=3, width=width, depth=4).train()
    optimizer = make_optimizer("adam", [{"params": list(model.parameters())}], lr=1e-4)
    dataset = CachedPatchDataset(cases, 3, patch, foreground_ratio=0.33, augment=True)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=EpochSeededSampler(len(dataset), 0),
                        num_workers=workers, persistent_workers=workers > 0)
    reset_peak_rss()
    start_rss = peak_rss_since_reset_mb()
    visited = 0
    for batch in loader:  # one epoch: every case read once
        visited += len(batch["index"])
    stream = iter(loader)
    wait = compute = 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        try:
            batch = next(stream)
        except StopIteration:
            stream = iter(loader)
            batch = next(stream)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"]).backward()
        optimizer.step()
        t2 = time.perf_counter()
        if step > 0:  # the first step allocates the optimizer state
            wait += t1 - t0
            compute += t2 - t1
    del stream, loader  # workers end; their peak shows in RUSAGE_CHILDREN
    main_mb = peak_rss_since_reset_mb()
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0 if workers else 0.0
    return {"cases": len(cases), "visited": visited, "workers": workers, "main_peak_mb": main_mb,
            "main_start_mb": start_rss, "worker_peak_mb": worker_mb, "total_peak_mb": main_mb + workers * worker_mb,
            "wait_share": wait / (wait + compute), "step_s": (wait + compute) / steps}


def child(folder: str, n: int) -> dict[str, Any]:
    import numpy as np

    from medxfer.data.base import Case

    cases = []
    for i in range(n):
        paths = {"image": f"{folder}/case{i:04d}_image.npy", "label": f"{folder}/case{i:04d}_label.npy",
                 "foreground": f"{folder}/case{i:04d}_fg.npy"}
        cases.append(Case(image=np.load(paths["image"], mmap_mode="r"), label=None, case_id=f"case{i:04d}",
                          meta={"cache": paths}))
    return pipeline(cases)


def run_side(folder: Path, n: int) -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, str(here / "bench_data3d.py"), "--child", str(folder), str(n)], cwd=here,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_data3d child ({n} cases) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> list[dict[str, Any]]:
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_data3d_") as tmp:
        started = time.perf_counter()
        synthetic_cache(Path(tmp), max(SIDES), CASE_SHAPE, "float16")  # the 20-case side reads the first 20
        write_s = time.perf_counter() - started
        disk_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        results = {n: run_side(Path(tmp), n) for n in SIDES}
    big, small = results[max(SIDES)], results[min(SIDES)]
    ratio = big["total_peak_mb"] / small["total_peak_mb"]
    rows = [
        row(f"peak memory training from the on-disk cache, {max(SIDES)} vs {min(SIDES)} cases of "
            f"{'x'.join(map(str, CASE_SHAPE))} (training process + {big['workers']} loader worker(s); "
            "ratio = 200 / 20)", f"{min(SIDES)} cases", big["total_peak_mb"], small["total_peak_mb"], "MB", ratio,
            f"<= {RSS_TARGET}", bool(ratio <= RSS_TARGET)),
        row(f"share of a training step waiting for data ({max(SIDES)} cases, {big['workers']} worker(s), unet3d "
            f"width {WIDTH} at {'x'.join(map(str, PATCH))}, batch {BATCH}, CPU)", "-", big["wait_share"], None,
            "share", None),
    ]
    notes = [f"{max(SIDES)} cases written in {write_s:.0f} s ({disk_mb:.0f} MB on disk, deleted afterwards); each "
             f"side visits every case once, then times {STEPS} steps.",
             "Per side: " + "; ".join(f"{n} cases: training process {r['main_peak_mb']:.0f} MB peak (started at "
                                      f"{r['main_start_mb']:.0f}), worker {r['worker_peak_mb']:.0f} MB peak, wait "
                                      f"{r['wait_share']:.1%} of {r['step_s']:.2f} s steps" for n, r in results.items())
             + f". {load_note(load_before)}"]
    return write_and_print("data3d", rows, notes, {"sides": {str(n): r for n, r in results.items()}}, load_before)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
