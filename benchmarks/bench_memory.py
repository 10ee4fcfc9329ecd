"""Peak resident memory, each workload in its own fresh process so that every peak is separate.

- training: 5 steps of the unet preset (width 32) at 256x256, batch 2: medxfer's Lightning loop vs the bare loop
  (the same functions as bench_training);
- metrics: the metric suite on 3 volumes of 128^3: medxfer vs medpy + scikit-learn (as bench_metrics).

Per workload: the process's peak RSS (imports included), and the workload's own share = the peak during
the workload (VmHWM after resetting it through /proc/self/clear_refs) minus the RSS just before it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import NOTES_KEY, current_rss_mb, peak_rss_mb, peak_rss_since_reset_mb, reset_peak_rss, row, write_result

PAIRS = [("training 256x256 unet, batch 2", "train_medxfer", "train_bare", "bare PyTorch loop"),
         ("metric suite, 3 volumes 128^3", "metrics_medxfer", "metrics_medpy", "medpy + sklearn")]


def _workload(kind: str, size: str) -> Any:
    """Set up (outside the measured part) and return a function that runs the workload."""
    if kind.startswith("train"):
        import copy

        import torch

        import bench_training as bt
        from medxfer.models import build_segmenter
        from medxfer.training.losses import build_loss

        if kind == "train_medxfer":
            import medxfer.training.tasks  # noqa: F401  (imports are set-up, not workload)

            bt._quiet_lightning()
        shape, width, steps = ((32, 32), 4, 3) if size == "tiny" else ((256, 256), 32, 5)
        settings = bt.device_settings()
        torch.manual_seed(0)
        model = build_segmenter(preset="unet", in_channels=1, n_classes=2, width=width)
        loader = bt.make_loader(bt.synthetic_cases(2 * steps, shape), 1, 2)
        run = bt.run_medxfer if kind == "train_medxfer" else bt.run_bare
        return lambda: run(copy.deepcopy(model), loader, build_loss("dice_ce"), 1e-3, steps, settings).losses
    import bench_metrics as bm

    shape, n = ((32, 32, 32), 2) if size == "tiny" else ((128, 128, 128), 3)
    inputs = bm.make_inputs(shape, n)
    if kind == "metrics_medxfer":
        from medxfer.evaluation.metrics import MetricAccumulator  # imports are set-up, not workload

        def run():
            accumulator = MetricAccumulator()
            return [bm.medxfer_suite(prob, gt, accumulator)["hd95"] for prob, gt in inputs]
        return run
    import medpy.metric.binary  # noqa: F401
    import sklearn.metrics  # noqa: F401

    return lambda: [bm.reference_suite(prob, gt)["hd95"] for prob, gt in inputs]


def child(kind: str, size: str) -> dict[str, Any]:
    work = _workload(kind, size)
    before = current_rss_mb()
    setup_peak = peak_rss_since_reset_mb()  # VmHWM of this process (ru_maxrss would include the parent's
    reset = reset_peak_rss()                # RSS from before exec on Linux)
    result = work()
    during = peak_rss_since_reset_mb() if reset else float("nan")
    return {"kind": kind, "peak_mb": max(setup_peak, during) if reset else peak_rss_mb(), "before_mb": before,
            "workload_mb": during - before,
            "result": [float(v) for v in result]}


def measure(kind: str, size: str = "full") -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), kind, size], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {kind} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(size: str = "full") -> list[dict[str, Any]]:
    rows, results, notes = [], {}, []
    for label, ours, theirs, baseline in PAIRS:
        a, b = measure(ours, size), measure(theirs, size)
        results[ours], results[theirs] = a, b
        same = bool(all(abs(x - y) <= 1e-4 * max(1.0, abs(y)) for x, y in zip(a["result"], b["result"])))
        print(f"   {label}: medxfer peak {a['peak_mb']:.0f} MB (workload {a['workload_mb']:.0f} MB), {baseline} "
              f"{b['peak_mb']:.0f} MB (workload {b['workload_mb']:.0f} MB), same result: {same}", flush=True)
        rows.append(row(f"{label}: process peak RSS (same result: {same})", baseline, a["peak_mb"], b["peak_mb"],
                        "MB", a["peak_mb"] / b["peak_mb"]))
        rows.append(row(f"{label}: workload's own peak above its start", baseline, a["workload_mb"],
                        b["workload_mb"], "MB", a["workload_mb"] / b["workload_mb"] if b["workload_mb"] > 0 else None))
        notes.append(f"{label}: RSS before the workload (imports + inputs): medxfer {a['before_mb']:.0f} MB, "
                     f"{baseline} {b['before_mb']:.0f} MB.")
    notes.append("Each figure is a fresh process (python benchmarks/bench_memory.py KIND); the medxfer training "
                 "process imports Lightning, the bare loop does not. Same result = same training losses / HD95s.")
    write_result("memory", rows, {"results": results, NOTES_KEY: notes})
    return rows


if __name__ == "__main__":
    if len(sys.argv) >= 2:
        print(json.dumps(child(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "full")))
    else:
        main()
