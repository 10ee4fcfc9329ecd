"""Online scoring: the checkpoint hook that scores each checkpoint on the target data as it is saved
(``PretrainConfig.online_score``) and may stop pretraining."""

from __future__ import annotations

from pathlib import Path

from medxfer.config import PretrainConfig, ScoreConfig, config_to_dict, parse_config
from medxfer.pretraining.checkpoints import CHECKPOINT_DIR
from medxfer.pretraining.schedule import CheckpointHook
from medxfer.transferability.scoring import RobustnessEarlyStopping

ONLINE_SCORE_FILE = "robustness_online.csv"


def online_score_hook(config: PretrainConfig, out: Path) -> CheckpointHook:
    """The checkpoint hook that ``config.online_score`` asks for: the robustness score of each checkpoint
    goes into its manifest and ``robustness_online.csv``; pretraining stops when the patience rule fires,
    unless ``stop_early`` is off (then the score is only recorded)."""
    online = config.online_score
    settings = {"bootstrap": 0, "seed": config.seed, **online.settings,
                "data": config_to_dict(online.data), "checkpoints": str(out / CHECKPOINT_DIR), "out": str(out)}
    score_config = parse_config(settings, ScoreConfig, source=f"{config.name}: online_score")
    scorer = RobustnessEarlyStopping.from_config(score_config, pretraining_scheme=config.scheme,
                                                 csv_path=out / ONLINE_SCORE_FILE)

    def hook(length: int, encoder, manifest: dict) -> dict:
        returned = dict(scorer.on_checkpoint(length, encoder, manifest) or {})
        if not online.stop_early:
            returned.pop("stop", None)
        return returned

    return hook
