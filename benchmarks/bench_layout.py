"""Memory layout of 2D training on the CPU: channels-last (NHWC) against PyTorch's default (NCHW).

Why it matters: with NCHW weights and one thread, PyTorch sends the 1x1 convolutions of a small batch to its
im2col path (``_slow_conv2d``), which is slower than oneDNN's kernels; with channels-last weights every
convolution goes to oneDNN. ``medxfer.training.strategies.prefers_channels_last`` reads this benchmark's result.

For each 2D preset (``--presets``), both layouts train a copy of the same initial weights on the same batch
(``--batch`` images of ``--size`` pixels, 4 classes) with medxfer's optimizer (fused Adam), for ``--steps``
steps per round, in turn (A B, then B A) over ``--rounds`` rounds. The time is the CPU seconds of this
process per step (``time.process_time``), so the machine's other load does not enter; the median over rounds
is reported. Both sides must reach the same loss within ``LOSS_TOLERANCE`` (float sums in another order).

``python benchmarks/bench_layout.py [--threads 1 2] [--presets ...]`` -> ``results/layout.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from common import load_average, load_note, row, write_and_print

# the convolutional 2D presets (Swin's encoder is attention, built for 224^2: its layout is not a convolution's)
DEFAULT_PRESETS = ["efficientnet_lite0_unet", "unet", "attention_unet", "resnet18_unet", "resnet34_attention_unet"]
LOSS_TOLERANCE = 1e-3  # relative: the two layouts sum in another order, nothing else differs
TARGET = 1.0  # channels-last is adopted where it is not slower (ratio NHWC / NCHW time <= 1)


def _model(preset: str, width: int):
    from medxfer.models import build_segmenter

    return build_segmenter({"preset": preset, "width": width, "in_channels": 1, "n_classes": 4})


def _train(model, x, y, steps: int) -> tuple[float, float]:
    """``(CPU seconds per step, last loss)`` of ``steps`` Adam steps (one untimed step first: optimizer state)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out if torch.is_tensor(out) else out[0], y)
        loss.backward()
        optimizer.step()
        return loss.item()

    step()
    start = time.process_time()
    for _ in range(steps):
        loss = step()
    return (time.process_time() - start) / steps, loss


def measure(preset: str, threads: int, width: int, batch: int, size: int, steps: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    initial = _model(preset, width)
    multiple = int(getattr(initial, "required_multiple", 1))
    size = max(multiple, size // multiple * multiple)
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 4, (batch, size, size))
    times: dict[str, list[float]] = {"NCHW": [], "NHWC": []}
    losses: dict[str, float] = {}
    for index in range(rounds):
        for layout in (("NCHW", "NHWC") if index % 2 == 0 else ("NHWC", "NCHW")):
            model = copy.deepcopy(initial).train()
            inputs = x
            if layout == "NHWC":
                model = model.to(memory_format=torch.channels_last)
                inputs = x.contiguous(memory_format=torch.channels_last)
            seconds, loss = _train(model, inputs, y, steps)
            times[layout].append(seconds)
            losses[layout] = loss
    nchw, nhwc = statistics.median(times["NCHW"]), statistics.median(times["NHWC"])
    same = abs(losses["NHWC"] - losses["NCHW"]) <= LOSS_TOLERANCE * max(1.0, abs(losses["NCHW"]))
    return {"preset": preset, "threads": threads, "size": size, "nchw_ms": nchw * 1e3, "nhwc_ms": nhwc * 1e3,
            "ratio": nhwc / nchw, "same_loss": same, "losses": losses}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--width", type=int, default=8, help="decoder width (the demo's: 8)")
    parser.add_argument("--batch", type=int, default=4, help="images per step (medxfer's default: 4)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the demo's: 64)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    load_before = load_average()
    results, rows = [], []
    for threads in args.threads:
        for preset in args.presets:
            result = measure(preset, threads, args.width, args.batch, args.size, args.steps, args.rounds)
            results.append(result)
            rows.append(row(f"{preset}, {threads} thread(s), batch {args.batch} of {result['size']}^2: "
                            "channels-last step time", "NCHW step time", result["nhwc_ms"], result["nchw_ms"],
                            "ms CPU", result["ratio"], f"<= {TARGET:g}", result["ratio"] <= TARGET and result["same_loss"]))
            print(f"{preset:28s} threads {threads}: NCHW {result['nchw_ms']:7.1f} ms, NHWC {result['nhwc_ms']:7.1f} ms, "
                  f"ratio {result['ratio']:.2f}, same loss {result['same_loss']}", flush=True)
    notes = [f"CPU ms per training step (process time, median of {args.rounds} rounds of {args.steps} steps, A B / B A), "
             f"width {args.width}, fused Adam; ratio = channels-last / NCHW (< 1: channels-last is faster).",
             load_note(load_before)]
    return write_and_print("layout", rows, notes, {"results": results}, load_before)


if __name__ == "__main__":
    main()
