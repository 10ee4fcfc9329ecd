"""The first sliding-window call in a fresh process, against the second: where the difference goes, and
what ``medxfer.data.patches.warm_up`` (run by ``medxfer predict`` while the first input is read) leaves of it.

Each side runs in its own fresh Python process (``python bench_warmup.py --child SIDE DEVICE``), on the same
model (``unet3d``, width 16, seeded) and volume, through ``predict_logits`` as evaluation and prediction call it:

- **as before**: call 1, call 2 (call 1 imports MONAI lazily and meets the window's kernels first);
- **import first**: ``import monai.inferers`` timed on its own, then call 1, call 2 (call 1 - call 2 = the
  kernel set-up alone: oneDNN primitives on the CPU, cuDNN / cuBLAS on a GPU);
- **warmed up**: ``warm_up(...)`` timed, then call 1, call 2.

Ratios: first / second call per side; the target is the warmed-up first call within 1.5x of the second.
Runs on the GPU when one is present (the device is in the results), else on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import load_average, load_note, row, write_and_print

SIDES = ("as before", "import first", "warmed up")
VOLUME = (64, 112, 112)
PATCH = (48, 48, 48)
WIDTH = 16
TARGET = 1.5


def child(side: str, device: str) -> dict[str, float]:
    started = time.perf_counter()
    import torch

    from medxfer.data.patches import predict_logits, warm_up
    from medxfer.models import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter(preset="unet3d", in_channels=1, n_classes=3, width=WIDTH).eval().to(device)
    volume = torch.randn(1, 1, *VOLUME, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out: dict[str, float] = {"setup_s": time.perf_counter() - started}
    if side == "import first":
        t = time.perf_counter()
        import monai.inferers  # noqa: F401

        out["import_s"] = time.perf_counter() - t
    elif side == "warmed up":
        t = time.perf_counter()
        warm_up(model, PATCH, size_multiple=16, sw_batch_size=4, in_channels=1)
        sync()
        out["warm_up_s"] = time.perf_counter() - t
    for call in ("first_s", "second_s"):
        t = time.perf_counter()
        predict_logits(model, volume, patch_size=PATCH, size_multiple=16, overlap=0.25, sw_batch_size=4)
        sync()
        out[call] = time.perf_counter() - t
    return out


def run_side(side: str, device: str) -> dict[str, float]:
    here = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, str(here / "bench_warmup.py"), "--child", side, device], cwd=here,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> list[dict[str, Any]]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_before = load_average()
    sides = {side: run_side(side, device) for side in SIDES}
    rows = []
    for side in SIDES:
        s = sides[side]
        is_fix = side == "warmed up"
        ratio = s["first_s"] / s["second_s"]
        rows.append(row(f"first sliding-window call in a fresh process, {side} ({device}; unet3d width {WIDTH}, "
                        f"{'x'.join(map(str, VOLUME))} volume, {'x'.join(map(str, PATCH))} windows; ratio = first / "
                        "second call)", "second call", s["first_s"], s["second_s"], "s", ratio,
                        f"<= {TARGET}" if is_fix else None, bool(ratio <= TARGET) if is_fix else None))
    before, first = sides["as before"], sides["import first"]
    notes = [
        f"{device}: as before, call 1 {before['first_s']:.2f} s vs call 2 {before['second_s']:.2f} s. Of the "
        f"difference, importing MONAI takes {first['import_s']:.2f} s (its __init__ imports every submodule, "
        f"torchvision and torch._dynamo among them); the rest, {first['first_s'] - first['second_s']:.2f} s, is the "
        "first use of the window's kernels. warm_up() pays both in "
        f"{sides['warmed up']['warm_up_s']:.2f} s; medxfer predict runs it while the first input is read.",
        load_note(load_before),
    ]
    return write_and_print(f"warmup_{device}", rows, notes, {"sides": sides, "device": device}, load_before)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
