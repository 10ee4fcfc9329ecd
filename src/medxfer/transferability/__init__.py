"""Transferability of pretrained encoders to a target dataset, scored before fine-tuning.

- :mod:`.robustness`: the contrastive robustness score, every variant from one feature pass
  (``run_score`` is ``medxfer score``);
- :mod:`.baselines`: LogME, H-score and a linear-probe Dice, adapted to segmentation;
- :mod:`.stopping`: checkpoint recommendation (offline) and early stopping of pretraining (online).
"""

from medxfer.transferability.baselines import baseline_scores, h_score, linear_probe_dice, logme
from medxfer.transferability.robustness import (
    METRICS,
    PairDistances,
    ScoreResult,
    load_score_config,
    pair_distances,
    robustness_naive,
    run_score,
    score_checkpoint,
    target_images,
    variant_table,
)
from medxfer.transferability.stopping import (
    Recommendation,
    RobustnessEarlyStopping,
    recommend_checkpoint,
    recommend_for_folder,
    recommend_from_table,
)

__all__ = [
    "METRICS", "PairDistances", "Recommendation", "RobustnessEarlyStopping", "ScoreResult", "baseline_scores",
    "h_score", "linear_probe_dice", "load_score_config", "logme", "pair_distances", "recommend_checkpoint",
    "recommend_for_folder", "recommend_from_table", "robustness_naive", "run_score", "score_checkpoint",
    "target_images", "variant_table",
]
