import os
import subprocess

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _quiet_lightning(monkeypatch):
    # Lightning's tips and warnings are noise in test output.
    monkeypatch.setenv("PL_DISABLE_FORK", "1")
    yield


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (mounting needs root; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
