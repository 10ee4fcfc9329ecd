"""Pydantic models for every config section, and YAML loading with one-line errors.

Every model forbids unknown keys, so a typo is an error that names the file and the key path
(``train.lerning_rate``), never a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medxfer.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


DatasetName = Literal["demo", "acdc", "covidqu", "idrid", "folders", "msd"]
Normalization = Literal["zscore", "minmax", "percentile", "none"]


class DataConfig(StrictModel):
    """Which dataset, which part of it, and how images are prepared."""

    name: DatasetName = "demo"
    root: Optional[Path] = None  # dataset folder as distributed; not used by "demo"
    # Dataset-specific choices: demo {"domain": "A"|"B"}; covidqu {"masks": "infection"|"lung"};
    # idrid {"lesions": [...]}; acdc {"frames": ["ED", "ES"]}; msd {"task": ...}. Each loader checks its own.
    options: dict[str, Any] = Field(default_factory=dict)
    spatial_dims: Literal[2, 3] = 2
    train_images: Optional[Union[int, float]] = None  # n images (int) or a fraction (float); None = all
    subset: Literal["random", "first"] = "random"
    # share of the labelled training pool held out for validation; None = the dataset's own split
    # (its official validation set where it has one, else 0.2)
    val_fraction: Optional[float] = Field(None, ge=0.0, lt=1.0)
    resize: Optional[list[int]] = None  # resize whole images to this size (e.g. IDRiD); None = keep
    normalization: Normalization = "zscore"
    percentile_clip: tuple[float, float] = (0.5, 99.5)
    patch_size: Optional[list[int]] = None  # train on random patches of this size; None = whole images
    foreground_ratio: float = Field(0.5, ge=0.0, le=1.0)  # share of patches centred on foreground
    augment: bool = True


class ModelConfig(StrictModel):
    """A segmentation model preset (see ``medxfer models``) and its size."""

    preset: str = "unet"
    in_channels: Optional[int] = None  # None = from the data
    n_classes: Optional[int] = None  # including background; None = from the data
    width: int = Field(32, ge=1)  # channels of the first level (classic U-Net encoders)
    depth: int = Field(5, ge=2, le=6)  # number of encoder levels
    options: dict[str, Any] = Field(default_factory=dict)


class PretrainedConfig(StrictModel):
    """Where the starting weights come from (None of these = random init)."""

    checkpoint: Optional[Path] = None  # an encoder checkpoint file, or a checkpoint folder with `length`
    length: Optional[int] = None  # pretraining length to pick from a checkpoint folder
    load: Literal["encoder", "full", "encoder_decoder"] = "encoder"
    scheme: Optional[str] = None  # recorded only: "simple" | "advanced" | ...


Strategy = Literal["scratch", "full", "frozen_encoder", "partial", "discriminative"]


class TrainConfig(StrictModel):
    strategy: Strategy = "full"
    frozen_levels: int = Field(0, ge=0)  # for "partial": first k encoder levels frozen
    encoder_lr_factor: float = Field(0.1, gt=0.0)  # for "discriminative": encoder lr = lr * factor
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = 0.9
    scheduler: Literal["none", "cosine", "step"] = "cosine"
    max_epochs: int = Field(10, ge=1)
    max_steps: int = -1  # > 0 overrides max_epochs
    batch_size: int = Field(8, ge=1)
    early_stopping_patience: Optional[int] = None  # epochs without validation Dice improvement
    loss: str = "auto"  # "auto" | "dice" | "ce" | "dice_ce" | "focal" | "tversky" | "dice_focal"
    precision: str = "32-true"
    num_workers: int = 0
    accelerator: str = "auto"
    log_every_n_steps: int = 10


class EvalConfig(StrictModel):
    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # binary tasks: probability threshold
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0)  # sliding-window overlap (patch-trained models)
    sw_batch_size: int = 4
    max_overlays: int = 4
    source_test: Optional[DataConfig] = None  # also evaluate here (forgetting of the source task)


class RunConfig(StrictModel):
    """One downstream run: data + model + starting weights + training + evaluation."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrained: PretrainedConfig = Field(default_factory=PretrainedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _strategy_needs_weights(self) -> "RunConfig":
        if self.train.strategy != "scratch" and self.pretrained.checkpoint is None:
            # "full" without a checkpoint is a scratch run; say so instead of pretending.
            if self.train.strategy in ("frozen_encoder", "partial", "discriminative"):
                raise ValueError(
                    f"train.strategy={self.train.strategy!r} needs pretrained.checkpoint"
                )
        return self


M = TypeVar("M", bound=BaseModel)


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def validation_error_message(source: str, error: ValidationError) -> str:
    """One line: ``FILE: key.path: problem`` for the first error (and how many more there are)."""
    errors = error.errors()
    first = errors[0]
    loc = _format_loc(tuple(x for x in first["loc"] if not str(x).startswith("function-after")))
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    else:
        problem = first["msg"]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{source}: {loc}: {problem}{more}"


def parse_config(data: Any, model: type[M], source: str = "<config>") -> M:
    """Validate a mapping against ``model``; errors become one-line ``ConfigError``s."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_error_message(source, exc)) from None


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None


def resolve_paths(data: Any, base: Path, keys: tuple[str, ...] = ("root", "checkpoint")) -> Any:
    """Make relative paths in ``keys`` relative to the config file's folder, as a user expects."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if k in keys and isinstance(v, str) and v and not os.path.isabs(v):
                out[k] = str((base / v).resolve())
            else:
                out[k] = resolve_paths(v, base, keys)
        return out
    if isinstance(data, list):
        return [resolve_paths(v, base, keys) for v in data]
    return data


def load_config(path: str | os.PathLike, model: type[M] = RunConfig) -> M:  # type: ignore[assignment]
    """Read a YAML file and validate it against ``model`` (default: a downstream ``RunConfig``)."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict):
        data = resolve_paths(data, path.parent.resolve())
    return parse_config(data, model, source=str(path))


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (paths as strings); the input of run ids."""
    return config.model_dump(mode="json")
