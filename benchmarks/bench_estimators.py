"""What each transferability estimator costs per checkpoint, as a ratio to the robustness score.

Per checkpoint, on the same images and encoder as bench_robustness (the demo nuclei tiles, 64x64
grayscale, in their four rotations; a classic U-Net encoder): the robustness score (``score_checkpoint``
with the default ScoreConfig: every variant, bootstrap intervals) against each estimator of
``baseline_scores`` at every encoder level (the linear probe at its one level), with its defaults
(20,000 sampled pixels, 300 probe steps, k = 20). Each estimator's time includes its share of the
encoder pass that samples its pixels. Rounds alternate which side runs first; the best round counts.
Reported only (no target): the ratio says how many robustness scores one estimator costs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench_robustness import ENCODER, N_IMAGES, demo_images, make_encoder, score_all
from common import NOTES_KEY, in_turn, row, timed, write_result

ESTIMATORS = ("logme", "hscore", "linear_probe", "knn", "gbc", "ccfv")


def labels_for(n: int) -> np.ndarray:
    """The demo masks matching ``demo_images`` (same tiles, same rotations)."""
    from medxfer.config import DataConfig
    from medxfer.data import load_data

    masks = []
    for domain in ("A", "B"):
        data = load_data(DataConfig(name="demo", options={"domain": domain}))
        masks += [c.label for c in data.train + data.val + data.test]
    rotated = [np.rot90(m, k) for k in range(4) for m in masks]
    return np.ascontiguousarray(np.stack(rotated[:n]), dtype=np.int64)


def estimator_times(encoder, images: np.ndarray, labels: np.ndarray, estimators=ESTIMATORS,
                    max_pixels: int = 20000, probe_steps: int = 300) -> tuple[dict[str, float], dict[str, list]]:
    """Seconds per estimator (all its levels together) and its scores per level, for one checkpoint."""
    from medxfer.transferability.baselines import baseline_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    times: dict[str, float] = {}
    scores: dict[str, list] = {}
    for method in estimators:  # one at a time, so that each pays for its own encoder pass
        rows = baseline_scores(encoder, images, labels, 2, methods=(method,), max_pixels=max_pixels,
                               probe_steps=probe_steps, device=device)
        times[rows[0]["metric"]] = float(sum(r["time_s"] for r in rows))
        scores[rows[0]["metric"]] = [round(float(r["score"]), 4) for r in rows]
    return times, scores


def compare(images: np.ndarray, labels: np.ndarray, encoder, rounds: int = 2, **kwargs) -> dict[str, Any]:
    score_all(encoder, images[:32])  # warm-up (first convolutions of a process are slow)
    best_score, best = np.inf, {}
    scores: dict[str, list] = {}
    for r in range(rounds):
        for side in in_turn("score", "estimators", r):
            if side == "score":
                best_score = min(best_score, timed(lambda: score_all(encoder, images))[0])
            else:
                times, scores = estimator_times(encoder, images, labels, **kwargs)
                best = {k: min(v, best.get(k, np.inf)) for k, v in times.items()}
    return {"score_s": float(best_score), "estimator_s": best, "scores": scores}


def main(n_images: int = N_IMAGES, rounds: int = 2) -> list[dict[str, Any]]:
    images = demo_images(n_images)
    labels = labels_for(n_images)
    encoder = make_encoder()
    result = compare(images, labels, encoder, rounds=rounds)
    rows = []
    for metric, seconds in result["estimator_s"].items():
        ratio = seconds / result["score_s"]
        print(f"   {metric}: {seconds:.2f} s = {ratio:.2f} x the robustness score ({result['score_s']:.2f} s)",
              flush=True)
        rows.append(row(f"{metric}, every level, one checkpoint, {len(images)} images 64x64 "
                        f"(ratio = estimator / robustness score)", "robustness score, all variants",
                        seconds, result["score_s"], "s", ratio))
    notes = [f"Encoder: UNetEncoder(1, width={ENCODER['width']}, depth={ENCODER['depth']}), {len(encoder.channels)} "
             f"levels; device {'cuda' if torch.cuda.is_available() else 'cpu'}; best of {rounds} rounds (A B, B A). "
             "Estimator times include their own encoder pass (kNN, GBC and CC-FV sample class-balanced pixels, "
             "LogME and H-score uniform ones); the linear probe trains 300 full-batch steps at one level. "
             f"Scores per level: {result['scores']}."]
    write_result("estimators", rows, {"result": result, NOTES_KEY: notes})
    return rows


if __name__ == "__main__":
    main()
