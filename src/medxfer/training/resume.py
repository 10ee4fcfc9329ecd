"""Lightning's resume checkpoints, made safe: written atomically, checked before a resume, and a Ctrl-C
inside ``trainer.fit`` surfaced as ``KeyboardInterrupt``.

Lightning writes a checkpoint through fsspec, which stages it in ``$TMPDIR`` and moves it into place; when
the output folder is on another filesystem that move is a copy, so a kill during it leaves a truncated
``last.ckpt`` that every later resume fails on. :class:`AtomicCheckpointIO` writes the temporary file in
the checkpoint's own folder, fsyncs it and renames it (``medxfer.io.atomic_path``): a reader sees the old
file or the new one, on any filesystem. A resume file that still cannot be read (written by an older
version, a full disk, a bad disk) is set aside by :func:`usable_resume_checkpoint` and the run restarts.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medxfer.io import atomic_path, set_aside

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: temp file in the target folder, fsync, ``os.replace``; loads weights-only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location, weights_only=True)


def usable_resume_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """``path`` if it is a readable checkpoint; None if there is none. An unreadable one (truncated, empty,
    not a checkpoint) is renamed ``<name>.corrupt-<UTC time>`` with a warning, so the run restarts from the
    beginning instead of failing on it for ever."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        # mmap: the archive's index and the pickled structure are read and checked, the tensors are not
        # copied; a truncated file fails here (its zip index is at the end).
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError("not a Lightning checkpoint (no state_dict)")
    except Exception as exc:  # any reason a resume would fail on it
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        moved = set_aside(path)
        log.warning("resume checkpoint %s is unreadable (%s); set aside as %s, the run restarts", path, reason,
                    moved.name)
        return None
    del checkpoint
    return path


def fit(trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit``, but a Ctrl-C raises ``KeyboardInterrupt`` as anywhere else in Python.

    Lightning catches the KeyboardInterrupt itself, ignores SIGINT from then on and calls ``sys.exit(1)``:
    the caller could neither tell an interrupt from a failure nor be interrupted again. Here the SIGINT
    handler is restored and an interrupted fit raises KeyboardInterrupt (the CLI: "interrupted", exit 130).
    """
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if main_thread and handler is not None:
            signal.signal(signal.SIGINT, handler)
