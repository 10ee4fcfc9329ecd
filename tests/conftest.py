import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _quiet_lightning(monkeypatch):
    # Lightning's tips and warnings are noise in test output.
    monkeypatch.setenv("PL_DISABLE_FORK", "1")
    yield
