"""The pretraining output folder: its layout, saving a checkpoint, reading the checkpoints back, and the
guard that keeps one config per folder."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from medxfer.config import PretrainConfig, config_to_dict, parse_config
from medxfer.errors import CheckpointError, ConfigError
from medxfer.io import atomic_write_json
from medxfer.models.weights import checkpoint_filename, list_checkpoints, save_encoder, save_model_weights
from medxfer.pretraining.recipes import config_identity

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "models"
LIGHTNING_DIR = "lightning"
CONFIG_FILE = "pretrain_config.json"
RECORD_FILE = "pretrain.json"
# The trained state at the end of a run (weights, optimizer, LR schedule, loop counters, callback state): what
# extending the ladder resumes from, and what `pretrained: {load: full}` takes the optimizer state from.
FINAL_STATE_FILE = "final_state.ckpt"

log = logging.getLogger(__name__)


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


def _saved_base_identity(saved: dict[str, Any]) -> Optional[str]:
    """The identity without lengths of a saved config record (computed for folders written before it was kept)."""
    if saved.get("base_hash"):
        return saved["base_hash"]
    try:
        return config_identity(parse_config(saved.get("config"), PretrainConfig), with_lengths=False)
    except ConfigError:  # a config of an older medxfer that no longer validates: not the same run
        return None


def final_state_path(out: Path) -> Path:
    return Path(out) / FINAL_STATE_FILE


def read_folder_config(out: Path) -> Optional[dict[str, Any]]:
    """The saved ``pretrain_config.json`` of a pretraining folder (None if there is none)."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({type(exc).__name__}); remove it or use another output folder") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a pretraining config record; remove it or use another output folder")
    return saved


def write_folder_config(out: Path, config: PretrainConfig, identity: str, **extra: Any) -> None:
    atomic_write_json(Path(out) / CONFIG_FILE, {"config_hash": identity, "config": config_to_dict(config), **extra})


def guard_folder(out: Path, config: PretrainConfig, identity: str,
                 base_identity: Optional[str] = None) -> Optional[dict[str, Any]]:
    """One folder, one pretraining run: refuse to mix checkpoints of different runs.

    Returns None when the folder is new or holds this very config; returns the saved config record when
    the folder holds the same run with other schedule lengths (``base_identity`` = the identity without
    lengths; the caller decides whether that is an extension it accepts)."""
    path = out / CONFIG_FILE
    saved = read_folder_config(out)
    if saved is not None:
        if saved.get("config_hash") == identity:
            return None
        if base_identity is not None and _saved_base_identity(saved) == base_identity:
            return saved
        lengths = [c.length for c in read_checkpoints(out)]
        if max(lengths, default=0) > 0 or (out / RECORD_FILE).exists():
            raise ConfigError(f"{out}: holds a pretraining run with another config (see {path}) that saved "
                              f"checkpoints up to length {max(lengths, default=0)}; use another output folder, "
                              "or delete this one to start over")
        # That run failed before its first trained checkpoint (diverged at once, bad data): nothing of it is
        # worth keeping, and the user following its advice (a lower lr, a fixed root) reruns here.
        log.warning("%s: replacing a pretraining run with another config that failed before its first "
                    "trained checkpoint", out)
        for name in (CHECKPOINT_DIR, MODEL_DIR, LIGHTNING_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        final_state_path(out).unlink(missing_ok=True)
    elif (out / CHECKPOINT_DIR).is_dir() and any((out / CHECKPOINT_DIR).glob("*.pt")):
        raise ConfigError(f"{out / CHECKPOINT_DIR}: holds checkpoints of an unknown run; use another output folder")
    write_folder_config(out, config, identity, **({"base_hash": base_identity} if base_identity else {}))
    return None


def length_unit(checkpoint: str | Path) -> Optional[dict[str, str]]:
    """What a pretraining length of ``checkpoint`` counts: ``{"unit": "step" | "epoch", "data": the pretraining
    data}`` from the config of the pretraining folder holding it (``CHECKPOINT_DIR``/``MODEL_DIR``); None for
    a checkpoint outside such a folder (imported weights, a fine-tuned model)."""
    path = Path(checkpoint)
    folder = path.parent.parent if path.is_file() or path.suffix else path
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config = saved["config"]
        data = (config.get("data") or {}).get("name") if config.get("task") == "segmentation" \
            else (config.get("classification") or {}).get("source")
        return {"unit": str(config["schedule"]["unit"]), "data": str(data or "")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
