"""Data a new user brings: non-square images, inconsistent mask encodings, every mask folder checked."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.data import load_data
from medxfer.data.transforms import training_augmentation
from medxfer.errors import DataError

RNG = np.random.default_rng(0)


def make_tiles(root: Path, n: int = 6, shape=(16, 32), mask_values=None) -> None:
    """``folders`` layout of ``n`` grey tiles with a square of class 1 (mask_values[i] overrides tile i's mask)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(RNG.integers(0, 255, shape, dtype=np.uint8)).save(root / "images" / f"t{i}.png")
        mask = np.zeros(shape, np.uint8)
        mask[2:8, 4:12] = 1
        if mask_values and i in mask_values:
            mask = mask_values[i](mask)
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")


# ------------------------------------------------------------------------------- non-square images (#18.13)
def test_augmentation_keeps_the_shape_of_non_square_images():
    transform = training_augmentation(2, None, 0.5, augment=True)
    transform.set_random_state(seed=0)
    item = {"image": np.zeros((1, 16, 32), np.float32), "label": np.zeros((1, 16, 32), np.float32)}
    shapes = {tuple(np.asarray(transform(dict(item))["image"]).shape) for _ in range(30)}
    assert shapes == {(1, 16, 32)}
    square = {"image": np.arange(256, dtype=np.float32).reshape(1, 16, 16), "label": np.zeros((1, 16, 16), np.float32)}
    outputs = [np.asarray(transform(dict(square))["image"]) for _ in range(30)]
    # square images are still rotated by quarter turns: some output is a rotation, not a flip of the input
    rotated = [np.rot90(square["image"][0], k) for k in (1, 3)]
    assert any(any(np.allclose(o[0] - o[0].mean(), r - r.mean(), atol=1.0) for r in rotated) for o in outputs)


def test_non_square_tiles_train_with_augmentation_and_no_patch_size(tmp_path):
    from medxfer.finetune import run_finetune

    make_tiles(tmp_path / "tiles", n=6, shape=(16, 32))
    config = RunConfig(
        data=DataConfig(name="folders", root=tmp_path / "tiles", augment=True, patch_size=None),
        model=ModelConfig(preset="unet", width=4, depth=3),
        train=TrainConfig(strategy="scratch", max_steps=3, batch_size=3, checkpoint_every_s=None),
    )
    run = run_finetune(config, tmp_path / "out")
    assert run.record["status"] == "done" and run.record["steps_trained"] == 3


# ------------------------------------------------------------------------------- mask encodings (#18.2)
def _to_255(mask):
    return mask * 255


def _stray(mask):
    mask = mask.copy()
    mask[10:12, 20:22] = 7
    return mask


@pytest.mark.parametrize("case", ["stray_among_0_255", "one_0_255_among_0_1", "stray_among_0_1"])
def test_inconsistent_mask_encodings_name_the_file(tmp_path, case):
    from medxfer.data.check import check_dataset

    if case == "stray_among_0_255":  # every mask 0/255 but t3 holds {0, 1, 7}
        overrides = {i: _to_255 for i in range(6) if i != 3}
        overrides[3] = _stray
    elif case == "one_0_255_among_0_1":
        overrides = {3: _to_255}
    else:
        overrides = {3: _stray}
    make_tiles(tmp_path, mask_values=overrides)
    config = DataConfig(name="folders", root=tmp_path)
    with pytest.raises(DataError, match=r"masks[/\\]t3\.png: mask value") as error:
        load_data(config)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="t3.png"):
        check_dataset(config)


def test_consistent_encodings_still_load(tmp_path):
    make_tiles(tmp_path / "a", mask_values={i: _to_255 for i in range(6)})
    data = load_data(DataConfig(name="folders", root=tmp_path / "a"))
    assert data.n_classes == 2 and max(int(c.label.max()) for c in data.train) == 1
    # 255 beside class indices in one mask: 255 is the ignore index everywhere, 0/255 masks are "ignore"
    def sparse(mask):
        mask = mask.copy()
        mask[12:, :] = 255
        return mask

    make_tiles(tmp_path / "b", mask_values={0: sparse, 1: _to_255})
    data = load_data(DataConfig(name="folders", root=tmp_path / "b"))
    assert data.n_classes == 2


# ------------------------------------------------------------------------- data check sees every mask (#21.1)
IDRID_TRUTH = Path("A. Segmentation") / "2. All Segmentation Groundtruths"
IDRID_FOLDERS = {"EX": "3. Hard Exudates", "OD": "5. Optic Disc"}


def make_mini_idrid(root: Path, hw=(12, 18)) -> None:
    """Two training and one test image with hard-exudate and optic-disc masks."""
    for split, stems in (("a. Training Set", ("IDRiD_01", "IDRiD_02")), ("b. Testing Set", ("IDRiD_03",))):
        images = root / "A. Segmentation" / "1. Original Images" / split
        images.mkdir(parents=True)
        for stem in stems:
            Image.fromarray(RNG.integers(0, 255, hw + (3,), dtype=np.uint8)).save(images / f"{stem}.jpg")
            for code, folder in IDRID_FOLDERS.items():
                (root / IDRID_TRUTH / split / folder).mkdir(parents=True, exist_ok=True)
                mask = np.zeros(hw, np.uint8)
                mask[2:6, 3:9] = 255
                Image.fromarray(mask).save(root / IDRID_TRUTH / split / folder / f"{stem}_{code}.tif")


def test_data_check_validates_mask_folders_the_config_does_not_use(tmp_path, capsys):
    from medxfer.cli import main

    make_mini_idrid(tmp_path)
    assert main(["data", "check", "idrid", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "also validated" in out and "lesions=['EX', 'OD']" in out
    assert "this config uses ['background', 'hard_exudates']" in out

    bad = tmp_path / IDRID_TRUTH / "a. Training Set" / IDRID_FOLDERS["OD"] / "IDRiD_02_OD.tif"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad)  # wrong shape, in a folder lesions: [EX] never reads
    assert load_data(DataConfig(name="idrid", root=tmp_path)).n_classes == 2  # training would not notice
    assert main(["data", "check", "idrid", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "IDRiD_02_OD.tif" in err and "shape" in err and "\n" not in err


def test_data_check_validates_both_covidqu_mask_sets(tmp_path):
    from medxfer.data.check import check_dataset

    for folder, masks_name in (("Inf_segm", "inf_masks.npy"), ("Lung_segm", "lung_masks.npy")):
        for category in ("COVID-19", "Normal"):
            for split in ("train_and_val", "test"):
                d = tmp_path / folder / "data_arrays" / category / split
                d.mkdir(parents=True)
                np.save(d / "imgs.npy", RNG.random((3, 8, 8)).astype(np.float32))
                np.save(d / masks_name, (RNG.random((3, 8, 8)) > 0.5).astype(np.uint8))
    report = check_dataset(DataConfig(name="covidqu", root=tmp_path))
    assert [(v["options"]["masks"], v["cases"]) for v in report["also_validated"]] == [("infection", 12), ("lung", 12)]
    np.save(tmp_path / "Lung_segm" / "data_arrays" / "Normal" / "test" / "lung_masks.npy",
            np.full((3, 8, 8), 7, np.uint8))
    with pytest.raises(DataError, match=r"Normal[/\\]test[/\\]lung_masks\.npy"):
        check_dataset(DataConfig(name="covidqu", root=tmp_path))


# --------------------------------------------------------------------------------- folders splits (#21.3)
def test_folders_splits_are_the_ones_the_readme_states(tmp_path):
    make_tiles(tmp_path, n=56, shape=(8, 8))
    data = load_data(DataConfig(name="folders", root=tmp_path))
    assert (len(data.test), len(data.val), len(data.train)) == (11, 9, 36)
    data = load_data(DataConfig(name="folders", root=tmp_path, val_fraction=0.0, options={"test_fraction": 0.5}))
    assert (len(data.test), len(data.val), len(data.train)) == (28, 0, 28)


def test_data_check_validates_the_acdc_phase_left_out_of_frames(tmp_path):
    from test_data_layouts import make_acdc, save_nifti  # the miniature ACDC layout

    from medxfer.data.check import check_dataset

    make_acdc(tmp_path)
    assert check_dataset(DataConfig(name="acdc", root=tmp_path, spatial_dims=3))["also_validated"] == []
    es_truth = tmp_path / "training" / "patient002" / "patient002_frame06_gt.nii.gz"  # ES = 5 + n for patient n
    save_nifti(es_truth, np.zeros((3, 3, 3), np.uint8), (1.5, 1.25, 10.0))
    ed_only = DataConfig(name="acdc", root=tmp_path, spatial_dims=3, options={"frames": ["ED"]})
    assert load_data(ed_only).n_classes == 4  # the ED-only load never reads the broken ES file
    with pytest.raises(DataError, match="patient002_frame06"):
        check_dataset(ed_only)
