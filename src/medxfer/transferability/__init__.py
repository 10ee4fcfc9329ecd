"""Transferability of pretrained encoders to a target dataset, scored before fine-tuning.

- :mod:`.robustness`: the contrastive robustness score, every variant from one feature pass (torch), under
  medxfer's protocol or the reference code's (``reference_pair_distances``);
- :mod:`.baselines`: LogME, H-score, a linear-probe Dice, a kNN probe, GBC and CC-FV, adapted to segmentation;
- :mod:`.stopping`: the stop rules (pure numpy/pandas: checkpoint recommendation from score tables);
- :mod:`.scoring`: ``run_score`` (``medxfer score``) and the online score/stop callback of pretraining.

Imports run one way (stopping <- robustness <- scoring). Names are loaded on first use, so importing
``medxfer.transferability.stopping`` (e.g. by ``medxfer analyze``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "baselines": ("baseline_scores", "cc_fv", "cc_fv_ratio", "gbc", "h_score", "knn_accuracy", "linear_probe_dice",
                  "logme"),
    "robustness": ("METRICS", "PairDistances", "pair_distances", "reference_pair_distances", "robustness_naive",
                   "score_checkpoint", "variant_table"),
    "scoring": ("RobustnessEarlyStopping", "ScoreResult", "load_score_config", "recommend_for_folder", "run_score",
                "target_images"),
    "stopping": ("Recommendation", "recommend_checkpoint", "recommend_from_table"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
