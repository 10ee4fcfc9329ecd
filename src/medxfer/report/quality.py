"""Input integrity for ``medxfer analyze``: what is wrong with a table, and what was done about it.

Every finding is one :class:`Finding` (check, table, where, action, detail); analyze prints them and
writes them to ``data_quality.csv``, so nothing is left out silently. Checks:

- exact duplicate rows (one copy kept);
- rows without a value (left out);
- *copied blocks*: all values (two or more) of one pretraining length (a score block: every variant of one
  encoder, dataset and scheme; a Dice block: every seed of one group) identical to those of another length.
  Real checkpoints never score identically on every variant, so one of them is a copy. The block kept
  is the one that fits its neighbouring lengths best (smallest mean absolute difference to the blocks
  at the adjacent lengths): a pasted block does not fit where it was pasted. The others are left out
  (or only flagged, with ``keep_copies``);
- variants constant over a group's lengths (every length tied: argmin says nothing);
- groups whose lengths differ between the tables, and lengths with fewer seeds than the group's others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

LEFT_OUT = "left out"
FLAGGED = "flagged, kept"


@dataclass(frozen=True)
class Finding:
    check: str
    table: str
    where: str
    action: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.check} ({self.table}) {self.where}: {self.action}" + (f"; {self.detail}" if self.detail else "")


def findings_frame(findings: Sequence[Finding]) -> pd.DataFrame:
    return pd.DataFrame([asdict(f) for f in findings], columns=["check", "table", "where", "action", "detail"])


def drop_duplicate_rows(table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[Finding]]:
    duplicated = table.duplicated(keep="first")
    if not duplicated.any():
        return table, []
    lines = ", ".join(str(i + 2) for i in np.flatnonzero(duplicated.to_numpy())[:10])  # +2: header, 1-based
    more = "" if duplicated.sum() <= 10 else f" (first 10 of {int(duplicated.sum())})"
    return table[~duplicated], [Finding("duplicate rows", source, f"{int(duplicated.sum())} row(s)", LEFT_OUT,
                                        f"exact copies of earlier rows; file line(s) {lines}{more}")]


def copied_blocks(blocks: pd.DataFrame, length_level: str) -> list[tuple[tuple, float, float]]:
    """Blocks (rows of ``blocks``: index = block keys + ``length_level``, columns = values) identical to the
    block at another length of the same keys. Returns ``(keys, copy_length, kept_length)`` per copy."""
    copies = []
    key_levels = [n for n in blocks.index.names if n != length_level]
    for keys, frame in blocks.groupby(level=key_levels, sort=True):
        frame = frame.droplevel(key_levels).sort_index()
        values = frame.to_numpy(dtype=float)
        if values.shape[0] < 2 or values.shape[1] < 1:
            continue
        lengths = frame.index.to_numpy(dtype=float)
        signature: dict[bytes, list[int]] = {}
        for i, row in enumerate(values):
            # one value (one seed) equal at two lengths can be chance (e.g. two collapsed models); a copy
            # is called only when two or more values all agree
            if np.isfinite(row).sum() >= 2:
                signature.setdefault(np.nan_to_num(row, nan=np.inf).tobytes(), []).append(i)
        for members in signature.values():
            if len(members) < 2:
                continue
            keep = min(members, key=lambda i: (_misfit(values, i, set(members)), -lengths[i]))
            copies += [(keys if isinstance(keys, tuple) else (keys,), float(lengths[i]), float(lengths[keep]))
                       for i in members if i != keep]
    return copies


def _misfit(values: np.ndarray, i: int, members: set[int]) -> float:
    """Mean absolute difference of block ``i`` to the nearest non-member block on each side."""
    distances = []
    for step in (-1, 1):
        j = i + step
        while 0 <= j < len(values) and j in members:
            j += step
        if 0 <= j < len(values):
            with np.errstate(all="ignore"):
                distances.append(np.nanmean(np.abs(values[i] - values[j])))
    finite = [d for d in distances if np.isfinite(d)]
    return float(np.mean(finite)) if finite else np.inf


def summary_lines(findings: Sequence[Finding], examples: int = 2) -> list[str]:
    """One line per kind of finding: how many, what was done, the first ``examples``."""
    lines = []
    by_check: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        by_check.setdefault((f.check, f.action), []).append(f)
    for (check, action), found in by_check.items():
        shown = "; ".join(f"{f.where}" + (f" ({f.detail})" if f.detail else "") for f in found[:examples])
        more = f"; +{len(found) - examples} more" if len(found) > examples else ""
        lines.append(f"{check}: {len(found)}, {action}: {shown}{more}")
    return lines
