"""Run records: one ``result.json`` per run, written atomically; tables are derived from them.

A base layer beside ``io.py``: a single ``finetune`` or ``pretrain`` writes through it, and sweeps use it.

A run is done exactly when ``runs/<run_id>/result.json`` exists with ``status == "done"``. A failed run
writes ``error.json`` instead (so a retry can find it) and never a ``result.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from medxfer.config import dataset_name as config_dataset_name
from medxfer.io import atomic_write_json, atomic_write_text, stable_hash

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
# The test set of the forgetting baseline (a run's starting model on its source test set, before fine-tuning)
SOURCE_BEFORE = "source before fine-tuning"
ERROR_FILE = "error.json"

# The published reference tables' columns, in their order; medxfer's own columns follow.
REFERENCE_COLUMNS = [
    "model", "dataset", "pretraining length", "ImageNet accuracy", "freeze encoder", "pretraining scheme",
    "seed", "accuracy", "balanced accuracy", "sensitivity", "specificity", "precision", "dice index",
    "jaccard index", "mcc", "modified hausdorff distance", "area under roc", "average precision score",
    "mean dice index", "mean jaccard index",
]
REFERENCE_METRICS = REFERENCE_COLUMNS[7:]
OWN_COLUMNS = [
    "hd95", "hausdorff distance", "assd", "nsd", "strategy", "n train images", "test set", "loss", "run id",
    "train time s", "eval time s", "total time s", "metric averaging", "nan count", "dataset layout", "n classes",
    "class names", "dataset id", "dataset root", "headline metric", "headline dice", "pooled dice index",
    "present-image dice index", "absent-image false-positive rate", "converged", "pretraining length unit",
    "threads",
]
# medxfer.evaluation.metrics' class means of POOLED_DICE, PRESENT_DICE, ABSENT_FP_RATE
CLASS_AGGREGATED_COLUMNS = ("pooled dice index", "present-image dice index", "absent-image false-positive rate")
# The headline of records written before runs named theirs (medxfer.evaluation.metrics.HEADLINES["per_image"]).
OLD_HEADLINE = "per-image mean dice index"


def run_dir(root: str | Path, run_id: str) -> Path:
    return Path(root) / "runs" / run_id


EVALUATIONS_DIR = "evaluations"  # `medxfer evaluate` records: <out>/evaluations/<id>/result.json


def evaluation_dir(root: str | Path, evaluation_id: str) -> Path:
    return Path(root) / EVALUATIONS_DIR / evaluation_id


def iter_evaluations(root: str | Path) -> Iterable[dict[str, Any]]:
    """Finished ``medxfer evaluate`` records under ``root/evaluations`` (kind "evaluate"), in id order.
    They hold a model's metrics without training (a base model's own source Dice, its zero-shot Dice):
    kept apart from ``runs/`` so that no table counts them as fine-tuning runs."""
    folder = Path(root) / EVALUATIONS_DIR
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(f"*/{RESULT_FILE}")):
        record = load_record(path)
        if record is not None and record.get("kind") == "evaluate":
            yield record


def is_done(root: str | Path, run_id: str) -> bool:
    return (run_dir(root, run_id) / RESULT_FILE).is_file()


def write_record(directory: str | Path, record: dict[str, Any]) -> Path:
    path = Path(directory) / RESULT_FILE
    atomic_write_json(path, record)
    error = Path(directory) / ERROR_FILE
    if error.exists():
        error.unlink()
    return path


def write_error(directory: str | Path, record: dict[str, Any]) -> Path:
    path = Path(directory) / ERROR_FILE
    atomic_write_json(path, record)
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_record(path: str | Path, *, warn: bool = True) -> Optional[dict[str, Any]]:
    """The record (a JSON object) at ``path``; None when there is none or it is unreadable (truncated,
    empty, not UTF-8, a list...): records are written atomically, so that is damage from outside, and one
    damaged record must not stop the commands that read many. An unreadable one is named in a warning."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = " ".join(f"{type(exc).__name__}: {exc}".split())
    else:
        if isinstance(record, dict):
            return record
        problem = f"a JSON {type(record).__name__}, not a record"
    if warn:
        log.warning("skipping %s: unreadable (%s)", path, problem)
    return None


def iter_records(root: str | Path, kind: Optional[str] = None) -> Iterable[dict[str, Any]]:
    """Finished run records under ``root/runs`` in run-id order (``kind`` filters e.g. "finetune");
    unreadable ones are skipped with a warning naming them."""
    runs = Path(root) / "runs"
    if not runs.is_dir():
        return
    for path in sorted(runs.glob(f"*/{RESULT_FILE}")):
        record = load_record(path)
        if record is not None and (kind is None or record.get("kind", "finetune") == kind):
            yield record


def dataset_name(record: dict[str, Any]) -> str:
    """The dataset's name in tables: the record's (a run names its dataset by
    :func:`medxfer.config.dataset_name`); records written before that rule, which say only ``folders``,
    are named by their data root's folder."""
    data = (record.get("config") or {}).get("data") or {}
    layout = str(data.get("name") or "")
    return config_dataset_name(layout, str(record.get("dataset") or ""), data.get("root"))


def dataset_identity(record: dict[str, Any]) -> tuple[str, str]:
    """(id, resolved root) of a run's dataset: the content fingerprint its record carries, else (records
    from before fingerprints) a hash of the layout, resolved root and options; the root may be empty."""
    identity = record.get("dataset_identity") or {}
    data = (record.get("config") or {}).get("data") or {}
    root = identity.get("root") or data.get("root") or ""
    if identity.get("fingerprint"):
        return str(identity["fingerprint"]), str(root)
    if root:
        root = str(Path(str(root)).resolve())
    return "cfg-" + stable_hash({"layout": data.get("name"), "root": root, "options": data.get("options") or {},
                                 "dataset": record.get("dataset")})[:8], str(root)


def label_set(record: dict[str, Any], metrics: dict[str, Any]) -> tuple[Any, str]:
    """(number of classes with background, foreground class names) of a run: from the record where it says
    (``n_classes``, ``class_names``), else from the per-class metric keys (binary tasks have none)."""
    if record.get("class_names"):
        names = [str(n) for n in record["class_names"]]
        return record.get("n_classes", len(names)), ", ".join(names[1:] if len(names) > 1 else names)
    suffixes = sorted({key.split("/", 1)[1] for key in metrics if key.startswith("dice index/")})
    if suffixes:
        return len(suffixes) + 1, ", ".join(suffixes)
    return (2, "foreground") if "dice index" in metrics else (math.nan, "")


def _nan_if_none(value: Any) -> Any:
    return math.nan if value is None else value


def headline_of(result: dict[str, Any]) -> tuple[str, float]:
    """(metric name, value) of one test set's headline; records without one had the per-image mean Dice
    (``dice index`` for binary tasks, else ``mean dice index``)."""
    headline = result.get("headline")
    if isinstance(headline, dict) and "value" in headline:
        return str(headline.get("metric")), _nan_if_none(headline["value"])
    values = result.get("per_image_mean") or {}
    value = values.get("dice index")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = values.get("mean dice index")
    return OLD_HEADLINE, _nan_if_none(value)


def _length_unit_text(unit: Any) -> str:
    """``steps of fashion-mnist`` (what a pretraining length counts), or "" when the record does not say."""
    if not isinstance(unit, dict) or not unit.get("unit"):
        return ""
    return f"{unit['unit']}s" + (f" of {unit['data']}" if unit.get("data") else "")


def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One results.csv row per test set of a fine-tuning record. The reference metric columns are per-image
    means (``metric averaging`` says so); ``headline dice`` is the run's headline (``headline metric`` names
    it) and the class-aggregated values (pooled Dice, present-image Dice, absent-image false-positive rate)
    follow, per class too; the remaining dataset-pooled values stay in the JSON record."""
    rows = []
    pre = record.get("pretraining") or {}
    identity, root = dataset_identity(record)
    for test_set, result in (record.get("metrics") or {}).items():
        values = result.get("per_image_mean", {})
        n_classes, class_names = label_set(record, values)
        row: dict[str, Any] = {
            "model": record.get("model"),
            "dataset": dataset_name(record),
            "pretraining length": _nan_if_none(pre.get("length")),
            "ImageNet accuracy": _nan_if_none(pre.get("accuracy")),
            "freeze encoder": bool(record.get("freeze_encoder", False)),
            "pretraining scheme": pre.get("scheme") or "",
            "seed": record.get("seed"),
        }
        for metric in REFERENCE_METRICS:
            row[metric] = _nan_if_none(values.get(metric))
        row.update({
            **{name: _nan_if_none(values.get(name)) for name in ("hd95", "hausdorff distance", "assd", "nsd")},
            "strategy": record.get("strategy"),
            "n train images": record.get("n_train_images"),
            "test set": test_set,
            "loss": (record.get("loss") or {}).get("name"),
            "run id": record.get("run_id"),
            "train time s": (record.get("timings") or {}).get("train_s"),
            "eval time s": (record.get("timings") or {}).get("eval_s"),
            "total time s": (record.get("timings") or {}).get("total_s"),
            "metric averaging": "per-image mean",
            "nan count": sum((result.get("nan_counts") or {}).values()),
            "dataset layout": (record.get("config") or {}).get("data", {}).get("name"),
            "n classes": n_classes,
            "class names": class_names,
            "dataset id": identity,
            "dataset root": root,
            "pretraining length unit": _length_unit_text(pre.get("length_unit")),
        })
        row["headline metric"], row["headline dice"] = headline_of(result)
        # True / False by medxfer.training.curves.convergence; NaN = undecided or an older record
        row["converged"] = _nan_if_none((record.get("convergence") or {}).get("converged"))
        # intra-op threads the run trained with (part of its id); NaN = a record from before they were recorded
        row["threads"] = _nan_if_none((record.get("threads") or {}).get("intra_op"))
        aggregated = result.get("class_aggregated") or {}
        row.update({key: _nan_if_none(aggregated.get(key)) for key in CLASS_AGGREGATED_COLUMNS})
        # Multi-class runs: every per-class ("dice index/LV", named as the dataset names its classes) and
        # class-mean value too, after the fixed columns.
        row.update({key: value for key, value in values.items() if key not in row})
        row.update({key: value for key, value in aggregated.items() if key not in row})
        rows.append(row)
    return rows


def results_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    rows = [row for record in records for row in record_rows(record)]
    columns = REFERENCE_COLUMNS + OWN_COLUMNS
    table = pd.DataFrame(rows)
    for column in columns:
        if column not in table.columns:
            table[column] = pd.Series(dtype="float64")
    extra = [c for c in table.columns if c not in columns]
    return _split_label_sets(_split_identities(table[columns + extra]))


def _distinguishing_names(roots: list[str]) -> Optional[list[str]]:
    """The shortest trailing parts of the paths ``roots`` that tell them apart (``a/hippo`` vs ``b/hippo``);
    None when two are equal or empty."""
    if len(set(roots)) != len(roots) or not all(roots):
        return None
    parts = [Path(r).parts for r in roots]
    for k in range(1, max(len(p) for p in parts) + 1):
        tails = ["/".join(p[-k:]) for p in parts]
        if len(set(tails)) == len(tails):
            return tails
    return None


def _split_identities(table: pd.DataFrame) -> pd.DataFrame:
    """One dataset name, one dataset: where runs of one name used different data (two ``folders`` roots of
    one folder name, one root whose files changed), each gets its distinguishing root path (else its
    dataset id) appended, so they are never pooled as extra seeds of one set-up."""
    if table.empty:
        return table
    table = table.copy()
    for name, group in table.groupby("dataset", sort=True, dropna=False):
        ids = list(dict.fromkeys(group["dataset id"].astype(str)))
        if len(ids) < 2:
            continue
        roots = [str(group.loc[group["dataset id"].astype(str) == i, "dataset root"].iloc[0] or "") for i in ids]
        tails = _distinguishing_names(roots) or [f"data {i}" for i in ids]
        for identity, tail in zip(ids, tails):
            rows = (table["dataset"] == name) & (table["dataset id"].astype(str) == identity)
            table.loc[rows, "dataset"] = f"{name} ({tail})"
        log.warning("runs named %s used %d different datasets: named apart (%s)", name, len(ids), ", ".join(tails))
    return table


def _split_label_sets(table: pd.DataFrame) -> pd.DataFrame:
    """One dataset name, one label set: where runs of one name and test set have different classes (e.g. a
    binary and a 3-class run of one folder), each name gets its label set appended, so no table, figure
    or analysis can pool them."""
    if table.empty:
        return table
    label = table["n classes"].map(lambda n: "" if pd.isna(n) else f"{int(n)} classes") + ": " \
        + table["class names"].fillna("").astype(str)
    mixed = label.groupby([table["dataset"], table["test set"]], dropna=False).transform("nunique") > 1
    if mixed.any():
        table = table.copy()
        table.loc[mixed, "dataset"] = table.loc[mixed, "dataset"].astype(str) + " (" + label[mixed] + ")"
        log.warning("runs of one dataset name with different classes: named apart (%s)",
                    ", ".join(sorted(table.loc[mixed, "dataset"].unique())))
    return table


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    atomic_write_text(path, table.to_csv(index=False))
    return Path(path)


def collect(root: str | Path) -> Path:
    """Aggregate every finished fine-tuning record under ``root`` into ``root/results.csv``."""
    table = results_table(iter_records(root, kind="finetune"))
    return write_csv(table, Path(root) / "results.csv")


ROBUSTNESS_FILE = "robustness.csv"
SCORES_DIR = "scores"


def run_status(root: str | Path, run_id: str) -> str:
    """``"done"`` (a readable result.json), ``"failed"`` (error.json only) or ``"pending"`` (neither: new or
    interrupted; an unreadable result.json counts as none, and the run is redone)."""
    directory = run_dir(root, run_id)
    if load_record(directory / RESULT_FILE, warn=False) is not None:
        return "done"
    if (directory / ERROR_FILE).is_file():
        return "failed"
    return "pending"


def read_error(root: str | Path, run_id: str) -> Optional[dict[str, Any]]:
    path = run_dir(root, run_id) / ERROR_FILE
    try:
        return read_record(path)
    except (OSError, ValueError):
        return None


def remove_partial_files(directory: str | Path, recursive: bool = False) -> int:
    """Delete the temporary files a killed atomic write leaves (``.NAME.*.tmp``) in ``directory`` (and its
    subfolders if ``recursive``). Only for folders no live process writes to (e.g. a run about to be redone)."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for path in (directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp")):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def collect_robustness(root: str | Path) -> Optional[Path]:
    """Concatenate the score tables ``root/scores/*/robustness.csv`` (one per checkpoint folder and dataset, in
    folder-name order) into ``root/robustness.csv``. Returns None (and leaves any existing file) when there
    are none."""
    paths = sorted((Path(root) / SCORES_DIR).glob(f"*/{ROBUSTNESS_FILE}"))
    tables = []
    for path in paths:
        try:
            tables.append(pd.read_csv(path))
        except pd.errors.EmptyDataError:
            continue
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:  # damaged: skipped and named
            log.warning("skipping %s: unreadable (%s)", path, " ".join(f"{type(exc).__name__}: {exc}".split()))
    if not tables:
        return None
    return write_csv(pd.concat(tables, ignore_index=True, sort=False), Path(root) / ROBUSTNESS_FILE)


EVALUATIONS_FILE = "evaluations.csv"


def collect_evaluations(root: str | Path) -> Optional[Path]:
    """The ``medxfer evaluate`` records under ``root/evaluations`` as ``root/evaluations.csv``: the columns of
    results.csv (strategy empty: nothing was trained) plus the evaluated weights. None (and no file) when
    there are none."""
    rows = []
    for record in iter_evaluations(root):
        evaluated = record.get("evaluated") or {}
        for row in record_rows(record):
            rows.append({**row, "evaluation id": record.get("evaluation_id"), "split": record.get("split"),
                         "model file": evaluated.get("path"), "model source": evaluated.get("source"),
                         "model run id": evaluated.get("run_id")})
    if not rows:
        return None
    return write_csv(pd.DataFrame(rows), Path(root) / EVALUATIONS_FILE)


def collect_all(root: str | Path) -> dict[str, Optional[Path]]:
    """``collect`` + ``collect_robustness`` + ``collect_evaluations``: the tables ``medxfer collect DIR`` and a
    sweep's end write."""
    return {"results": collect(root), "robustness": collect_robustness(root), "evaluations": collect_evaluations(root)}
