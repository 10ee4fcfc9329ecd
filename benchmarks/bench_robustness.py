"""Transferability score: every variant for one checkpoint, against recomputing features per variant.

medxfer: ``score_checkpoint`` with the default ScoreConfig (3 distances x 5 margins x every level x
pooled/flattened, two encoder passes in all, plus 1000-resample bootstrap intervals for every variant).
Baseline: ``robustness_naive`` once per variant (three encoder passes each, no intervals), the
straightforward implementation. Images: the 64 demo nuclei tiles (64x64 grayscale, both domains) in
their four 90-degree rotations = 256 images; encoder: a classic U-Net encoder. Scores must agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common import NOTES_KEY, row, timed, write_result

TARGET = 20.0
N_IMAGES = 256
ENCODER = {"width": 8, "depth": 4}


def demo_images(n: int = N_IMAGES) -> np.ndarray:
    """``(n, 1, 64, 64)`` z-scored demo tiles (train, val and test of both domains, rotated as needed)."""
    from medxfer.config import DataConfig
    from medxfer.data import load_data
    from medxfer.data.transforms import normalize_image

    tiles = []
    for domain in ("A", "B"):
        data = load_data(DataConfig(name="demo", options={"domain": domain}))
        tiles += [normalize_image(c.image) for c in data.train + data.val + data.test]
    images = [np.rot90(t, k, axes=(1, 2)) for k in range(4) for t in tiles]
    return np.ascontiguousarray(np.stack(images[:n]), dtype=np.float32)


def make_encoder(width: int = ENCODER["width"], depth: int = ENCODER["depth"]) -> torch.nn.Module:
    from medxfer.models import UNetEncoder

    torch.manual_seed(0)
    return UNetEncoder(1, width=width, depth=depth).eval()


def score_all(encoder, images: np.ndarray):
    from medxfer.config import ScoreConfig
    from medxfer.transferability.robustness import score_checkpoint

    config = ScoreConfig(checkpoints="unused", device="cpu" if not torch.cuda.is_available() else "auto")
    return score_checkpoint(encoder, images, config)


def score_naive(encoder, images: np.ndarray, variants) -> tuple[list[float], list[float]]:
    """Each variant on its own; returns the scores and the time of each."""
    from medxfer.transferability.robustness import robustness_naive

    scores, times = [], []
    for v in variants:
        t, losses = timed(lambda: robustness_naive(encoder, images, metric=v.metric, margin=v.margin,
                                                   level=int(v.level), pooled=bool(v.pooled), device=score_device()))
        scores.append(float(losses.mean()))
        times.append(t)
    return scores, times


def score_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compare(images: np.ndarray, encoder, repeat: int = 3) -> dict[str, Any]:
    score_all(encoder, images[:32])  # warm-up (first convolutions of a process are slow)
    fast_times = []
    t, table = timed(lambda: score_all(encoder, images))
    fast_times.append(t)
    scores, naive_times = score_naive(encoder, images, list(table.itertuples()))
    for _ in range(repeat - 1):  # the fast side again after the slow one: A B A
        fast_times.append(timed(lambda: score_all(encoder, images))[0])
    diff = np.abs(table["robustness"].to_numpy() - np.asarray(scores))
    return {"medxfer_s": min(fast_times), "medxfer_all_s": fast_times, "naive_s": float(sum(naive_times)),
            "naive_per_variant_s": float(np.median(naive_times)), "n_variants": len(table),
            "max_abs_diff": float(diff.max()), "agree": bool(np.allclose(table["robustness"], scores, atol=1e-6, rtol=1e-6)),
            "levels": sorted(int(level) for level in table["level"].unique())}


def main(n_images: int = N_IMAGES, encoder_options=None) -> list[dict[str, Any]]:
    options = {**ENCODER, **(encoder_options or {})}
    images = demo_images(n_images)
    result = compare(images, make_encoder(**options))
    speedup = result["naive_s"] / result["medxfer_s"]
    met = bool(speedup >= TARGET and result["agree"])
    print(f"   {result['n_variants']} variants: medxfer {result['medxfer_s']:.2f} s, naive {result['naive_s']:.1f} s, "
          f"x{speedup:.0f}, max |diff| {result['max_abs_diff']:.1e}", flush=True)
    rows = [row(f"robustness score, all {result['n_variants']} variants, one checkpoint, {len(images)} images "
                f"64x64 (ratio = speed-up; same scores: {result['agree']})", "robustness_naive per variant",
                result["medxfer_s"], result["naive_s"], "s", speedup, f">= {TARGET:g}", met)]
    notes = [f"Encoder: UNetEncoder(1, width={options['width']}, depth={options['depth']}) (the demo uses width 16); "
             f"levels {result['levels']}; 3 distances x 5 margins x pooled/flattened. medxfer side includes the "
             f"1000-resample bootstrap intervals of every variant; its times over repeats (s): "
             f"{[round(t, 2) for t in result['medxfer_all_s']]} (best taken); the naive side ran once "
             f"({result['naive_per_variant_s']:.2f} s per variant, median). Largest |score difference|: "
             f"{result['max_abs_diff']:.1e}."]
    write_result("robustness", rows, {"result": result, NOTES_KEY: notes})
    return rows


if __name__ == "__main__":
    main()
