"""Small I/O helpers shared by every stage: atomic writes, stable hashes, seeding, environment."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from medxfer.errors import DiskFull, FolderInUse


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
    0600, which would hide results from colleagues on a shared filesystem. A full disk (ENOSPC/EDQUOT,
    also when ``torch.save`` wraps it in a RuntimeError) becomes :class:`DiskFull` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _disk_full(exc, path) or exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except Exception as exc:
        full = _disk_full(exc, path)
        if full is None:
            raise
        raise full from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_disk_full(exc: Optional[BaseException]) -> bool:
    """Whether ``exc`` or an exception it was raised from is ENOSPC / EDQUOT (``torch.save`` raises a
    RuntimeError "unexpected pos" while the OSError it hit is only its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full(exc: BaseException, path: Path) -> Optional[DiskFull]:
    if isinstance(exc, DiskFull) or not is_disk_full(exc):
        return None
    return DiskFull(f"{path}: no space left on the device while writing it (nothing half-written kept); "
                    "free space and run the command again")


def check_output_dir(path: str | os.PathLike, *, allow_top_level: bool = False) -> Path:
    """Fail early, with one line, when ``path`` cannot become an output folder: it (or a folder above it)
    is an existing file, or the nearest existing folder is not writable, or (unless ``allow_top_level``)
    it is ``/`` or the home folder, which a run would fill with its files. Creates nothing, so a command
    that then fails on its input leaves no empty folder behind."""
    from medxfer.errors import OutputError

    path = Path(path)
    if not allow_top_level:
        resolved = path.expanduser().resolve()
        if resolved in {Path("/").resolve(), Path.home().resolve()}:
            raise OutputError(f"{path}: refusing the {'root' if resolved == Path('/').resolve() else 'home'} "
                              "folder as an output folder (it would be filled with run files); give a "
                              "subfolder, or pass --allow-any-out")
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
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def set_aside(path: str | os.PathLike) -> Path:
    """Rename an unreadable file to ``<name>.corrupt-<UTC time>`` beside it (kept for inspection, never read
    again by medxfer); return the new path."""
    from datetime import datetime, timezone

    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, target)
    return target


LOCK_FILE = ".medxfer.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[None]:
    """Hold the lock of ``folder`` (``fcntl.flock`` on ``folder/.medxfer.lock``) for the ``with`` block, or
    raise :class:`FolderInUse` at once, naming the process that holds it.

    The lock is released when the process ends, however it ends (kill -9 included); the lock file is
    removed on release (and the folder, if this call created it and it is still empty). flock works on
    local filesystems; on NFS Linux maps it to the server's byte-range locks (NFSv4, or NLM for v3), and a
    mount with ``nolock`` only locks within one machine. Where the filesystem has no locks at all the block
    runs unlocked, with a warning.
    """
    import socket
    from datetime import datetime, timezone

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _acquire(path, folder, what)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a process that opened this file sees it gone and retries
        os.close(fd)
        if created:  # a folder made only for the lock (the work failed before writing) is not left behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_folder_free(folder: str | os.PathLike, what: str = "folder") -> None:
    """Raise :class:`FolderInUse` now if another process holds the lock of ``folder``; creates nothing.

    Only a quick look (the command takes the lock itself later, with :func:`folder_lock`): the CLI calls it
    before importing torch, so a refused second process answers in a moment instead of after its start-up.
    """
    import fcntl

    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (no holder), or unreadable: folder_lock decides later
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, what, _read_holder(fd)) from None
    except OSError:  # a filesystem without locks: folder_lock warns later
        pass
    finally:
        os.close(fd)  # closing releases a lock we took


def _acquire(path: Path, folder: Path, what: str) -> Optional[int]:
    """The locked descriptor of ``path``; None where the filesystem cannot lock."""
    import fcntl
    import logging

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise _in_use(folder, what, holder) from None
        except OSError as exc:  # ENOLCK / EOPNOTSUPP: a filesystem without locks
            os.close(fd)
            logging.getLogger(__name__).warning("%s: cannot lock (%s); going on without a lock", folder, exc.strerror)
            return None
        # The holder before us may have removed the file after we opened it: then we would hold a lock on a
        # file no one else opens. Start again on the file the path names now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _in_use(folder: str | os.PathLike, what: str, holder: str) -> FolderInUse:
    return FolderInUse(f"{folder}: {what} in use by another medxfer process ({holder}); wait for it to end "
                       "or use another output folder")


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def stable_hash(obj: Any, length: int = 12) -> str:
    """First ``length`` hex digits of sha1 over the canonical JSON of ``obj`` (key order irrelevant)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks): what a record says about the weights it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
