"""Colin27/AAL slices (the demo's target): interleaved split with gaps, labels, the stated T2-like transform."""

import numpy as np
import pytest

from medxfer.config import DataConfig
from medxfer.data import load_data
from medxfer.data import colin27
from medxfer.errors import DataError

installed = pytest.mark.skipif(
    not (colin27.TEMPLATES / colin27.IMAGE_FILE).is_file(),
    reason="needs the Debian package mricron-data (make test installs it when run as root)")


def test_split_interleaves_held_out_slices_with_a_gap_around_each():
    roles = {z: colin27.split_of_slice(z) for z in range(0, 181)}
    train = [z for z, r in roles.items() if r == "train"]
    held_out = [z for z, r in roles.items() if r in ("val", "test")]
    test = [z for z, r in roles.items() if r == "test"]
    assert (len(train), sum(r == "val" for r in roles.values()), len(test)) == (20, 3, 6)
    assert min(abs(z - t) for z in held_out for t in train) == 2  # never a neighbour (1 mm) of a training slice
    assert min(train) < min(held_out) and max(held_out) < max(train)  # no held-out slice asks for extrapolation
    for z in test:  # a training slice on each side, within one period
        assert any(z - 5 < t < z for t in train) and any(z < t < z + 5 for t in train)
    assert all(r is None for z, r in roles.items() if not colin27.Z_RANGE[0] <= z < colin27.Z_RANGE[1])


def test_t2like_inverts_contrast_inside_the_head_and_keeps_the_background_dark():
    rng = np.random.default_rng(0)
    t1 = np.zeros((40, 40, 12), dtype=np.float32)
    t1[8:32, 8:32] = rng.uniform(20, 120, size=(24, 24, 12))
    out = colin27.t2like(t1)
    assert out.shape == t1.shape and out.dtype == np.float32
    head = t1 > 0
    assert np.corrcoef(t1[head], out[head])[0, 1] < -0.8  # bright in T1 -> dark in T2-like
    assert out[~head].mean() < 0.05 * out[head].mean()
    np.testing.assert_array_equal(out, colin27.t2like(t1))  # deterministic


def test_region_names_file_is_parsed_and_bad_lines_name_the_file(tmp_path):
    good = tmp_path / "names.txt"
    good.write_text("71 Caudate_L 7001\n72 Caudate_R 7002\n\n")
    assert colin27.read_region_names(good) == {"Caudate_L": 71, "Caudate_R": 72}
    bad = tmp_path / "bad.txt"
    bad.write_text("71 Caudate_L 7001\nCaudate_R\n")
    with pytest.raises(DataError, match=r"bad.txt: line 2"):
        colin27.read_region_names(bad)


def test_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(DataError, match=r"ch2.nii.gz: .*mricron-data"):
        colin27.load_colin27({"domain": "t1"}, root=tmp_path)
    with pytest.raises(DataError, match="domain must be one of"):
        colin27.load_colin27({"domain": "t3"}, root=tmp_path)
    with pytest.raises(DataError, match="unknown option"):
        colin27.load_colin27({"domain": "t1", "slices": 3}, root=tmp_path)


@installed
def test_real_slices_hold_the_three_structures_in_both_domains():
    t1 = load_data(DataConfig(name="colin27", options={"domain": "t1"}))
    t2 = load_data(DataConfig(name="colin27", options={"domain": "t2like"}))
    assert (len(t1.train), len(t1.val), len(t1.test)) == (20, 3, 6)
    assert t1.class_names == ["background", "caudate", "putamen", "thalamus"] and t1.n_classes == 4
    for a, b in zip(t1.train + t1.test, t2.train + t2.test):
        assert a.image.shape == (1, colin27.SIZE, colin27.SIZE)
        np.testing.assert_array_equal(a.label, b.label)  # same anatomy, same labels
        assert a.meta["z"] == b.meta["z"] and a.case_id != b.case_id
    test_labels = np.stack([c.label for c in t1.test])
    assert set(np.unique(test_labels)) == {0, 1, 2, 3}
    # absent classes are tested and validated: empty test slices, and validation slices missing a structure
    assert sum(not (c.label > 0).any() for c in t1.test) == 2
    assert all((c.label > 0).any() for c in t1.val) and any(set(np.unique(c.label)) != {0, 1, 2, 3} for c in t1.val)
    assert set(np.unique(np.stack([c.label for c in t1.val]))) == {0, 1, 2, 3}
    # the three structures are each a few per cent of the crop, not empty and not everything
    fractions = np.bincount(np.stack([c.label for c in t1.train]).ravel(), minlength=4) / test_labels[0].size / 20
    assert all(0.01 < f < 0.15 for f in fractions[1:])
    # the T2-like domain reverses the contrast between the structures (grey matter) and the background
    inside = lambda case: case.image[0][case.label > 0].mean() / case.image[0][case.label == 0].mean()  # noqa: E731
    assert inside(t1.test[3]) < 1.0 < inside(t2.test[3]) or inside(t1.test[3]) > 1.0 > inside(t2.test[3])


def test_axial_slices_refuse_a_slice_outside_the_volume_and_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"ch2.nii.gz: .*mricron-data"):
        colin27.axial_slices({"amygdala": ("Amygdala_L", "Amygdala_R")}, [50], root=tmp_path)


@installed
def test_axial_slices_label_other_structures_with_the_demo_crop():
    """The loss benchmark's amygdala: one class from two AAL regions, present on a few slices only."""
    cases = colin27.axial_slices({"amygdala": ("Amygdala_L", "Amygdala_R")}, [30, 50, 56, 90])
    assert [c.meta["z"] for c in cases] == [30, 50, 56, 90]
    assert all(c.image.shape == (1, colin27.SIZE, colin27.SIZE) and c.label.dtype == np.int64 for c in cases)
    assert [bool((c.label == 1).any()) for c in cases] == [False, True, True, False]
    assert set(np.unique(np.stack([c.label for c in cases]))) == {0, 1}
    assert 0.005 < np.mean(cases[2].label == 1) < 0.05  # a small structure, both sides
    left, right = np.nonzero(cases[2].label[:, : colin27.SIZE // 2])[1], np.nonzero(cases[2].label[:, colin27.SIZE // 2:])[1]
    assert len(left) and len(right)
    with pytest.raises(DataError, match="outside 0..180"):
        colin27.axial_slices({"amygdala": ("Amygdala_L",)}, [181])
    with pytest.raises(DataError, match=r"aal.nii.txt: region 'Amygdala_X' not listed"):
        colin27.axial_slices({"amygdala": ("Amygdala_X",)}, [50])
