"""Learning curves of a run, whether it converged, and stopping on a validation plateau.

``TrainingCurves`` (a Lightning callback) keeps the mean training loss of every ``log_every_n_steps``
window (one point per logged step) and the validation headline after every validation, as ``[step, value]``
pairs, and stops training once the validation headline has not improved by more than ``min_delta`` for
``plateau_steps`` optimizer steps (``max_steps`` / ``max_epochs`` stay the cap). Its state travels in
Lightning's resume checkpoint, so a resumed run keeps its whole curve.

The convergence rule is in :mod:`medxfer.training.convergence`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch

from medxfer.training.convergence import CONVERGENCE_TOLERANCE, convergence


class TrainingCurves(L.Callback):
    """Records the training-loss and validation curves; stops on a validation plateau (see the module
    docstring). ``monitor``: the logged validation value; ``plateau_steps`` None = never stop early."""

    def __init__(self, monitor: str = "val_dice", plateau_steps: Optional[int] = None, min_delta: float = 0.0):
        self.monitor = monitor
        self.plateau_steps = plateau_steps
        self.min_delta = min_delta
        self.train_loss: list[list[float]] = []  # [step, mean training loss over the window ending there]
        self.val: list[list[float]] = []  # [step, validation value]
        self.best: Optional[float] = None
        self.best_step = 0
        self.stopped_on_plateau: Optional[int] = None  # the step at which the plateau stopped training
        self._window_sum: Optional[torch.Tensor] = None  # on the device: read only at logged steps
        self._window_n = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach().float()
        self._window_sum = loss if self._window_sum is None else self._window_sum + loss
        self._window_n += 1
        step = trainer.global_step
        if step % max(1, trainer.log_every_n_steps) == 0 or step == 1:
            self.train_loss.append([step, float(self._window_sum) / self._window_n])
            self._window_sum, self._window_n = None, 0

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        step, value = trainer.global_step, float(value)
        self.val.append([step, value])
        if math.isnan(value):
            return
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_step = value, step
        elif self.plateau_steps is not None and step - self.best_step >= self.plateau_steps:
            self.stopped_on_plateau = step
            trainer.should_stop = True

    def record(self, val_metric: str, tolerance: float = CONVERGENCE_TOLERANCE) -> dict[str, Any]:
        """``{"curves": {"train_loss", "val", "val_metric"}, "convergence": {...}}`` for the run record;
        ``val_metric`` names the validation value (the headline metric)."""
        return {"curves": {"train_loss": self.train_loss, "val": self.val, "val_metric": val_metric},
                "convergence": {**convergence(self.val, tolerance), "stopped_on_plateau_at": self.stopped_on_plateau}}

    def state_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val": self.val, "best": self.best, "best_step": self.best_step,
                "stopped_on_plateau": self.stopped_on_plateau}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_loss = list(state_dict.get("train_loss", []))
        self.val = list(state_dict.get("val", []))
        self.best = state_dict.get("best")
        self.best_step = int(state_dict.get("best_step", 0))
        self.stopped_on_plateau = state_dict.get("stopped_on_plateau")
