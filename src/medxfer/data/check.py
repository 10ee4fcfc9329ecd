"""Dataset validation: load a dataset through the registry, check every case, and summarise it.

``check_dataset(config)`` is what ``medxfer data check NAME ROOT`` runs. It validates the dataset as
``config`` loads it, then every other mask set on disk (``medxfer.data.mask_variants``: IDRiD lesion
folders, COVID-QU infection/lung masks and categories, ACDC phases left out of ``frames``). Every defect (missing folder,
unreadable or truncated file, image/mask shape mismatch, label values outside the declared classes,
NaN/inf pixels, channel count or dimensionality that differs from the dataset's, empty dataset) is a
one-line :class:`~medxfer.errors.DataError` naming the file.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from medxfer.data import load_data, mask_variants
from medxfer.data.base import IGNORE_INDEX, Case, SegmentationData, check_case, size_mismatch
from medxfer.errors import DataError

log = logging.getLogger(__name__)

MAX_LISTED_SHAPES = 8


def case_sources(case: Case) -> tuple[str, Optional[str]]:
    """The image file and mask file a case came from (as the loader recorded them)."""
    source = str(case.meta.get("image_path") or case.case_id)
    label = case.meta.get("label_path")
    return source, (str(label) if label else None)


def validate_case(case: Case, data: SegmentationData) -> None:
    """:func:`medxfer.data.base.check_case` plus agreement with the dataset's channels and dims."""
    source, label_source = case_sources(case)
    check_case(case, source, data.n_classes, label_source=label_source)
    if case.image.ndim - 1 != data.spatial_dims:
        raise DataError(f"{source}: {case.image.ndim - 1}D image in a {data.spatial_dims}D dataset")
    if case.image.shape[0] != data.in_channels:
        raise DataError(f"{source}: {case.image.shape[0]} channel(s), the dataset has {data.in_channels}")


def _shape_summary(shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    unique = sorted(set(shapes))
    if len(unique) <= MAX_LISTED_SHAPES:
        return {"unique": [list(s) for s in unique]}
    array = np.asarray(shapes)
    return {"n_unique": len(unique), "min": array.min(axis=0).tolist(), "max": array.max(axis=0).tolist()}


def _split_summary(cases: list[Case], data: SegmentationData) -> dict[str, Any]:
    n_channels = data.in_channels
    lo = np.full(n_channels, np.inf)
    hi = np.full(n_channels, -np.inf)
    total = np.zeros(n_channels)
    count = 0
    voxels = np.zeros(data.n_classes, dtype=np.int64)
    cases_with = np.zeros(data.n_classes, dtype=np.int64)
    annotating = np.zeros(data.n_classes, dtype=np.int64)  # labelled cases that annotate each class
    partial = 0
    ignored = 0
    unlabelled = 0
    spacings = []
    for case in cases:
        validate_case(case, data)
        flat = case.image.reshape(n_channels, -1)
        lo = np.minimum(lo, flat.min(axis=1))
        hi = np.maximum(hi, flat.max(axis=1))
        total += flat.sum(axis=1, dtype=np.float64)
        count += flat.shape[1]
        if case.spacing is not None:
            spacings.append(tuple(float(s) for s in case.spacing))
        if case.label is None:
            unlabelled += 1
            continue
        classes = set(range(1, data.n_classes)) if case.annotated is None else {int(c) for c in case.annotated}
        annotating[sorted(classes)] += 1
        partial += len(classes) < data.n_classes - 1
        counts = np.bincount(case.label.ravel(), minlength=IGNORE_INDEX + 1)
        voxels += counts[: data.n_classes]
        cases_with += counts[: data.n_classes] > 0
        ignored += int(counts[IGNORE_INDEX])
    summary: dict[str, Any] = {
        "cases": len(cases),
        "groups": len({str(c.meta.get("group", c.case_id)) for c in cases}),
        "unlabelled": unlabelled,
        "shapes": _shape_summary([tuple(c.image.shape[1:]) for c in cases]) if cases else {},
        "spacing": (
            {"min": np.min(spacings, axis=0).tolist(), "max": np.max(spacings, axis=0).tolist()} if spacings else None
        ),
        "classes": {
            name: {"voxels": int(voxels[k]), "cases": int(cases_with[k])} for k, name in enumerate(data.class_names)
        },
        "ignored_voxels": ignored,
        # sparse labels (Case.annotated): how many labelled cases annotate each foreground class, how many
        # annotate only some of them
        "annotation": {"cases_annotating": {name: int(annotating[k]) for k, name in enumerate(data.class_names)
                                            if k > 0},
                       "partially_annotated_cases": partial},
        "intensity": [
            {"channel": c, "min": float(lo[c]), "max": float(hi[c]), "mean": float(total[c] / count)}
            for c in range(n_channels)
        ]
        if count
        else [],
    }
    return summary


def check_dataset(config) -> dict[str, Any]:
    """Load the dataset a :class:`medxfer.config.DataConfig` names, validate every case and return a
    JSON-able summary: counts, shapes, spacing, class voxel counts and intensity ranges per split."""
    data = load_data(config)
    where = str(config.root) if config.root is not None else config.name
    if not data.train and not data.val and not data.test:
        raise DataError(f"{where}: empty dataset: no cases found")
    if not data.train:
        raise DataError(f"{where}: empty dataset: the training split has no cases")
    if len(data.class_names) != data.n_classes:
        raise DataError(f"{where}: {len(data.class_names)} class names for {data.n_classes} classes")
    splits = {
        name: _split_summary(cases, data)
        for name, cases in (("train", data.train), ("val", data.val), ("test", data.test))
    }
    warnings = []
    for k, name in enumerate(data.class_names[1:], start=1):
        if splits["train"]["annotation"]["cases_annotating"][name] == 0:
            warnings.append(f"class {k} ({name}) is annotated in no training case (sparse labels)")
        elif splits["train"]["classes"][name]["voxels"] == 0:
            warnings.append(f"class {k} ({name}) never occurs in the training split")
        if (splits["test"]["cases"] > splits["test"]["unlabelled"]
                and splits["test"]["annotation"]["cases_annotating"][name] == 0):
            warnings.append(f"class {k} ({name}) is annotated in no test case: it cannot be evaluated")
    # whole-image training batches the training and validation images together: like fine-tuning, refuse
    # images of another size unless the run trains on patches or resizes (then they are fine)
    mismatch = size_mismatch(data.train + data.val) if config.patch_size is None else None
    if mismatch:
        raise DataError(f"{where}: {mismatch} (data check --patch-size or --resize: check as such a run)")
    if splits["test"]["cases"] == 0:
        warnings.append("no test cases")
    elif splits["test"]["unlabelled"]:
        warnings.append(f"{splits['test']['unlabelled']} test case(s) are unlabelled")
    for w in warnings:
        log.warning("%s: %s", where, w)
    report = {
        "name": data.name,
        "root": where,
        "spatial_dims": data.spatial_dims,
        "in_channels": data.in_channels,
        "n_classes": data.n_classes,
        "class_names": list(data.class_names),
        "splits": splits,
        "warnings": warnings,
    }
    del data  # a full-size dataset may be large: one copy in memory at a time
    report["also_validated"] = validate_other_masks(config)
    return report


def validate_other_masks(config) -> list[dict[str, Any]]:
    """Load and validate the mask sets on disk that ``config``'s options leave out (e.g. IDRiD's optic-disc
    masks when ``lesions: [EX]``), so that a corrupt download is found before training, not in the run
    that first asks for them. Returns, per extra option set, the options, classes and case count."""
    checked = []
    for variant in mask_variants(config):
        options = {**config.options, **variant}
        if options == {**config.options}:
            continue  # the configured load already read these masks
        data = load_data(config.model_copy(update={"options": options}))
        cases = data.train + data.val + data.test
        for case in cases:
            validate_case(case, data)
        checked.append({"options": variant, "classes": list(data.class_names), "cases": len(cases)})
    return checked


def check_report_lines(report: dict[str, Any]) -> list[str]:
    """A short human-readable rendering of :func:`check_dataset`'s result (for the CLI)."""
    lines = [
        f"{report['name']} ({report['root']}): {report['spatial_dims']}D, {report['in_channels']} channel(s), "
        f"{report['n_classes']} classes {report['class_names']}"
    ]
    for split, s in report["splits"].items():
        if not s["cases"]:
            lines.append(f"  {split}: 0 cases")
            continue
        shapes = s["shapes"].get("unique") or f"{s['shapes']['min']}..{s['shapes']['max']}"
        present = ", ".join(f"{n}={v['voxels']}" for n, v in s["classes"].items())
        ranges = "; ".join(
            f"c{i['channel']} [{i['min']:.4g}, {i['max']:.4g}] mean {i['mean']:.4g}" for i in s["intensity"]
        )
        lines.append(f"  {split}: {s['cases']} cases ({s['groups']} groups), shapes {shapes}")
        lines.append(
            f"    voxels per class: {present}; ignored {s['ignored_voxels']}; unlabelled cases {s['unlabelled']}"
        )
        sparse = s["annotation"]
        if sparse["partially_annotated_cases"]:
            labelled = s["cases"] - s["unlabelled"]
            per_class = ", ".join(f"{n}={v}" for n, v in sparse["cases_annotating"].items())
            lines.append(f"    sparse labels: {sparse['partially_annotated_cases']} of {labelled} labelled cases "
                         f"annotate only some classes; cases annotating each class: {per_class}")
        lines.append(f"    intensity: {ranges}")
        if s["spacing"]:
            lines.append(f"    spacing: {s['spacing']['min']}..{s['spacing']['max']}")
    for extra in report.get("also_validated", []):
        options = ", ".join(f"{k}={v}" for k, v in extra["options"].items())
        lines.append(f"  also validated (every mask set on disk): {options}: {extra['cases']} cases, "
                     f"classes {extra['classes']}; this config uses {report['class_names']}")
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return lines
