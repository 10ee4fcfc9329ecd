"""The multi-subject 3D stand-in: real Colin27/AAL anatomy, simulated subjects, nnU-Net v2 layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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


# The study grid (configs/study3d/sweep.yaml, written from medxfer.study3d.study_grid) and its end-to-end run:
# tests/test_study3d.py.
