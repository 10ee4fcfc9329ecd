"""The 3D study's time budget: ``medxfer demo --study 3d`` (full) within 15 minutes on a 2-core machine, and
the study's answers as that run printed them.

Run as a user runs it (the CLI in a fresh process, into an empty folder), timed by the wall clock; the CPU
time of the process tree and the load averages before and after are recorded too, because on a shared machine
the wall time also measures the other users. The answer table and the findings go into the results file, so
the docs quote them from there (``docs/study3d.md``).

``python benchmarks/bench_study3d.py [--quick] [--out DIR]`` (DIR keeps the outputs; default: a temporary
folder, removed afterwards). One full run takes about as long as its budget: run it once, on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_average, row, write_and_exit

BUDGET_S = {"quick": 300.0, "full": 900.0}


def run_study(out: Path, quick: bool) -> dict:
    """Wall and CPU seconds of one ``medxfer demo --study 3d`` (CPU: this child and everything it spawned)."""
    command = [sys.executable, "-m", "medxfer.cli", "demo", "--study", "3d", "--out", str(out)]
    command += ["--quick"] if quick else []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = load_average()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"study failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": load_average(),
            "output": done.stdout}


def markdown(frame) -> str:
    """A pipe table of the frame (floats with 3 decimals), as the docs show it."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def answers(out: Path) -> dict:
    """The study's answer table (markdown), its findings and its forgetting figures, from the records."""
    from medxfer.study3d import study_answer

    answer = study_answer(out)
    forgetting = answer["forgetting"]
    result = {"answer_table": markdown(answer["answer_table"]), "findings": answer["headline"]}
    if not forgetting.empty:
        first = forgetting.iloc[0]
        result["forgetting"] = {"source_dice_before": float(first["source Dice before fine-tuning"]),
                                "change": float(first["change"]), "n_seeds": int(first["n seeds"])}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the --quick study (a smoke test of this script)")
    parser.add_argument("--out", type=Path, default=None, help="keep the study folder here")
    args = parser.parse_args(argv)
    kind = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory(prefix="medxfer-bench-study3d-") as tmp:
        out = args.out or Path(tmp) / kind
        measured = run_study(out, quick=args.quick)
        found = answers(out)
    from medxfer.study3d import GPU_SETTINGS, settings

    budget = BUDGET_S[kind]
    name = "demo --study 3d" + (" --quick" if args.quick else " (full)")
    rows = [row(f"{name}: wall time, fresh folder", "budget", measured["wall_s"], budget, "s",
                measured["wall_s"] / budget, "<= 1", measured["wall_s"] <= budget)]
    notes = [f"{name}: wall {measured['wall_s']:.0f} s, CPU {measured['cpu_s']:.0f} s (process tree), load average "
             f"(1/5/15 min) {measured['load_before']} before, {measured['load_after']} after, on {os.cpu_count()} "
             "cores. Wall time on a shared machine also measures its other users; the CPU time does not."]
    return write_and_exit("study3d" if kind == "full" else "study3d_quick", rows, notes, {
        "wall_s": round(measured["wall_s"], 1), "cpu_s": round(measured["cpu_s"], 1),
        "load_before": measured["load_before"], "load_after": measured["load_after"],
        "settings": settings(args.quick), "gpu_settings": GPU_SETTINGS, **found, "printed": measured["output"]})


if __name__ == "__main__":
    sys.exit(main())
