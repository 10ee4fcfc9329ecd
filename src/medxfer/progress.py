"""Progress that a log file can show: plain lines when stdout is not a terminal.

Interactive bars (rich, Lightning's tqdm) draw nothing useful into a file or a pipe: ``medxfer demo > log``
used to stay silent for minutes. As pip and Lightning do, medxfer then prints plain, timestamped lines
instead. One mechanism serves every stage (demo, sweep, report, fine-tuning, pretraining):

- library code reports progress through :class:`ProgressLog` (or the Lightning callback from
  :func:`training_progress_callback`), which logs at INFO on the ``medxfer.progress`` logger, throttled to one
  line every ``every_s`` seconds (the first and the last step always print);
- the CLI calls :func:`plain_progress_to` once: when stdout is not a terminal it attaches one handler that
  writes those lines to stdout; on a terminal it attaches none, and the interactive bars show instead.

A leaf module: it imports nothing from medxfer.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any, Optional

LOGGER_NAME = "medxfer.progress"
progress_log = logging.getLogger(LOGGER_NAME)
DEFAULT_EVERY_S = 10.0


def interactive() -> bool:
    """Whether interactive progress bars can show (stdout is a terminal: rich and the CLI write there)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


class _PlainHandler(logging.StreamHandler):
    """The CLI's handler for progress lines (a class of its own, so attaching it twice replaces it)."""


def plain_progress_off() -> None:
    """Remove the handler :func:`plain_progress_to` attached (the CLI does, when a command ends)."""
    for handler in list(progress_log.handlers):
        if isinstance(handler, _PlainHandler):
            progress_log.removeHandler(handler)
    progress_log.propagate = True
    progress_log.setLevel(logging.NOTSET)


def plain_progress_to(stream: Optional[IO[str]] = None, *, force: bool = False) -> bool:
    """Print progress lines to ``stream`` (default stdout) when it is not a terminal (or ``force``).
    Returns whether lines will print. Calling it again replaces the earlier handler."""
    plain_progress_off()
    stream = stream if stream is not None else sys.stdout
    is_terminal = getattr(stream, "isatty", lambda: False)()
    if is_terminal and not force:
        return False
    handler = _PlainHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False  # one copy, even with --verbose
    return True


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


class ProgressLog:
    """``label: i/total [detail] (elapsed, about N left)``, at most one line every ``every_s`` seconds.

    ``step(detail)`` counts one unit done; ``note(text)`` prints a line at once (a stage starts or ends)."""

    def __init__(self, label: str, total: Optional[int] = None, every_s: float = DEFAULT_EVERY_S,
                 clock: Any = time.monotonic):
        self.label, self.total, self.every_s, self.clock = label, total, every_s, clock
        self.done = 0
        self.started = clock()
        self._last: Optional[float] = None

    def step(self, detail: str = "", n: int = 1) -> None:
        self.done += n
        now = self.clock()
        last = self.total is not None and self.done >= self.total
        if self._last is not None and not last and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.started
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        timing = _duration(elapsed)
        if self.total and 0 < self.done < self.total:
            timing += f", about {_duration(elapsed / self.done * (self.total - self.done))} left"
        progress_log.info("%s: %s%s (%s)", self.label, count, f" {detail}" if detail else "", timing)

    def note(self, text: str) -> None:
        progress_log.info("%s: %s", self.label, text)


def training_progress_callback(label: str, total_steps: Optional[int], every_s: float = DEFAULT_EVERY_S):
    """A Lightning callback printing ``label: step i/N loss x`` lines (for runs without a progress bar)."""
    from lightning.pytorch.callbacks import Callback

    class PlainTrainingProgress(Callback):
        def __init__(self) -> None:
            self.lines = ProgressLog(label, total_steps if total_steps and total_steps > 0 else None, every_s)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            detail = "steps"
            try:
                detail = f"steps, loss {float(loss):.4f}"
            except (TypeError, ValueError):
                pass
            self.lines.done = int(trainer.global_step) - 1  # step() adds the one just taken
            self.lines.step(detail)

    return PlainTrainingProgress()
