"""Sweep scaling: the same 8 demo fine-tuning runs sequentially, with ``--workers 2``, and on Ray (2 CPUs).

Each side is the ``medxfer sweep`` command a researcher types, in a fresh process on a fresh output
folder, timed from launch to exit: interpreter, imports, worker / Ray start-up and the runs, all paid
by every side alike. The baseline is the faster of two sequential sides (the CLI's default torch
threads, and 1 thread as each parallel worker has). Every side must finish the same 8 run ids with the
same Dice. Ray is measured only where it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import yaml

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
SEQUENTIAL = ("sequential, default threads", "sequential, 1 thread")


def medxfer_command() -> str:
    return str(Path(sys.executable).with_name("medxfer"))


def run_side(grid: dict, backend: str = "local", workers: int = 1, threads: Optional[int] = None) -> dict[str, Any]:
    """``medxfer sweep`` on ``grid`` in a fresh process; its wall time, start-up and each run's Dice."""
    from medxfer.finetune import summary_dice
    from medxfer.records import iter_records

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("OMP_NUM_THREADS", None)  # torch's thread count at start-up: its default unless asked
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as out:
        grid_path = Path(out) / "grid.yaml"
        grid_path.write_text(yaml.safe_dump(grid))
        command = [medxfer_command(), "sweep", str(grid_path), "--out", str(Path(out) / "sweep")]
        command += ["--workers", str(workers)] if workers > 1 else []
        command += ["--backend", backend] if backend != "local" else []
        wall_start = datetime.now(timezone.utc)
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{' '.join(command[1:])} exited {done.returncode}: {last[0]}")
        records = list(iter_records(Path(out) / "sweep", kind="finetune"))
    dice = {r["run_id"]: summary_dice(r) for r in records}
    # When the first run began (its finish time minus its own duration): everything before it is start-up.
    first_start = min(datetime.fromisoformat(r["finished"]) - timedelta(seconds=r["timings"]["total_s"])
                      for r in records)
    return {"seconds": seconds, "counts": {"done": len(records)}, "dice": dice,
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
    sides = {SEQUENTIAL[0]: ("local", 1, None), SEQUENTIAL[1]: ("local", 1, 1), "workers 2": ("local", 2, None)}
    if ray_available():
        sides["ray, 2 CPUs"] = ("ray", 1, None)
    capacity_before = parallel_capacity()
    results = {}
    for name, (backend, workers, threads) in sides.items():
        results[name] = run_side(grid, backend, workers, threads)
        print(f"   {name}: {results[name]['seconds']:.1f} s {results[name]['counts']}", flush=True)
    capacity = (capacity_before + parallel_capacity()) / 2
    print(f"   cores free for this benchmark (2 busy processes vs 1): {capacity:.2f}", flush=True)
    base_name = min(SEQUENTIAL, key=lambda name: results[name]["seconds"])
    base = results[base_name]
    # Results are checked against the 1-thread sequential runs: the same thread count per run as each
    # worker, hence bit-identical Dice (a different thread count changes the order of float sums).
    same_threads = results[SEQUENTIAL[1]]["dice"]
    rows, notes = [], []
    n_runs = len(base["dice"])
    for name, result in results.items():
        if name in SEQUENTIAL:
            continue
        same_runs = set(result["dice"]) == set(same_threads)
        same_runs &= all(result["dice"][k] == same_threads[k] for k in same_threads if k in result["dice"])
        diff = max((abs(result["dice"][k] - same_threads[k]) for k in same_threads if k in result["dice"]),
                   default=float("nan"))
        speedup = base["seconds"] / result["seconds"]
        rows.append(row(f"{n_runs} demo runs, medxfer sweep {name} (ratio = speed-up; same runs, same Dice: "
                        f"{same_runs})", base_name, result["seconds"], base["seconds"], "s", speedup,
                        f">= {TARGET:g}", bool(speedup >= TARGET and same_runs)))
        steady = (base["seconds"] - base["startup_s"]) / (result["seconds"] - result["startup_s"])
        rows.append(row(f"{n_runs} demo runs, {name}, start-up left out (ratio = speed-up)", base_name,
                        result["seconds"] - result["startup_s"], base["seconds"] - base["startup_s"], "s", steady))
        notes.append(f"{name}: start-up before the first run {result['startup_s']:.1f} s ({base_name}: "
                     f"{base['startup_s']:.1f} s); runs done {result['counts']['done']}, largest Dice difference from "
                     f"the 1-thread sequential runs {diff:.1e}; mean time of a run inside its worker "
                     f"{result['run_s'] / n_runs:.1f} s ({base_name}: {base['run_s'] / n_runs:.1f} s).")
    rows.append(row("cores actually free now (ratio = 2 busy processes' throughput / 1's; caps any speed-up)",
                    "1 process", capacity, 1.0, "cores", capacity))
    if not ray_available():
        notes.append("Ray is not installed (pip install 'medxfer[ray]'): the Ray side was skipped.")
    notes.append("Sequential sides: " + ", ".join(f"{name} {results[name]['seconds']:.1f} s (start-up "
                                                  f"{results[name]['startup_s']:.1f} s)" for name in SEQUENTIAL)
                 + f"; the faster ({base_name}) is the baseline.")
    notes.append("Runs: the demo's target runs (unet width 16 depth 4, 5 images, 30 epochs of batch 4, validation "
                 "each epoch, test on 8 tiles) for 4 seeds x 2 learning rates. Each side is `medxfer sweep` in a "
                 "fresh process, timed from launch to exit; start-up = launch to the start of the first run "
                 "(interpreter, imports, and worker processes or Ray). The parallel sides are limited by the cores "
                 "actually free (measured before and after).")
    write_result("sweep", rows, {"results": results, "free_cores": capacity, NOTES_KEY: notes})
    return rows


if __name__ == "__main__":
    main()
