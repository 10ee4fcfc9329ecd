"""Sweep scaling: the same 8 demo fine-tuning runs sequentially, with ``--workers 2``, and on Ray (2 CPUs).

Each side is ``medxfer.sweep.runner.run_sweep`` on a fresh output folder, timed end to end (worker
start-up, and for Ray ``ray.init``, included: what a user waits for). Every side must finish the same 8
run ids with the same Dice. Ray is measured only where it is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from common import NOTES_KEY, row, write_result

TARGET = 1.7
# 8 runs (4 seeds x 2 learning rates) with the settings of the demo's target runs (medxfer.demo): U-Net
# width 16 depth 4 from scratch on 5 domain-B images, 30 epochs of batch 4 (60 steps, validation after
# each epoch), evaluated on the 8 test tiles.
GRID = {
    "name": "bench-sweep",
    "base": {"data": {"name": "demo", "options": {"domain": "B"}, "train_images": 5},
             "model": {"preset": "unet", "width": 16, "depth": 4},
             "train": {"strategy": "scratch", "max_epochs": 30, "batch_size": 4}},
    "axes": {"seed": [0, 1, 2, 3], "train.lr": [0.001, 0.003]},
}


def _quiet() -> None:
    import lightning  # noqa: F401

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("lightning")] + ["lightning"]:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def _worker_output_to(path: Path):
    """Send what worker processes print (Lightning's banners) to a file instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_side(grid: dict, backend: str, workers: int) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    if workers == 1 and backend == "local":
        # Sequential runs get 1 torch thread, as each parallel worker has: the same per-run resources and
        # bit-identical results on every side (and on a loaded 2-core machine 2 OpenMP threads per run are
        # slower, not faster, which would flatter the parallel sides).
        torch.set_num_threads(1)
    try:
        return _run_side(grid, backend, workers)
    finally:
        torch.set_num_threads(threads)


def _run_side(grid: dict, backend: str, workers: int) -> dict[str, Any]:
    from medxfer.finetune import summary_dice
    from medxfer.sweep.runner import run_sweep
    from medxfer.sweep.store import iter_records

    with tempfile.TemporaryDirectory() as out:
        wall_start = datetime.now(timezone.utc)
        started = time.perf_counter()
        with _worker_output_to(Path(out) / "workers.log"):
            summary = run_sweep(grid, out, backend=backend, workers=workers)
        seconds = time.perf_counter() - started
        records = list(iter_records(Path(out), kind="finetune"))
    dice = {r["run_id"]: summary_dice(r) for r in records}
    # When the first run began (its finish time minus its own duration): worker / Ray start-up before it.
    first_start = min(datetime.fromisoformat(r["finished"]) - timedelta(seconds=r["timings"]["total_s"])
                      for r in records)
    return {"seconds": seconds, "counts": summary.counts(), "dice": dice,
            "startup_s": max(0.0, (first_start - wall_start).total_seconds()),
            "run_s": sum(r["timings"]["total_s"] for r in records)}


_BUSY = "import time; t = time.perf_counter(); sum(i * i for i in range(6_000_000)); print(time.perf_counter() - t)"


def parallel_capacity(processes: int = 2) -> float:
    """How many cores this run can actually use now: ``processes`` x (time of one busy Python process alone)
    / (time of each when ``processes`` run at once). 2.0 on an idle 2-core machine; less when shared."""
    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    alone = min(run(1) for _ in range(2))
    together = min(run(processes) for _ in range(2))
    return processes * alone / together


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def main(grid: dict = GRID) -> list[dict[str, Any]]:
    _quiet()
    sides = {"sequential (1 thread)": ("local", 1), "workers 2": ("local", 2)}
    if ray_available():
        sides["ray, 2 CPUs"] = ("ray", 1)
    capacity_before = parallel_capacity()
    results = {}
    for name, (backend, workers) in sides.items():
        results[name] = run_side(grid, backend, workers)
        print(f"   {name}: {results[name]['seconds']:.1f} s {results[name]['counts']}", flush=True)
    capacity = (capacity_before + parallel_capacity()) / 2
    print(f"   cores free for this benchmark (2 busy processes vs 1): {capacity:.2f}", flush=True)
    base_name = "sequential (1 thread)"
    base = results[base_name]
    rows, notes = [], []
    for name, result in results.items():
        if name == base_name:
            continue
        same_runs = set(result["dice"]) == set(base["dice"]) and len(base["dice"]) == 8
        same_runs &= all(result["dice"][k] == base["dice"][k] for k in base["dice"] if k in result["dice"])
        diff = max((abs(result["dice"][k] - base["dice"][k]) for k in base["dice"] if k in result["dice"]),
                   default=float("nan"))
        speedup = base["seconds"] / result["seconds"]
        rows.append(row(f"8 demo runs, {name} (ratio = speed-up; same 8 runs, same Dice: {same_runs})", base_name,
                        result["seconds"], base["seconds"], "s", speedup, f">= {TARGET:g}",
                        bool(speedup >= TARGET and same_runs)))
        steady = (base["seconds"] - base["startup_s"]) / (result["seconds"] - result["startup_s"])
        rows.append(row(f"8 demo runs, {name}, start-up left out (ratio = speed-up)", base_name,
                        result["seconds"] - result["startup_s"], base["seconds"] - base["startup_s"], "s", steady))
        notes.append(f"{name}: start-up before the first run {result['startup_s']:.1f} s (sequential: "
                     f"{base['startup_s']:.1f} s); status {result['counts']}, largest Dice difference from the sequential runs "
                     f"{diff:.1e}; mean time of a run inside its worker {result['run_s'] / 8:.1f} s (sequential: "
                     f"{base['run_s'] / 8:.1f} s).")
    rows.append(row("cores actually free now (ratio = 2 busy processes' throughput / 1's; caps any speed-up)",
                    "1 process", capacity, 1.0, "cores", capacity))
    if not ray_available():
        notes.append("Ray is not installed (pip install 'medxfer[ray]'): the Ray side was skipped.")
    notes.append("Runs: the demo's target runs (unet width 16 depth 4, 5 images, 30 epochs of batch 4, validation "
                 "each epoch, test on 8 tiles) for 4 seeds x 2 learning rates. Times include process / Ray "
                 "start-up; the sequential side runs in this process with 1 torch thread, as each worker has. "
                 "The parallel sides are limited by the cores actually free (measured before and after).")
    write_result("sweep", rows, {"results": results, "free_cores": capacity, NOTES_KEY: notes})
    return rows


if __name__ == "__main__":
    main()
