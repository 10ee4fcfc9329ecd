"""Small I/O helpers shared by every stage: atomic writes, stable hashes, seeding, environment."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it, hence the lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; ``os.replace`` it onto ``path`` on success.

    A killed process leaves at most a ``.tmp`` file that no reader looks at, never a half-written target.
    The result gets the permissions a plain ``open`` would give (``0666 & ~umask``): ``mkstemp`` creates
    0600, which would hide results from colleagues on a shared filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail early, with one line, when ``path`` cannot become an output folder: it (or a folder above it)
    is an existing file, or the nearest existing folder is not writable. Creates nothing, so a command
    that then fails on its input leaves no empty folder behind."""
    from medxfer.errors import OutputError

    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is an existing file" if existing == path else f"lies under {existing}, an existing file"
        raise OutputError(f"{path}: output folder {where}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write there ({existing} is not writable)")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    # NaN is kept (json writes NaN), since undefined metrics must stay visible, never 0.
    return json.dumps(obj, indent=indent, sort_keys=True, default=_json_default)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def stable_hash(obj: Any, length: int = 12) -> str:
    """First ``length`` hex digits of sha1 over the canonical JSON of ``obj`` (key order irrelevant)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:length]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA). Loader workers are seeded by Lightning."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def environment_info() -> dict[str, Any]:
    """What a result record needs to say about where it was computed."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from importlib.metadata import version

        info["medxfer"] = version("medxfer")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        info["medxfer"] = "unknown"
    return info
