"""Shared helpers of the benchmarks: timing, peak memory, result files, the summary table.

Every benchmark compares two sides measured in the same run on the same machine, checks that both
computed the same result, and reports the ratio against the named baseline.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medxfer.io import atomic_write_json, atomic_write_text  # noqa: E402


def best_time(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Minimum wall time over ``repeat`` calls after ``warmup`` calls (the least noisy estimate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median_time(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}


def write_result(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """``rows``: one dict per comparison with keys what, baseline, medxfer_s, baseline_s, ratio, target, met."""
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(),
                             "machine": machine(), "rows": rows, **(extra or {})})
    return path


def summary_markdown() -> str:
    lines = ["# medxfer benchmarks", ""]
    files = sorted(RESULTS.glob("*.json"))
    if files:
        first = json.loads(files[0].read_text())
        m = first["machine"]
        lines += [f"Measured {first['date'][:10]} on {m['cpu_count']} CPU cores, {m['platform']}, "
                  f"torch {m['torch']}, CUDA: {m['cuda']}.", ""]
    lines += ["| benchmark | what | baseline | medxfer | baseline value | ratio | target | met |",
              "|---|---|---|---|---|---|---|---|"]
    for path in files:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            lines.append(f"| {data['benchmark']} | {r['what']} | {r['baseline']} | {r['medxfer']} | "
                         f"{r['baseline_value']} | {r['ratio']} | {r['target']} | {r['met']} |")
    return "\n".join(lines) + "\n"


def write_summary() -> Path:
    path = RESULTS / "SUMMARY.md"
    atomic_write_text(path, summary_markdown())
    return path
