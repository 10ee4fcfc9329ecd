"""3D training efficiency: ``unet3d`` at its default width on a 64^3 patch against the machine's matmul peak,
and against the 3D network nnU-Net users train (MONAI's ``DynUNet``) at similar FLOPs.

Every side is the same bare training step (zero_grad, forward, cross-entropy, backward, the optimizer medxfer
builds: fused Adam), on the same input, in turn (the order rotates each round so no side always runs
first), best step of the rounds. FLOPs of forward + backward come from ``FlopCounterMode``; the peak is the
best fp32 2048^2 matrix multiply, measured before and after. The loop overhead of Lightning is
bench_training's subject, not this one's.

Sides:
- ``unet3d``: the preset as ``medxfer finetune`` builds it (width 32, depth 5, BatchNorm, NCDHW);
- ``unet3d channels-last``: the same weights in ``torch.channels_last_3d`` (oneDNN's blocked layout for
  every convolution; NCDHW leaves small-channel layers to PyTorch's im2col ``slow_conv3d``);
- ``DynUNet``: MONAI's nnU-Net network, filters 32-512 like unet3d's, kernel 3, strides 1-2-2-2-2,
  instance norm + leaky ReLU as nnU-Net configures it.

The per-op profile of one unet3d step (self CPU time) goes into the notes: it says where 3D time goes.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from common import row, write_and_print

SHAPE = (64, 64, 64)
WIDTH = 32  # unet3d's default; DynUNet's filters follow it (width x 1, 2, 4, 8, 16)
ROUNDS = 2
MFU_TARGET = 0.5


def matmul_peak_gflops(size: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def build_models() -> dict[str, torch.nn.Module]:
    from monai.networks.nets import DynUNet

    from medxfer.models import build_segmenter

    torch.manual_seed(0)
    unet3d = build_segmenter(preset="unet3d", in_channels=1, n_classes=2, width=WIDTH)
    channels_last = build_segmenter(preset="unet3d", in_channels=1, n_classes=2, width=WIDTH)
    channels_last.load_state_dict(unet3d.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last_3d)
    dynunet = DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 5,
                      strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2, 2, 2, 2],
                      filters=[WIDTH * k for k in (1, 2, 4, 8, 16)], norm_name="instance", act_name="leakyrelu")
    return {"unet3d": unet3d, "unet3d channels-last": channels_last, "DynUNet (nnU-Net)": dynunet}


def training_step(model: torch.nn.Module, channels_last: bool) -> Callable[[], float]:
    from medxfer.training.strategies import make_optimizer

    model.train()
    image = torch.randn(1, 1, *SHAPE)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = torch.randint(0, 2, (1, *SHAPE))
    optimizer = make_optimizer("adam", [{"params": list(model.parameters())}], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(image), label).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def flops_per_step(model: torch.nn.Module) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(torch.randn(1, 1, *SHAPE)), torch.randint(0, 2, (1, *SHAPE))).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def op_profile(step: Callable[[], float], top: int = 8) -> list[tuple[str, float]]:
    """Share of one step's self CPU time per op (the ``top`` largest)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / total) for e in ranked]


def main() -> list[dict[str, Any]]:
    peak_before = matmul_peak_gflops()
    models = build_models()
    flops = {name: flops_per_step(model) for name, model in models.items()}
    steps = {name: training_step(model, "channels-last" in name) for name, model in models.items()}
    for step in steps.values():
        step()  # allocates the optimizer state and warms oneDNN's kernel cache
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(ROUNDS):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(steps[name]())
            times[name].append(steps[name]())
    profile = op_profile(steps["unet3d"])
    peak = max(peak_before, matmul_peak_gflops())

    best = {name: min(t) for name, t in times.items()}
    rows = []
    for name in names:
        achieved = flops[name] / best[name] / 1e9
        is_unet = name.startswith("unet3d")
        rows.append(row(f"{name} {'x'.join(map(str, SHAPE))} batch 1, width {WIDTH}: achieved GFLOP/s in training (ratio = model FLOPs "
                        f"utilisation; {flops[name] / 1e9:.0f} GFLOP per forward+backward)", "fp32 matmul peak",
                        achieved, peak, "GFLOP/s", achieved / peak,
                        f">= {MFU_TARGET}" if is_unet else None, bool(achieved / peak >= MFU_TARGET) if is_unet else None))
    for name in ("unet3d", "unet3d channels-last"):
        rows.append(row(f"{name} vs DynUNet (nnU-Net's network), {'x'.join(map(str, SHAPE))} training step (ratio = speed-up; FLOPs "
                        f"{flops[name] / flops['DynUNet (nnU-Net)']:.2f}x DynUNet's)", "MONAI DynUNet",
                        best[name], best["DynUNet (nnU-Net)"], "s/step", best["DynUNet (nnU-Net)"] / best[name]))
    notes = [
        f"Peak: best fp32 2048^2 matmul, {peak_before:.0f} GFLOP/s before and {peak:.0f} (max) after; "
        f"{torch.get_num_threads()} torch threads.",
        "Step times per side (s): " + "; ".join(f"{n} {[round(t, 2) for t in times[n]]}" for n in names) + ".",
        "unet3d (NCDHW) per-op share of one training step's self CPU time: "
        + ", ".join(f"{op} {share:.0%}" for op, share in profile) + ".",
    ]
    return write_and_print("3d", rows, notes, {"flops": flops, "times": times, "peak_gflops": peak,
                                               "profile": profile})


if __name__ == "__main__":
    main()
