"""`make bench`: run every benchmark (each a module here with a ``main()``), then write the summary.

``python benchmarks/run_all.py [NAME ...]`` runs the named ones only (e.g. ``bench_metrics``); results
of the others stay as they were in ``benchmarks/results``.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import summary_markdown, write_summary  # noqa: E402

BENCHMARKS = ["bench_training", "bench_metrics", "bench_robustness", "bench_sweep", "bench_memory"]


def main(names: list[str]) -> int:
    failed = []
    started = time.perf_counter()
    for name in names or BENCHMARKS:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            importlib.import_module(name).main()
        except Exception as exc:  # one broken benchmark must not hide the others
            failed.append(name)
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    path = write_summary()
    print()
    print(summary_markdown())
    print(f"All benchmarks: {time.perf_counter() - started:.0f} s; summary in {path}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
