"""Shared helpers of the benchmarks: timing, peak memory, result rows and files, the summary table.

Every benchmark compares two sides measured in the same run on the same machine (interleaved A B A B,
best of a few repeats, so that load from other processes hits both sides alike), checks that both
computed the same result, and reports the ratio against the named baseline.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medxfer.io import atomic_write_json, atomic_write_text  # noqa: E402

# Per-benchmark notes that go under the summary table (what was measured and how).
NOTES_KEY = "notes"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def in_turn(first: str, second: str, round_index: int) -> tuple[str, str]:
    """The order of the two sides in round ``round_index``: A B, then B A, and so on, so that neither side
    always runs second (after the other has warmed or evicted caches and the allocator)."""
    return (first, second) if round_index % 2 == 0 else (second, first)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_kib(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024.0 if kib is not None else float("nan")


def peak_rss_since_reset_mb() -> float:
    """VmHWM (peak RSS since the last :func:`reset_peak_rss`, or since start), else ru_maxrss."""
    kib = _status_kib("VmHWM")
    return kib / 1024.0 if kib is not None else peak_rss_mb()


def machine() -> dict[str, Any]:
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def row(what: str, baseline: str, medxfer: float, baseline_value: Optional[float], unit: str,
        ratio: Optional[float], target: Optional[str] = None, met: Optional[bool] = None) -> dict[str, Any]:
    """One comparison. ``medxfer`` / ``baseline_value`` are in ``unit``; ``ratio`` is what ``target``
    constrains (e.g. "speed-up >= 10" or "medxfer / bare >= 0.95"); no target = reported only."""
    return {"what": what, "baseline": baseline, "medxfer": _clean(medxfer), "baseline_value": _clean(baseline_value),
            "unit": unit, "ratio": _clean(ratio), "target": target or "-", "met": met}


def _clean(value: Optional[float]) -> Optional[float]:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return float(value)


def write_result(name: str, rows: list[dict[str, Any]], extra: Optional[dict[str, Any]] = None) -> Path:
    """``RESULTS/<name>.json``: the rows (see :func:`row`), the machine, the date and ``extra``
    (``extra["notes"]``: lines printed under the summary table). Every result records the load average (what
    else ran on the shared machine): ``extra["load_average"]`` where the benchmark took it before its run,
    else the 1, 5 and 15 minute averages as the result is written."""
    extra = dict(extra or {})
    extra.setdefault("load_average", load_average())
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(),
                             "machine": machine(), "rows": rows, **extra})
    return path


def load_note(before: list[float]) -> str:
    """The notes' line on the machine's load: the averages ``before`` the run and now."""
    return f"Load average {before} before, {load_average()} after."


def write_and_print(name: str, rows: list[dict[str, Any]], notes: list[str], extra: dict[str, Any],
                    load_before: Optional[list[float]] = None) -> list[dict[str, Any]]:
    """The tail of a benchmark that run_all calls: :func:`write_result` with ``extra``, the notes and the load
    average before the run (None: as the result is written), then the notes printed indented under run_all's
    heading; returns ``rows`` (what ``main()`` returns to run_all)."""
    extra = {**extra, NOTES_KEY: notes}
    if load_before is not None:
        extra["load_average"] = load_before
    write_result(name, rows, extra)
    for line in notes:
        print("  ", line)
    return rows


def write_and_exit(name: str, rows: list[dict[str, Any]], notes: list[str], extra: dict[str, Any]) -> int:
    """The tail of a benchmark run as its own command: :func:`write_result` with ``extra`` and the notes, the
    notes and the file written printed; returns the exit status 0."""
    path = write_result(name, rows, {**extra, NOTES_KEY: notes})
    for line in notes:
        print(line)
    print(f"wrote {path}")
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def summary_markdown() -> str:
    lines = ["# medxfer benchmarks", ""]
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        return "\n".join(lines + ["No results yet: run `make bench`.", ""])
    first = json.loads(files[0].read_text())
    m = first["machine"]
    lines += [f"Measured {first['date'][:10]} on {m['cpu_count']} CPU cores ({m.get('cpu', 'unknown CPU')}), "
              f"{m['platform']}, torch {m['torch']} ({m['torch_threads']} threads), "
              f"GPU: {m.get('gpu', 'none')}. Figures are ratios of two sides measured in the same run "
              "(interleaved, best of repeats); absolute times depend on the machine and its load.", "",
              "| benchmark | what | baseline | medxfer | baseline value | unit | ratio | target | met |",
              "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for path in files:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            lines.append(f"| {data['benchmark']} | {r['what']} | {r['baseline']} | {_fmt(r['medxfer'])} | "
                         f"{_fmt(r['baseline_value'])} | {r.get('unit', '')} | {_fmt(r['ratio'])} | "
                         f"{r['target']} | {_fmt(r['met'])} |")
        if data.get(NOTES_KEY):
            notes.append(f"**{data['benchmark']}** ({data['date'][:16].replace('T', ' ')} UTC)")
            notes += [f"- {note}" for note in data[NOTES_KEY]]
            notes.append("")
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def write_summary() -> Path:
    path = RESULTS / "SUMMARY.md"
    atomic_write_text(path, summary_markdown())
    return path


# --------------------------------------------------------------------------------------- test data
def blob_pair(shape: tuple[int, ...], seed: int, n_blobs: int = 4):
    """A ground-truth mask of a few ellipsoids and an imperfect "prediction" for it, seeded.

    Returns ``(prob float32 in [0, 1], gt bool)``: the prediction is the same blobs moved and resized a
    little, blurred, with noise, so Dice is ~0.8 and the surfaces differ by a few pixels, as a trained
    model's output does. Both masks are non-empty.
    """
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    size = np.asarray(shape, dtype=np.float64)

    def blobs(centres, radii):
        mask = np.zeros(shape, dtype=bool)
        for centre, radius in zip(centres, radii):
            inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius))
            mask |= inside <= 1.0
        return mask

    centres = rng.uniform(0.25, 0.75, size=(n_blobs, len(shape))) * size
    radii = rng.uniform(0.06, 0.16, size=(n_blobs, len(shape))) * size
    gt = blobs(centres, radii)
    moved = blobs(centres + rng.normal(0, 0.02, centres.shape) * size, radii * rng.uniform(0.85, 1.15, radii.shape))
    prob = gaussian_filter(moved.astype(np.float32), sigma=1.5)
    prob += rng.normal(0, 0.08, shape).astype(np.float32)
    return np.clip(prob, 0.0, 1.0).astype(np.float32), gt


def synthetic_cache(folder: Path, n_cases: int, shape: tuple[int, ...], dtype: str = "float32", seed: int = 0,
                    n_classes: int = 3):
    """``n_cases`` preprocessed cases written as ``medxfer.data.preprocess`` caches them (image ``(1, *shape)``
    npy in ``dtype``, uint8 label with a few ellipsoids of classes 1..n_classes-1, sampled foreground voxels),
    returned as ``Case`` objects whose ``meta["cache"]`` names the files (the images are memory-mapped)."""
    import numpy as np

    from medxfer.data.base import Case
    from medxfer.data.preprocess import FOREGROUND_SAMPLES, foreground_coordinates

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    cases = []
    for i in range(n_cases):
        label = np.zeros(shape, dtype=np.uint8)
        for k in range(1, n_classes):
            centre = rng.uniform(0.3, 0.7, len(shape)) * np.asarray(shape)
            radius = rng.uniform(0.08, 0.2, len(shape)) * np.asarray(shape)
            label[sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius)) <= 1.0] = k
        image = rng.standard_normal(shape, dtype=np.float32)
        image += label.astype(np.float32)
        paths = {"image": folder / f"case{i:04d}_image.npy", "label": folder / f"case{i:04d}_label.npy",
                 "foreground": folder / f"case{i:04d}_fg.npy"}
        np.save(paths["image"], image[None].astype(dtype))
        np.save(paths["label"], label)
        np.save(paths["foreground"], foreground_coordinates(label, FOREGROUND_SAMPLES, rng))
        cases.append(Case(image=np.load(paths["image"], mmap_mode="r"), label=None, case_id=f"case{i:04d}",
                          spacing=(1.0,) * len(shape), meta={"cache": {k: str(v) for k, v in paths.items()}}))
    return cases


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what else ran on the machine while a benchmark did)."""
    return [round(x, 2) for x in os.getloadavg()]
