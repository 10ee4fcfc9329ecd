"""What :func:`medxfer.report.analyze.analyze` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from medxfer.report.analyze.evidence import Evidence
from medxfer.report.quality import Finding
from medxfer.report.rules import LODO, GroupCurves


@dataclass
class AnalysisResult:
    summary: pd.DataFrame  # one row per evaluated rule
    decisions: pd.DataFrame  # one row per (rule, group): decisions.csv
    correlations: pd.DataFrame  # one row per (group, predictor)
    claims: pd.DataFrame  # the reference study's claims, checked
    quality: list[Finding]  # every problem found in the inputs and what was done
    groups: list[GroupCurves]
    recommended: Optional[str]
    best_variant: Optional[str]  # the variant selected in-sample (argmin)
    paths: dict[str, Path] = field(default_factory=dict)
    recommended_rule: Optional[dict[str, Any]] = None  # recommended_rule.json: the online rule and its figures
    evidence: Optional[Evidence] = None  # the tables behind the claims (replication, between runs, ...)

    @property
    def best_rule(self) -> Optional[str]:  # the name the demo prints
        return self.recommended

    @property
    def lodo(self) -> pd.DataFrame:
        """Per fitted rule and held-out dataset: what was selected on the other datasets, and its regret."""
        frame = self.decisions[self.decisions["evaluation"] == LODO]
        if frame.empty:
            return pd.DataFrame(columns=["rule", "held_out", "selected", "n_groups", "regret_mean", "saved_mean"])
        return frame.groupby(["rule", "dataset_key"], as_index=False).agg(
            selected=("detail", lambda d: "; ".join(sorted(set(map(str, d))))), n_groups=("regret", "size"),
            regret_mean=("regret", "mean"), saved_mean=("saved", "mean")).rename(columns={"dataset_key": "held_out"})
