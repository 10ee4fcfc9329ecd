"""The multi-subject 3D stand-in: real Colin27/AAL anatomy, simulated subjects, nnU-Net v2 layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medxfer.config import DataConfig
from medxfer.data import load_data
from medxfer.data.colin27_subjects import TARGET_STRUCTURES, write_subjects

TEMPLATES = Path("/usr/share/mricron/templates")
pytestmark = pytest.mark.skipif(not (TEMPLATES / "aal.nii.gz").is_file(), reason="mricron-data not installed")


def test_sparse_source_subjects_are_deterministic_and_load(tmp_path):
    root = write_subjects(tmp_path / "a", "source", 2, seed=5)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "caudate": 1, "putamen": 2, "pallidum": 3, "thalamus": 4, "insula": 5}
    data = load_data(DataConfig(name="msd", root=root, spatial_dims=3, val_fraction=0.0,
                                options={"test_fraction": 0.0}))
    assert len(data.train) == 2 and data.n_classes == 6
    for case in data.train:
        assert case.image.shape == (1, 40, 56, 64) and case.spacing == pytest.approx((2.0, 2.0, 2.0))
        assert 2 <= len(case.annotated) <= 3
        present = set(np.unique(case.label).tolist()) - {0}
        assert present and present <= set(case.annotated)  # only the annotated structures are labelled
    again = write_subjects(tmp_path / "b", "source", 2, seed=5)
    first, second = (np.asarray(__import__("nibabel").load(str(r / "imagesTr" / "sub_001_0000.nii.gz")).dataobj)
                     for r in (root, again))
    np.testing.assert_array_equal(first, second)
    other = write_subjects(tmp_path / "c", "source", 2, seed=6)
    assert not np.array_equal(first, np.asarray(__import__("nibabel").load(
        str(other / "imagesTr" / "sub_001_0000.nii.gz")).dataobj))
    stamp = (root / "stand_in.json").stat().st_mtime_ns
    write_subjects(root, "source", 2, seed=5)  # same parameters: reused, not rewritten
    assert (root / "stand_in.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_target_subjects_label_both_new_structures_and_differ_between_subjects(tmp_path):
    root = write_subjects(tmp_path, "target", 2, seed=0)
    data = load_data(DataConfig(name="msd", root=root, spatial_dims=3, val_fraction=0.0, options={"test_fraction": 0.0}))
    assert data.class_names == ["background", *TARGET_STRUCTURES]
    a, b = (case.label for case in data.train)
    for label in (a, b):
        assert set(np.unique(label).tolist()) == {0, 1, 2}
    assert (a != b).any()  # simulated variability: the anatomy moves between subjects


@pytest.mark.slow
def test_the_study_grid_expands(tmp_path):
    from medxfer.sweep.grid import expand_grid, load_sweep

    grid = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "study3d" / "sweep.yaml").read_text())
    path = tmp_path / "configs" / "study3d" / "sweep.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(grid))
    plan = expand_grid(load_sweep(path), tmp_path / "out")
    assert not plan.invalid
    runs = plan.runs
    strategies = sorted({(r.config.train.strategy, r.config.data.train_images) for r in runs if r.config.data.root.name == "target"})
    assert strategies == sorted((s, n) for s in ("scratch", "full", "frozen_encoder", "gradual") for n in (2, 4, 8))
    second = [r for r in runs if r.config.data.root.name == "source_t2like"]
    assert len(second) == 1 and second[0].config.evaluation.source_test is not None


@pytest.mark.slow
def test_the_study_runs_end_to_end_scaled_down(tmp_path):
    """configs/study3d/sweep.yaml with every size cut down: pretraining, the four arms, the second domain with
    its forgetting baseline, the report."""
    from medxfer.records import iter_records
    from medxfer.report import write_report
    from medxfer.sweep.runner import run_sweep

    data = tmp_path / "study3d_data"
    write_subjects(data / "source", "source", 6)
    write_subjects(data / "target", "target", 8)
    write_subjects(data / "source_t2like", "source_t2like", 4)
    grid = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "study3d" / "sweep.yaml").read_text())
    grid["pretraining"][0]["schedule"]["lengths"] = [0, 6]
    grid["pretraining"][0]["model"]["width"] = grid["base"]["model"]["width"] = 4
    grid["base"]["pretrained"]["length"] = 6
    grid["base"]["train"].update({"max_steps": 4, "val_every_n_steps": 2})
    grid["axes"]["train_images"] = [2, 4]
    grid["include"][1]["train.unfreeze_after_steps"] = 2
    grid["include"][2]["train_images"] = 2
    path = tmp_path / "configs" / "study3d" / "sweep.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(grid))
    summary = run_sweep(path, tmp_path / "out")
    assert not summary.failed
    records = list(iter_records(tmp_path / "out"))
    assert sorted({r["strategy"] for r in records}) == ["frozen_encoder", "full", "gradual", "scratch"]
    second = [r for r in records if "source" in r["metrics"]]
    assert len(second) == 1 and second[0]["pretraining"]["load"] == "full"
    source = second[0]["metrics"]["source"]
    assert source["annotation"]["partially_annotated_images"] == source["n_images"]  # sparse source test split
    assert (write_report(tmp_path / "out")).is_file()
