"""``medxfer analyze`` on large score tables (issue #31 item 10): wall time and peak memory of one analysis
of synthetic tables, 2 datasets x 20 pretraining lengths x 3 seeds, one score row per (variant, dataset,
length): 2,500 variants = 10^5 score rows, 25,000 variants = 10^6.

Each size runs in a fresh process (``python bench_analyze.py --child SRC VARIANTS``, SRC the ``src`` folder
of the medxfer to measure, its variant limit lifted). ``--before SRC`` also measures another checkout (e.g.
``git archive b2b4c43 src | tar -x -C /tmp/before``: analyze before the per-variant work was vectorised) at
the smaller size, as the baseline of the same run; without it the sizes are reported only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

SRC = Path(__file__).resolve().parents[1] / "src"
SIZES = (2500, 25000)  # score variants
LENGTHS = tuple(range(0, 200, 10))
DATASETS = ("ACDC", "COVIDQUDataset")
SEEDS = (0, 1, 2)


def tables(n_variants: int):
    """A downstream table and a robustness table with ``n_variants`` variants (cosine, margin 0.5, levels
    1..n/2, pooled and flat), seeded."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    down = pd.DataFrame([{"model": "basic U-Net", "dataset": d, "pretraining length": n, "seed": s,
                          "freeze encoder": False, "pretraining scheme": "advanced",
                          "dice index": 0.7 + 0.001 * n + 0.01 * rng.random()}
                         for d in DATASETS for n in LENGTHS for s in SEEDS])
    levels = np.arange(1, n_variants // 2 + 1)
    grid = pd.MultiIndex.from_product([DATASETS, LENGTHS, levels, (True, False)],
                                      names=["dataset", "pretraining_length", "level", "pooled"]).to_frame(index=False)
    rob = grid.assign(metric="cosine", margin=0.5, encoder="u-net_encoder", pretraining_scheme="advanced_training",
                      robustness=rng.random(len(grid)))
    return down, rob


def child(src: str, n_variants: int) -> dict[str, Any]:
    import resource

    sys.path.insert(0, src)
    import medxfer.report.analyze.inputs as inputs
    from medxfer.report.analyze import analyze

    inputs.MAX_VARIANTS = 10**9  # the checkout before refused more than 1,000
    down, rob = tables(n_variants)
    started = time.perf_counter()
    result = analyze(down, rob, figures=False, n_resamples=2000)
    return {"seconds": time.perf_counter() - started, "rows": len(rob), "variants": n_variants,
            "rules": int(result.summary["rule"].nunique()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def measure(src: Path, n_variants: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", str(src), str(n_variants)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(before: Optional[Path] = None) -> list[dict[str, Any]]:
    from common import load_average, load_note, row, write_and_print  # not in a child: it imports medxfer

    load_before = load_average()
    results = {n: measure(SRC, n) for n in SIZES}
    baseline = measure(before, SIZES[0]) if before is not None else None
    rows = []
    for n, r in results.items():
        old = baseline if baseline is not None and n == SIZES[0] else None
        rows.append(row(f"medxfer analyze, {n} score variants, {r['rows']} score rows ({r['rules']} rules x "
                        f"{len(DATASETS)} groups; 2000 bootstrap resamples)",
                        "before vectorising (b2b4c43)" if old else "-", r["seconds"],
                        old["seconds"] if old else None, "s", old["seconds"] / r["seconds"] if old else None))
    notes = ["Peak memory: " + "; ".join(f"{n} variants {r['peak_rss_mb']:.0f} MB" for n, r in results.items())
             + (f"; before, {SIZES[0]} variants {baseline['peak_rss_mb']:.0f} MB" if baseline else "") + ".",
             "Each size in a fresh process; times include no imports. " + load_note(load_before)]
    return write_and_print("analyze", rows, notes, {"results": {str(n): r for n, r in results.items()},
                                                    "before": baseline}, load_before)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    else:
        main(Path(sys.argv[sys.argv.index("--before") + 1]) if "--before" in sys.argv else None)
