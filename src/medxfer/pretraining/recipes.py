"""Pretraining recipes: the schemes' settings, the run's identity, and what a task set-up hands the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from medxfer.config import PretrainConfig, config_to_dict
from medxfer.errors import ConfigError
from medxfer.io import stable_hash

SCHEMES: dict[str, dict[str, Any]] = {
    "simple": {
        "optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0, "scheduler": "cosine", "warmup_fraction": 0.0,
        "label_smoothing": 0.0, "augmentation": "simple", "crop_scale": (0.25, 1.0), "color_jitter": 0.0,
        "auto_augment": "none",
    },
    "advanced": {
        "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "scheduler": "cosine", "warmup_fraction": 0.05,
        "label_smoothing": 0.1, "augmentation": "advanced", "crop_scale": (0.25, 1.0), "color_jitter": 0.4,
        "auto_augment": "trivial",
    },
}
RECIPE_FIELDS = ("optimizer", "lr", "weight_decay", "scheduler", "warmup_fraction", "label_smoothing",
                  "crop_scale", "color_jitter", "auto_augment")
# Settings that do not change the result: a resumed run may differ in them.
RUNTIME_FIELDS = ("num_workers", "accelerator", "log_every_n_steps", "resume_every_n_steps")



def resolve_recipe(config: PretrainConfig) -> dict[str, Any]:
    """The scheme's settings with every non-``None`` ``train`` field applied over them."""
    recipe = dict(SCHEMES[config.scheme])
    for name in RECIPE_FIELDS:
        value = getattr(config.train, name)
        if value is not None:
            recipe[name] = tuple(value) if name == "crop_scale" else value
    low, high = recipe["crop_scale"]
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"train.crop_scale: need 0 < min <= max <= 1, got {recipe['crop_scale']}")
    recipe["momentum"] = config.train.momentum
    return recipe


def config_identity(config: PretrainConfig, *, with_lengths: bool = True) -> str:
    """Hash of everything that changes the checkpoints (not workers, accelerator or logging).
    ``with_lengths=False``: the run without its schedule's lengths (a ladder extended by later lengths is
    the same run)."""
    data = config_to_dict(config)
    if not with_lengths:
        data["schedule"].pop("lengths", None)
    for name in RUNTIME_FIELDS:
        data["train"].pop(name, None)
    data.pop("name", None)
    for key in ("pretrained", "data_seed"):
        if data.get(key) is None:
            data.pop(key, None)  # keys that came later: runs without them keep their identity
    return stable_hash(data)



@dataclass
class PretrainSetup:
    """What a run trains: the Lightning module, its loaders, the checkpoint scorer, and what to record."""
    module: Any
    train_loader: Any
    val_loader: Any
    score: Callable
    dataset: str
    n_train: int
    n_val: int
    save_full_model: bool
    record: dict[str, Any]
    optimizer_state: Optional[dict[str, Any]] = None  # loaded into the optimizer before the first step


def steps_per_epoch(loader) -> int:
    return max(1, len(loader))


def total_steps(config: PretrainConfig, steps_per_epoch: int) -> int:
    longest = max(config.schedule.lengths)
    return longest * steps_per_epoch if config.schedule.unit == "epoch" else longest

