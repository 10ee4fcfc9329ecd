"""The pretraining output folder: its layout, saving a checkpoint, reading the checkpoints back, and the
guard that keeps one config per folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from medxfer.config import PretrainConfig, config_to_dict
from medxfer.errors import CheckpointError, ConfigError
from medxfer.io import atomic_write_json
from medxfer.models.weights import checkpoint_filename, list_checkpoints, save_encoder, save_model_weights

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "models"
LIGHTNING_DIR = "lightning"
CONFIG_FILE = "pretrain_config.json"
RECORD_FILE = "pretrain.json"


@dataclass
class CheckpointInfo:
    """One saved checkpoint: its pretraining length, the encoder ``.pt`` file and its manifest."""
    length: int
    path: Path
    manifest: dict[str, Any]

    @property
    def val_accuracy(self) -> Optional[float]:
        return self.manifest.get("val_accuracy")



def checkpoint_path(out: Path, length: int) -> Path:
    return out / CHECKPOINT_DIR / checkpoint_filename(length)


def model_path(out: Path, length: int) -> Path:
    return out / MODEL_DIR / f"model_len{int(length):04d}.pt"


def make_saver(out: Path, config: PretrainConfig, save_full_model: bool) -> Callable:
    def save(length: int, pl_module, manifest: dict[str, Any]) -> Path:
        model = pl_module.model
        source = f"pretrain:{manifest['task']}:{manifest['dataset']}"
        if save_full_model:
            # The whole segmenter first: the encoder file is what marks the length as done.
            save_model_weights(model, model_path(out, length), manifest={
                **manifest, "length": length, "source": source,
                "model": config_to_dict(config.model.model_copy(update={
                    "in_channels": model.in_channels, "n_classes": model.n_classes})),
            })
        return save_encoder(model, checkpoint_path(out, length), length=length, source=source, **manifest)

    return save


def existing_checkpoint(out: Path) -> Callable[[int], Optional[Path]]:
    def exists(length: int) -> Optional[Path]:
        path = checkpoint_path(out, length)
        return path if path.is_file() and path.with_suffix(".json").is_file() else None

    return exists


def read_checkpoints(out_dir: str | Path) -> list[CheckpointInfo]:
    """The encoder checkpoints of a pretraining folder, by length."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return [CheckpointInfo(length, path, manifest) for length, path, manifest in list_checkpoints(folder)]


def resolve_model_checkpoint(path: str | Path, length: Optional[int]) -> Path:
    """The whole-segmenter checkpoint of ``length`` of a segmentation pretraining run, for a downstream
    ``pretrained.load`` of ``full`` or ``encoder_decoder``. ``path``: a model file (returned as is), the
    run folder, or its ``checkpoints/`` or ``models/`` folder."""
    path = Path(path)
    if path.is_file():
        return path
    run = path.parent if path.name in (CHECKPOINT_DIR, MODEL_DIR) else path
    folder = run / MODEL_DIR
    available = sorted(int(p.stem[len("model_len"):]) for p in folder.glob("model_len*.pt")
                       if p.stem[len("model_len"):].isdigit()) if folder.is_dir() else []
    if not available:
        raise CheckpointError(f"{path}: no whole-model checkpoints (segmentation pretraining saves them in "
                              f"{MODEL_DIR}/; classification pretraining saves encoders only)")
    if length is None or length not in available:
        raise CheckpointError(f"{folder}: no whole-model checkpoint of length {length} "
                              f"(available: {', '.join(map(str, available))})")
    return model_path(run, length)


def guard_folder(out: Path, config: PretrainConfig, identity: str) -> None:
    """One folder, one pretraining config: refuse to mix checkpoints of different runs."""
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable ({type(exc).__name__}); remove it or use another output folder") from None
        if saved.get("config_hash") != identity:
            raise ConfigError(f"{out}: holds a pretraining run with another config (see {path}); "
                              "use another output folder")
    elif (out / CHECKPOINT_DIR).is_dir() and any((out / CHECKPOINT_DIR).glob("*.pt")):
        raise ConfigError(f"{out / CHECKPOINT_DIR}: holds checkpoints of an unknown run; use another output folder")
    else:
        atomic_write_json(path, {"config_hash": identity, "config": config_to_dict(config)})

