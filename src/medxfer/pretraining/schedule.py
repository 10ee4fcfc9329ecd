"""The checkpoint schedule: a Lightning callback that saves the encoder at each scheduled pretraining
length and runs the checkpoint hooks (protocol in :mod:`medxfer.pretraining`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L

from medxfer.errors import ConfigError
from medxfer.models.weights import get_encoder

log = logging.getLogger(__name__)

CheckpointHook = Callable[[int, Any, dict], Optional[dict]]


class ScheduledCheckpoints(L.Callback):
    """Saves a checkpoint at each scheduled pretraining length (epochs or optimizer steps).

    ``score(module) -> dict`` gives the validation values recorded in the manifest; ``save(length,
    module, manifest) -> Path`` writes the files; ``exists(length) -> Path | None`` finds an existing
    checkpoint (never rewritten). ``hooks`` follow the protocol in the module docstring.
    """
    def __init__(self, unit: str, lengths: Sequence[int], *, save: Callable, score: Callable, exists: Callable,
                 base_manifest: dict[str, Any], hooks: Sequence[CheckpointHook] = ()):
        super().__init__()
        if unit not in ("epoch", "step"):
            raise ConfigError(f"schedule.unit must be 'epoch' or 'step', got {unit!r}")
        self.unit = unit
        self.lengths = sorted(set(int(n) for n in lengths))
        self.save_fn, self.score_fn, self.exists_fn = save, score, exists
        self.base_manifest = dict(base_manifest)
        self.hooks = list(hooks)
        self.saved: list[int] = []  # written by this process
        self.skipped: list[int] = []  # already on disk
        self.hook_values: dict[int, dict[str, Any]] = {}
        self.stop_requested_at: Optional[int] = None

    # Lightning hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0 and trainer.current_epoch == 0 and 0 in self.lengths:
            self.checkpoint(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps and is already incremented here.
        if self.unit == "step" and trainer.global_step in self.lengths:
            self.checkpoint(trainer, pl_module, int(trainer.global_step))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # current_epoch is still the 0-based index of the epoch that just ended.
        if self.unit == "epoch" and trainer.current_epoch + 1 in self.lengths:
            self.checkpoint(trainer, pl_module, int(trainer.current_epoch + 1))

    # The work ----------------------------------------------------------------------------------------
    def checkpoint(self, trainer, pl_module, length: int) -> Optional[Path]:
        """Score, run the hooks and save the checkpoint of ``length`` unless it already exists."""

        if self.exists_fn(length) is not None:
            log.info("checkpoint of length %d %s exists; kept as is", length, self.unit)
            if length not in self.skipped:
                self.skipped.append(length)
            return None
        manifest = {
            **self.base_manifest,
            "pretraining_length": length,
            "length_unit": self.unit,
            "epoch": int(trainer.current_epoch + (1 if self.unit == "epoch" and length > 0 else 0)) if trainer else 0,
            "step": int(trainer.global_step) if trainer else 0,
            # epoch unit: mean training loss of the epoch; step unit: loss of the last batch
            "train_loss": (_metric(trainer, "train_loss_epoch" if self.unit == "epoch" else "train_loss_step")
                           if trainer and length > 0 else None),
        }
        manifest.update(self.score_fn(pl_module))
        encoder = get_encoder(pl_module)
        was_training = encoder.training
        encoder.eval()
        stop = False
        try:
            for hook in self.hooks:
                returned = hook(length, encoder, dict(manifest))
                if not returned:
                    continue
                if not isinstance(returned, dict):
                    raise ConfigError(f"checkpoint hook {_hook_name(hook)} returned a {type(returned).__name__}, "
                                      "expected a dict or None")
                returned = dict(returned)
                stop = bool(returned.pop("stop", False)) or stop
                clashing = sorted(set(returned) & (set(manifest) | _SAVE_ENCODER_FIELDS))
                if clashing:
                    raise ConfigError(f"checkpoint hook {_hook_name(hook)} returned field(s) {', '.join(clashing)} "
                                      "that the manifest already has; use other names")
                try:
                    json.dumps(returned)
                except (TypeError, ValueError):
                    raise ConfigError(f"checkpoint hook {_hook_name(hook)} returned values that are not "
                                      "JSON-able") from None
                manifest.update(returned)
                self.hook_values.setdefault(length, {}).update(returned)
        finally:
            encoder.train(was_training)
        if stop:
            manifest["stop_requested"] = True
        check_divergence = getattr(pl_module, "check_divergence", None)
        if check_divergence is not None and trainer is not None:
            check_divergence()  # a diverged encoder is never saved as a checkpoint
        path = self.save_fn(length, pl_module, manifest)
        self.saved.append(length)
        log.info("saved checkpoint of length %d %s: %s", length, self.unit,
                 {k: manifest.get(k) for k in ("val_accuracy", "val_dice") if manifest.get(k) is not None})
        if stop:
            self.stop_requested_at = length
            if trainer is not None:
                trainer.should_stop = True
        return path


# Fields save_encoder writes itself (its ``extra`` must not reuse them).
_SAVE_ENCODER_FIELDS = frozenset({"format", "format_version", "state_dict", "arch", "channels", "strides",
                                  "spatial_dims", "in_channels", "length", "source", "n_parameters", "created"})


def _hook_name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(getattr(hook, "__self__", hook)).__name__


def _metric(trainer, name: str) -> Optional[float]:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def collect_hooks(callbacks: Sequence[Any], hooks: Sequence[CheckpointHook]) -> list[CheckpointHook]:
    """The hooks of a run: ``hooks`` plus the ``on_checkpoint`` method of every callback that has one."""
    found = list(hooks)
    for callback in callbacks:
        method = getattr(callback, "on_checkpoint", None)
        if callable(method):
            found.append(method)
    for hook in found:
        if not callable(hook):
            raise ConfigError(f"checkpoint hook {hook!r} is not callable")
    return found

