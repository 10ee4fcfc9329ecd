"""`make bench`: run every benchmark (each a module here with a ``main()``), then write the summary.

``python benchmarks/run_all.py [NAME ...]`` runs the named ones only (e.g. ``bench_metrics``); results
of the others stay as they were in ``benchmarks/results``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import summary_markdown, write_summary  # noqa: E402

BENCHMARKS = ["bench_training", "bench_3d", "bench_data3d", "bench_warmup", "bench_3d_gpu", "bench_metrics", "bench_robustness", "bench_estimators", "bench_sweep",
              "bench_memory", "bench_demo", "bench_losses",
              "bench_convergence", "bench_threads", "bench_layout", "bench_analyze"]


def main(names: list[str]) -> int:
    failed = []
    started = time.perf_counter()
    for name in names or BENCHMARKS:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        # Each benchmark in a fresh process: one's threads, heap and imports must not slow the next (the 2D
        # metric suite measured 15% slower right after the training benchmark in one process).
        if subprocess.run([sys.executable, str(HERE / f"{name}.py")], cwd=HERE).returncode != 0:
            failed.append(name)  # one broken benchmark must not hide the others
            print(f"{name} failed (its error is above)", flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    path = write_summary()
    print()
    print(summary_markdown())
    print(f"All benchmarks: {time.perf_counter() - started:.0f} s; summary in {path}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
