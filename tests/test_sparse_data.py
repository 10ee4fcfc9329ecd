"""Sparse source sets (Case.annotated) as `data check` reports them."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medxfer.cli import main
from medxfer.config import DataConfig
from medxfer.data.check import check_dataset, check_report_lines


def write_sparse_nnunet(root: Path, annotated: dict[str, list[int]], n: int = 6) -> None:
    """A tiny nnU-Net v2 set: 3 classes, each case's mask holding only the classes it annotates."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        case = f"case_{i:03d}"
        label = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
        keep = annotated.get(case, [1, 2])
        label[~np.isin(label, [0, *keep])] = 0
        affine = np.eye(4)
        nib.save(nib.Nifti1Image(rng.normal(size=label.shape).astype(np.float32), affine),
                 str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "caudate": 1, "putamen": 2},
        "numTraining": n, "file_ending": ".nii.gz", "annotated_classes": annotated}))


def test_data_check_counts_annotating_and_partial_cases(tmp_path, capsys):
    annotated = {"case_000": [1], "case_001": [1], "case_002": [1], "case_003": [1], "case_004": [1], "case_005": [1]}
    write_sparse_nnunet(tmp_path, annotated)
    config = DataConfig(name="msd", root=tmp_path, spatial_dims=3, val_fraction=0.0,
                        options={"test_fraction": 0.34})
    report = check_dataset(config)
    train, test = report["splits"]["train"], report["splits"]["test"]
    assert train["annotation"] == {"cases_annotating": {"caudate": 4, "putamen": 0}, "partially_annotated_cases": 4}
    assert test["annotation"]["partially_annotated_cases"] == 2
    assert "class 2 (putamen) is annotated in no training case (sparse labels)" in report["warnings"]
    assert "class 2 (putamen) is annotated in no test case: it cannot be evaluated" in report["warnings"]
    lines = check_report_lines(report)
    assert any("sparse labels: 4 of 4 labelled cases annotate only some classes; cases annotating each class: "
               "caudate=4, putamen=0" in line for line in lines)
    assert main(["data", "check", "msd", str(tmp_path), "--dims", "3", "-o", "test_fraction=0.34"]) == 0
    assert "annotate only some classes" in capsys.readouterr().out


def test_data_check_is_silent_about_sparsity_on_a_fully_annotated_set(tmp_path):
    write_sparse_nnunet(tmp_path, {})
    report = check_dataset(DataConfig(name="msd", root=tmp_path, spatial_dims=3))
    assert report["splits"]["train"]["annotation"]["partially_annotated_cases"] == 0
    assert not any("sparse labels" in line for line in check_report_lines(report))
