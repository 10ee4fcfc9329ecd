"""``medxfer analyze``: do transferability scores predict downstream Dice over pretraining lengths, and
how good is the pretraining length each stop rule picks?

Downstream results (``results.csv``, or a published reference table) and scores (``robustness.csv``,
optionally ``baselines.csv``) are joined per group = (model, dataset, pretraining scheme, frozen encoder)
over the pretraining lengths both have; a model joins the scores of its encoder. Names are mapped to
canonical keys first (:func:`encoder_key`, :func:`dataset_key`, :func:`scheme_key`): built-in defaults
cover the published tables' spellings and medxfer's own; a YAML file (:class:`medxfer.config.NameMapConfig`)
adds or overrides entries.

Per group and overall:

- Spearman and Kendall correlation (scipy) of each score variant with the mean Dice over seeds;
- for each stop rule (each score variant with ``argmin`` and optional ``patience`` rules, plus the
  baselines "longest pretraining" and "shortest non-zero pretraining"): the chosen length, its Dice regret
  against the best length of the group, and the fraction of pretraining saved against the longest;
- the variant with the lowest mean regret, chosen on all data (optimistic: in-sample) and, out of sample,
  chosen on the other datasets and scored on the held-out one (leave-one-dataset-out).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from medxfer.config import NameMapConfig, parse_config, read_yaml
from medxfer.errors import ConfigError, DataError
from medxfer.transferability.stopping import recommend_checkpoint

log = logging.getLogger(__name__)

# Published reference tables' spellings (and medxfer's) -> canonical keys. Keys are compared after
# :func:`normalize_name`, so case, spaces, hyphens and underscores do not matter.
DEFAULT_ENCODER_NAMES = {
    "ResNet50 Attention U-Net": "resnet50", "resnet50": "resnet50",
    "Swin U-Net": "swin", "swin_transformer": "swin",
    "basic U-Net": "unet", "u-net_encoder": "unet",
    # medxfer model presets and encoder names
    "unet": "unet", "attention_unet": "unet", "unet3d": "unet", "attention_unet3d": "unet",
    "swin_unet": "swin",
}
DEFAULT_DATASET_NAMES = {"COVIDQUDataset": "covidqu", "COVID-QU": "covidqu"}
DEFAULT_SCHEME_NAMES = {"advanced_training": "advanced", "simple_training": "simple"}

DOWNSTREAM_COLUMNS = ("model", "dataset", "pretraining length", "freeze encoder", "pretraining scheme")
SCORE_COLUMNS = ("dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                 "pretraining_length", "robustness")
GROUP_KEYS = ["model", "encoder_key", "dataset_key", "scheme_key", "frozen"]
FIXED_RULES = ("longest pretraining", "shortest non-zero pretraining")


def normalize_name(name: Any) -> str:
    """Lower case, letters and digits only: ``"COVID-QU"`` -> ``"covidqu"``. Missing -> ``""``."""
    if name is None or (isinstance(name, float) and math.isnan(name)):
        return ""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def _lookup(name: Any, *tables: Mapping[str, str]) -> Optional[str]:
    raw = "" if name is None else str(name)
    norm = normalize_name(name)
    for table in tables:
        if raw in table:
            return normalize_name(table[raw])
        for key, value in table.items():
            if normalize_name(key) == norm:
                return normalize_name(value)
    return None


def encoder_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    """Canonical encoder of a model or encoder name (``"ResNet50 Attention U-Net"``,
    ``"resnet50_attention_unet"`` and ``"resnet50"`` all -> ``"resnet50"``)."""
    found = _lookup(name, (names.encoder if names else {}), DEFAULT_ENCODER_NAMES)
    if found is not None:
        return found
    norm = normalize_name(name)
    resnet = re.match(r"(resnet\d+)", norm)
    if resnet:
        return resnet.group(1)
    if norm.startswith("swin"):
        return "swin"
    return norm


def _key_without_suffix(name: Any, mapping: Mapping[str, str], defaults: Mapping[str, str], suffix: str) -> str:
    """The mapped key of ``name``, else its normalised form without a trailing ``suffix``."""
    found = _lookup(name, mapping, defaults)
    if found is not None:
        return found
    norm = normalize_name(name)
    return norm[: -len(suffix)] if norm.endswith(suffix) and len(norm) > len(suffix) else norm


def dataset_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    return _key_without_suffix(name, names.dataset if names else {}, DEFAULT_DATASET_NAMES, "dataset")


def scheme_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    return _key_without_suffix(name, names.scheme if names else {}, DEFAULT_SCHEME_NAMES, "training")


def load_names(source: NameMapConfig | Mapping[str, Any] | str | Path | None) -> NameMapConfig:
    """A name mapping from a YAML file (keys ``encoder``, ``dataset``, ``scheme``), a dict, or None."""
    if source is None:
        return NameMapConfig()
    if isinstance(source, NameMapConfig):
        return source
    if isinstance(source, (str, Path)):
        return parse_config(read_yaml(source), NameMapConfig, source=str(source))
    return parse_config(dict(source), NameMapConfig, source="<names>")


# --------------------------------------------------------------------------------------------------
# Reading and preparing the two tables


def _read_table(source: pd.DataFrame | str | Path, what: str) -> tuple[pd.DataFrame, str]:
    if isinstance(source, pd.DataFrame):
        return source.copy(), f"<{what}>"
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: {what} table not found")
    try:
        return pd.read_csv(path), str(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the {what} table: {str(exc).splitlines()[0]}") from None


def _require(table: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}")


def _to_bool(values: pd.Series) -> pd.Series:
    def one(v: Any) -> bool:
        if isinstance(v, str):
            return v.strip().lower() in ("true", "1", "yes", "y", "t")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        return bool(v)

    return values.map(one).astype(bool)


def prepare_downstream(table: pd.DataFrame, names: NameMapConfig, source: str = "<downstream>",
                       test_set: Optional[str] = "target") -> pd.DataFrame:
    """Mean Dice over seeds per (group, pretraining length). Dice = ``dice index``, or ``mean dice index``
    where that is empty (multi-class). Rows without a pretraining length (scratch runs) are left out."""
    _require(table, DOWNSTREAM_COLUMNS, source)
    if "dice index" not in table.columns and "mean dice index" not in table.columns:
        raise DataError(f"{source}: needs a 'dice index' or 'mean dice index' column")
    if test_set is not None and "test set" in table.columns:
        keep = table["test set"].isna() | (table["test set"].astype(str) == test_set)
        table = table[keep]
    dice = pd.to_numeric(table.get("dice index", pd.Series(np.nan, index=table.index)), errors="coerce")
    if "mean dice index" in table.columns:
        dice = dice.fillna(pd.to_numeric(table["mean dice index"], errors="coerce"))
    frame = pd.DataFrame({
        "model": table["model"].astype(str),
        "encoder_key": table["model"].map(lambda n: encoder_key(n, names)),
        "dataset": table["dataset"].astype(str),
        "dataset_key": table["dataset"].map(lambda n: dataset_key(n, names)),
        "scheme_key": table["pretraining scheme"].map(lambda n: scheme_key(n, names)),
        "frozen": _to_bool(table["freeze encoder"]),
        "length": pd.to_numeric(table["pretraining length"], errors="coerce"),
        "dice": dice,
    })
    frame = frame.dropna(subset=["length", "dice"])
    if frame.empty:
        raise DataError(f"{source}: no rows with both a pretraining length and a Dice value")
    grouped = frame.groupby(GROUP_KEYS + ["length"], as_index=False).agg(
        dataset=("dataset", "first"), dice=("dice", "mean"), dice_std=("dice", "std"), n_seeds=("dice", "size"))
    return grouped


def _variant_name(metric: str, margin: float, level: int, pooled: bool) -> str:
    return f"{metric} margin={margin:g} level={level} {'pooled' if pooled else 'flat'}"


def prepare_scores(robustness: Optional[pd.DataFrame], baselines: Optional[pd.DataFrame], names: NameMapConfig,
                   sources: tuple[str, str] = ("<robustness>", "<baselines>")) -> pd.DataFrame:
    """One row per (encoder, dataset, scheme, variant, length): ``score`` oriented so that lower is better
    (baseline estimators, higher-is-better, are negated in ``oriented``)."""
    parts = []
    if robustness is not None:
        _require(robustness, SCORE_COLUMNS, sources[0])
        r = robustness
        margin = pd.to_numeric(r["margin"], errors="coerce").astype(float)
        level = pd.to_numeric(r["level"], errors="coerce")
        pooled = _to_bool(r["pooled"])
        parts.append(pd.DataFrame({
            "family": "robustness",
            "variant": [_variant_name(m, g, int(lv), p) for m, g, lv, p in zip(r["metric"], margin, level, pooled)],
            "metric": r["metric"].astype(str), "margin": margin, "level": level.astype(int), "pooled": pooled,
            "encoder_key": r["encoder"].map(lambda n: encoder_key(n, names)),
            "dataset_key": r["dataset"].map(lambda n: dataset_key(n, names)),
            "scheme_key": r["pretraining_scheme"].map(lambda n: scheme_key(n, names)),
            "length": pd.to_numeric(r["pretraining_length"], errors="coerce"),
            "score": pd.to_numeric(r["robustness"], errors="coerce"),
            "higher_is_better": False,
        }))
    if baselines is not None:
        _require(baselines, ("dataset", "metric", "encoder", "pretraining_scheme", "level", "pretraining_length",
                             "score"), sources[1])
        b = baselines
        higher = _to_bool(b["higher_is_better"]) if "higher_is_better" in b.columns else pd.Series(True, index=b.index)
        level = pd.to_numeric(b["level"], errors="coerce").fillna(-1).astype(int)
        parts.append(pd.DataFrame({
            "family": "baseline estimator",
            "variant": [f"{m} level={lv}" for m, lv in zip(b["metric"], level)],
            "metric": b["metric"].astype(str), "margin": np.nan, "level": level, "pooled": False,
            "encoder_key": b["encoder"].map(lambda n: encoder_key(n, names)),
            "dataset_key": b["dataset"].map(lambda n: dataset_key(n, names)),
            "scheme_key": b["pretraining_scheme"].map(lambda n: scheme_key(n, names)),
            "length": pd.to_numeric(b["pretraining_length"], errors="coerce"),
            "score": pd.to_numeric(b["score"], errors="coerce"),
            "higher_is_better": higher,
        }))
    if not parts:
        raise ConfigError("analyze: give a robustness table (and/or a baselines table)")
    scores = pd.concat(parts, ignore_index=True).dropna(subset=["length"])
    scores["oriented"] = np.where(scores["higher_is_better"], -scores["score"], scores["score"])
    keys = ["family", "variant", "metric", "margin", "level", "pooled", "encoder_key", "dataset_key", "scheme_key",
            "higher_is_better", "length"]
    # Several scorings of one checkpoint (e.g. seeds) are averaged.
    return scores.groupby(keys, as_index=False, dropna=False)[["score", "oriented"]].mean()


# --------------------------------------------------------------------------------------------------
# Per-group evaluation


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(x[ok], y[ok]).statistic
        tau = stats.kendalltau(x[ok], y[ok]).statistic
    return float(rho), float(tau)


def _outcome(chosen: float, lengths: np.ndarray, dice: np.ndarray) -> dict[str, float]:
    best = float(np.nanmax(dice))
    longest = float(lengths.max())
    chosen_dice = float(dice[np.flatnonzero(lengths == chosen)[0]])
    return {"chosen_length": chosen, "chosen_dice": chosen_dice, "best_dice": best,
            "best_length": float(lengths[int(np.nanargmax(dice))]), "regret": best - chosen_dice,
            "saved": (1.0 - chosen / longest) if longest > 0 else math.nan}


def evaluate_groups(downstream: pd.DataFrame, scores: pd.DataFrame, patience: Sequence[int] = ()) -> pd.DataFrame:
    """One row per (group, rule): correlation of the rule's variant with Dice, chosen length, regret, saved."""
    rows = []
    score_groups = {key: frame for key, frame in scores.groupby(["encoder_key", "dataset_key", "scheme_key"])}
    for key, group in downstream.groupby(GROUP_KEYS):
        model, enc, ds, scheme, frozen = key
        group_info = {"model": model, "dataset": group["dataset"].iloc[0], "encoder_key": enc, "dataset_key": ds,
                      "scheme_key": scheme, "frozen": bool(frozen)}
        candidates = score_groups.get((enc, ds, scheme))
        if candidates is None:
            log.info("no scores for %s / %s / %s: group left out", model, ds, scheme or "-")
            continue
        dice_by_length = dict(zip(group["length"].astype(float), group["dice"].astype(float)))
        for (family, variant), frame in candidates.groupby(["family", "variant"]):
            frame = frame[frame["length"].isin(dice_by_length)].sort_values("length")
            if len(frame) < 2:
                continue
            lengths = frame["length"].to_numpy(float)
            dice = np.array([dice_by_length[v] for v in lengths])
            oriented = frame["oriented"].to_numpy(float)
            rho, tau = _correlations(frame["score"].to_numpy(float), dice)
            first = frame.iloc[0]
            variant_info = {"family": family, "variant": variant, "metric": first["metric"],
                            "margin": first["margin"], "level": first["level"], "pooled": first["pooled"],
                            "higher_is_better": bool(first["higher_is_better"]), "n_lengths": len(lengths),
                            "spearman": rho, "kendall": tau}
            pairs = list(zip(lengths, oriented))
            rules = [("argmin", None)] + [("patience", int(k)) for k in patience]
            for rule, k in rules:
                if not np.isfinite(oriented).any():
                    continue
                rec = recommend_checkpoint(pairs, rule, k or 1)
                name = f"{variant} | {rule if k is None else f'patience={k}'}"
                rows.append({**group_info, "rule": name, **variant_info, "stop_rule": rule if k is None else f"patience={k}",
                             **_outcome(rec.length, lengths, dice)})
        # Fixed baselines on the lengths that have both Dice and at least one score.
        scored = set(candidates["length"].astype(float))
        lengths = np.array(sorted(v for v in dice_by_length if v in scored))
        if len(lengths) >= 2:
            dice = np.array([dice_by_length[v] for v in lengths])
            nonzero = lengths[lengths > 0]
            for name, chosen in (("longest pretraining", lengths.max()),
                                 ("shortest non-zero pretraining", nonzero.min() if len(nonzero) else math.nan)):
                if math.isnan(chosen):
                    continue
                rows.append({**group_info, "rule": name, "family": "fixed", "variant": name, "n_lengths": len(lengths),
                             "spearman": math.nan, "kendall": math.nan, "stop_rule": name,
                             **_outcome(float(chosen), lengths, dice)})
    if not rows:
        raise DataError("analyze: no (model, dataset, scheme) group has both downstream results and scores at "
                        "two or more common pretraining lengths; check the name mapping")
    return pd.DataFrame(rows)


def summarize(groups: pd.DataFrame) -> pd.DataFrame:
    """One row per rule over all groups: mean correlations, mean/median regret, mean saved."""
    agg = groups.groupby(["rule", "family"], as_index=False, dropna=False).agg(
        n_groups=("regret", "size"), spearman_mean=("spearman", "mean"), kendall_mean=("kendall", "mean"),
        regret_mean=("regret", "mean"), regret_median=("regret", "median"), regret_max=("regret", "max"),
        saved_mean=("saved", "mean"))
    return agg


def _best_rule(groups: pd.DataFrame) -> Optional[str]:
    """The robustness rule with the lowest mean regret (ties: more pretraining saved, then stronger
    negative Spearman, then name)."""
    candidates = summarize(groups[groups["family"] == "robustness"])
    if candidates.empty:
        return None
    candidates = candidates.assign(_neg_saved=-candidates["saved_mean"].fillna(-np.inf),
                                   _rho=candidates["spearman_mean"].fillna(np.inf))
    ordered = candidates.sort_values(["regret_mean", "_neg_saved", "_rho", "rule"], kind="stable")
    return str(ordered["rule"].iloc[0])


def leave_one_dataset_out(groups: pd.DataFrame) -> pd.DataFrame:
    """Per held-out dataset: the rule chosen on the other datasets, and its regret/saved on the held-out one."""
    rows = []
    datasets = sorted(groups["dataset_key"].unique())
    if len(datasets) < 2:
        return pd.DataFrame(columns=["held_out", "selected_rule", "n_groups", "regret_mean", "saved_mean",
                                     "oracle_rule", "oracle_regret_mean"])
    for held_out in datasets:
        train = groups[groups["dataset_key"] != held_out]
        test = groups[groups["dataset_key"] == held_out]
        chosen = _best_rule(train)
        oracle = _best_rule(test)
        if chosen is None:
            continue
        scored = test[test["rule"] == chosen]
        rows.append({"held_out": held_out, "selected_rule": chosen, "n_groups": len(scored),
                     "regret_mean": scored["regret"].mean() if len(scored) else math.nan,
                     "saved_mean": scored["saved"].mean() if len(scored) else math.nan,
                     "spearman_mean": scored["spearman"].mean() if len(scored) else math.nan,
                     "oracle_rule": oracle,
                     "oracle_regret_mean": test.loc[test["rule"] == oracle, "regret"].mean() if oracle else math.nan,
                     "_regret_sum": scored["regret"].sum(), "_saved_sum": scored["saved"].sum()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class AnalysisResult:
    summary: pd.DataFrame  # one row per rule, the selections first: what the CLI prints
    groups: pd.DataFrame  # one row per (group, rule)
    lodo: pd.DataFrame  # leave-one-dataset-out selection, one row per held-out dataset
    best_rule: Optional[str]
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)  # Dice and the selected variant per length
    paths: dict[str, Path] = field(default_factory=dict)


def analyze(downstream: pd.DataFrame | str | Path, robustness: pd.DataFrame | str | Path | None, *,
            baselines: pd.DataFrame | str | Path | None = None,
            names: NameMapConfig | Mapping[str, Any] | str | Path | None = None,
            patience: Sequence[int] = (), test_set: Optional[str] = "target",
            out_dir: str | Path | None = None, figures: bool = True) -> AnalysisResult:
    """Relate scores to downstream Dice and evaluate stop rules (see the module docstring).

    ``out_dir``: writes ``analysis_summary.csv``, ``analysis_groups.csv``, ``analysis_lodo.csv`` and
    (``figures``) ``figures/score_vs_dice.png``, ``figures/regret_vs_saved.png``.
    """
    names = load_names(names)
    down_table, down_source = _read_table(downstream, "downstream")
    robust_table, robust_source = (None, "<robustness>") if robustness is None else _read_table(robustness, "robustness")
    base_table, base_source = (None, "<baselines>") if baselines is None else _read_table(baselines, "baselines")
    down = prepare_downstream(down_table, names, down_source, test_set)
    scores = prepare_scores(robust_table, base_table, names, (robust_source, base_source))
    groups = evaluate_groups(down, scores, patience)
    summary = summarize(groups)
    best = _best_rule(groups)
    lodo = leave_one_dataset_out(groups)
    selection_rows = []
    if best is not None:
        row = summary[summary["rule"] == best].iloc[0].to_dict()
        selection_rows.append({**row, "rule": f"selected in-sample: {best}", "family": "selected (in-sample)"})
    if len(lodo):
        n = lodo["n_groups"].sum()
        selection_rows.append({
            "rule": "selected leave-one-dataset-out (" + "; ".join(
                f"{h}: {r}" for h, r in zip(lodo["held_out"], lodo["selected_rule"])) + ")",
            "family": "selected (out-of-sample)", "n_groups": int(n),
            "spearman_mean": lodo["spearman_mean"].mean(),
            "regret_mean": lodo["_regret_sum"].sum() / n if n else math.nan,
            "saved_mean": lodo["_saved_sum"].sum() / n if n else math.nan})
        lodo = lodo.drop(columns=["_regret_sum", "_saved_sum"])
    family_order = {"selected (in-sample)": 0, "selected (out-of-sample)": 1, "fixed": 2, "robustness": 3,
                    "baseline estimator": 4}
    summary = pd.concat([pd.DataFrame(selection_rows), summary], ignore_index=True)
    summary = summary.assign(_order=summary["family"].map(family_order).fillna(9)).sort_values(
        ["_order", "regret_mean", "rule"], kind="stable").drop(columns="_order").reset_index(drop=True)
    curves = pd.DataFrame()
    if best is not None:
        variant = groups.loc[groups["rule"] == best, "variant"].iloc[0]
        selected = scores.loc[scores["variant"] == variant, ["encoder_key", "dataset_key", "scheme_key", "length", "score"]]
        curves = down.merge(selected, on=["encoder_key", "dataset_key", "scheme_key", "length"]).sort_values("length")
    result = AnalysisResult(summary, groups, lodo, best, curves)
    if out_dir is not None:
        result.paths = write_outputs(result, Path(out_dir), figures=figures)
    return result


def write_outputs(result: AnalysisResult, out: Path, figures: bool = True) -> dict[str, Path]:
    from medxfer.io import atomic_write_text

    paths = {"summary": out / "analysis_summary.csv", "groups": out / "analysis_groups.csv",
             "lodo": out / "analysis_lodo.csv"}
    atomic_write_text(paths["summary"], result.summary.to_csv(index=False))
    atomic_write_text(paths["groups"], result.groups.to_csv(index=False))
    atomic_write_text(paths["lodo"], result.lodo.to_csv(index=False))
    if figures:
        paths.update(write_figures(result, out / "figures"))
    return paths


def _save_figure(fig, path: Path) -> Path:
    from medxfer.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    return path


def write_figures(result: AnalysisResult, folder: Path, max_panels: int = 12) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    groups = result.groups
    # Regret vs pretraining saved, one point per rule.
    summary = summarize(groups)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = {"robustness": "tab:blue", "baseline estimator": "tab:green", "fixed": "tab:red"}
    for family, frame in summary.groupby("family"):
        ax.scatter(frame["saved_mean"], frame["regret_mean"], s=18 if family == "robustness" else 40,
                   alpha=0.6 if family == "robustness" else 0.9, label=family, c=colours.get(family, "tab:gray"))
    if result.best_rule is not None:
        best = summary[summary["rule"] == result.best_rule].iloc[0]
        ax.scatter([best["saved_mean"]], [best["regret_mean"]], marker="*", s=200, c="gold", edgecolors="k",
                   label="selected (in-sample)")
    ax.set_xlabel("mean fraction of pretraining saved vs the longest")
    ax.set_ylabel("mean Dice regret vs the best length")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths["regret_vs_saved"] = _save_figure(fig, folder / "regret_vs_saved.png")
    plt.close(fig)
    # The selected variant's score next to Dice over pretraining length, per group.
    if result.best_rule is not None:
        chosen = groups[groups["rule"] == result.best_rule]
        panels = chosen.head(max_panels)
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (_, row) in zip(axes.flat, panels.iterrows()):
            ax.set_title(f"{row['model']} | {row['dataset']} | {row['scheme_key'] or '-'}"
                         f"{' | frozen' if row['frozen'] else ''}", fontsize=8)
            ax.axvline(row["chosen_length"], color="tab:orange", ls="--", lw=1, label="chosen")
            ax.axvline(row["best_length"], color="tab:green", ls=":", lw=1, label="best Dice")
            ax.set_xlabel("pretraining length")
            ax.set_ylabel("Dice")
            c = result.curves
            curve = c[(c["model"] == row["model"]) & (c["dataset_key"] == row["dataset_key"])
                      & (c["scheme_key"] == row["scheme_key"]) & (c["frozen"] == row["frozen"])]
            if len(curve):
                ax.plot(curve["length"], curve["dice"], "o-", color="tab:green", ms=3)
                twin = ax.twinx()
                twin.plot(curve["length"], curve["score"], "s-", color="tab:blue", ms=3)
                twin.set_ylabel("score", color="tab:blue")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"selected: {result.best_rule}", fontsize=9)
        fig.tight_layout()
        paths["score_vs_dice"] = _save_figure(fig, folder / "score_vs_dice.png")
        plt.close(fig)
    return paths


def summary_for_print(result: AnalysisResult, top: int = 15) -> pd.DataFrame:
    """The selections, the fixed baselines and the ``top`` best other rules, in a few columns."""
    summary = result.summary
    keep = summary["family"].isin(["selected (in-sample)", "selected (out-of-sample)", "fixed"])
    rest = summary[~keep].head(top)
    columns = ["rule", "family", "n_groups", "spearman_mean", "kendall_mean", "regret_mean", "saved_mean"]
    return pd.concat([summary[keep], rest])[columns].reset_index(drop=True)
