"""Whether a run converged, from its validation curve (pure Python: the report reads the same rule).

The convergence rule (:func:`convergence`), on the validation curve ``[(step, value)]`` of one run, with
``T`` its last validated step: the *late* points are those after ``0.75 T`` (the last quarter of the steps),
the *early* ones the rest. The run is **not converged** when ``max(late) > max(early) + tolerance``: its
validation headline still reached a new high, by more than the tolerance, in the last quarter of training.
It is undecided (``converged: None``) with no validation curve or fewer than 2 points in either part
(too few validations to tell). ``CONVERGENCE_TOLERANCE`` = 0.01 Dice: on the demo's few-slice validation
sets one validation image changes the pooled Dice by a few hundredths, so a smaller rise is noise.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

CONVERGENCE_TOLERANCE = 0.01  # Dice; see the module docstring
LATE_FRACTION = 0.25  # the last quarter of the steps
MIN_POINTS = 2  # validations needed in each part of the curve


def convergence(val_curve: Sequence[Sequence[float]], tolerance: float = CONVERGENCE_TOLERANCE) -> dict[str, Any]:
    """The record's ``convergence`` entry: ``{"converged": True | False | None, "rule", "tolerance",
    "early_best", "late_best", "reason"}`` for a validation curve of ``[step, value]`` pairs (NaN values,
    undefined validations, are left out)."""
    points = [(float(s), float(v)) for s, v in val_curve if not math.isnan(float(v))]
    entry: dict[str, Any] = {"converged": None, "tolerance": tolerance, "early_best": None, "late_best": None,
                             "rule": f"not converged when the best validation value after {1 - LATE_FRACTION:g} of "
                                     f"the last validated step exceeds the best before it by more than {tolerance:g}"}
    if not points:
        entry["reason"] = "no validation curve (no validation set)"
        return entry
    last = max(s for s, _ in points)
    cut = (1 - LATE_FRACTION) * last
    early = [v for s, v in points if s <= cut]
    late = [v for s, v in points if s > cut]
    if len(early) < MIN_POINTS or len(late) < MIN_POINTS:
        entry["reason"] = (f"too few validations to tell ({len(early)} before and {len(late)} in the last quarter; "
                           f"{MIN_POINTS} each needed)")
        return entry
    entry["early_best"], entry["late_best"] = max(early), max(late)
    entry["converged"] = not entry["late_best"] > entry["early_best"] + tolerance
    entry["reason"] = (f"best {entry['late_best']:.3f} in the last quarter vs {entry['early_best']:.3f} before"
                       + ("" if entry["converged"] else ": still rising"))
    return entry
