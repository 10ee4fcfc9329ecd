"""What a pretraining run did over time: its training-loss curve and its training time, summed over every
invocation (an interrupted run resumes; a finished ladder may be extended).

Both live in a Lightning callback whose state travels inside the resume checkpoint (``state_dict`` /
``load_state_dict``), so a resumed run's record covers the whole run, not only its last invocation. The
time of an invocation that was killed counts up to its last resume checkpoint (what came after it is
trained again).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


def _loss_value(outputs: Any) -> float:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    try:
        return float(loss)
    except (TypeError, ValueError):
        return math.nan


class TrainingHistory(L.Callback):
    """Mean training loss over every ``every_n_steps`` optimizer steps (``curve``: ``[{"step", "loss"}]``,
    also logged at INFO on this module's logger), and the training time of all invocations (``train_s``)."""

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self.curve: list[dict[str, float]] = []
        self.invocations = 0
        self._train_s_before = 0.0  # training time of earlier invocations (from the resume checkpoint)
        self._started: float | None = None
        self._window: list[float] = []

    @property
    def train_s(self) -> float:
        """Seconds of training so far, earlier invocations included."""
        now = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._train_s_before + now

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        self.invocations += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self._train_s_before, self._started = self.train_s, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._window.append(_loss_value(outputs))
        step = int(trainer.global_step)
        if step % self.every_n_steps == 0:
            loss = float(sum(self._window) / len(self._window))
            self.curve.append({"step": step, "loss": loss})
            self._window = []
            log.info("pretraining step %d: loss %.4f (mean of the last %d step(s))", step, loss, self.every_n_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"curve": list(self.curve), "train_s": self.train_s, "invocations": self.invocations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict.get("curve", []))
        self._train_s_before = float(state_dict.get("train_s", 0.0))
        self.invocations = int(state_dict.get("invocations", 0))
