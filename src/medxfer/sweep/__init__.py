"""Sweeps: many fine-tuning runs from one grid file, resumable, locally or on Ray.

``run_sweep(grid, out_dir, ...)`` is the entry point; the run records and tables are the base layer
``medxfer.records``. Names are imported lazily so that importing the package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_sweep": "medxfer.sweep.runner",
    "SweepSummary": "medxfer.sweep.runner",
    "SweepRun": "medxfer.sweep.runner",
    "SweepConfig": "medxfer.sweep.grid",
    "load_sweep": "medxfer.sweep.grid",
    "parse_sweep": "medxfer.sweep.grid",
    "expand_grid": "medxfer.sweep.grid",
    "AXIS_ALIASES": "medxfer.sweep.grid",
    "collect_all": "medxfer.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medxfer.sweep' has no attribute {name!r}")
