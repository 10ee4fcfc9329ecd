"""The dataset loaders read miniature copies of each distributed layout, and report each defect as a
one-line DataError naming the offending file."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medxfer.config import DataConfig
from medxfer.data import load_data
from medxfer.data.base import IGNORE_INDEX
from medxfer.data.check import check_dataset, check_report_lines
from medxfer.errors import DataError

RNG = np.random.default_rng(0)


def save_nifti(path: Path, data: np.ndarray, zooms) -> None:
    img = nib.Nifti1Image(data, np.diag(list(zooms[:3]) + [1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))


def truncate(path: Path) -> None:
    """Cut the end off, keeping the header: the data part is what is damaged."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - max(16, len(raw) // 5)])


# ---------------------------------------------------------------------------------------- ACDC

ACDC_SHAPE = (8, 6, 3)  # NIfTI (i, j, k)
ACDC_ZOOMS = (1.5, 1.25, 10.0)


def make_acdc(root: Path, train=("patient001", "patient002", "patient003", "patient004"), test=("patient101",)):
    volumes = {}
    for split, patients in (("training", train), ("testing", test)):
        for n, patient in enumerate(patients):
            folder = root / split / patient
            folder.mkdir(parents=True)
            es = 5 + n
            (folder / "Info.cfg").write_text(f"ED: 1\nES: {es}\nGroup: DCM\nHeight: 180.0\nNbFrame: 20\nWeight: 80.0\n")
            (folder / f"{patient}_4d.nii.gz").write_bytes(b"not a nifti: must be ignored")
            for frame in (1, es):
                image = RNG.normal(size=ACDC_SHAPE).astype(np.float32)
                label = RNG.integers(0, 4, size=ACDC_SHAPE).astype(np.uint8)
                stem = f"{patient}_frame{frame:02d}"
                save_nifti(folder / f"{stem}.nii.gz", image, ACDC_ZOOMS)
                save_nifti(folder / f"{stem}_gt.nii.gz", label, ACDC_ZOOMS)
                volumes[stem] = (image, label)
    return volumes


def test_acdc_2d_slices_keep_in_plane_spacing_and_split_by_patient(tmp_path):
    volumes = make_acdc(tmp_path)
    data = load_data(DataConfig(name="acdc", root=tmp_path, spatial_dims=2))
    assert (data.n_classes, data.class_names) == (4, ["background", "RV", "myocardium", "LV"])
    pool = data.train + data.val
    assert len(pool) == 4 * 2 * 3 and len(data.test) == 1 * 2 * 3  # patients x (ED, ES) x slices
    case = next(c for c in pool if c.case_id == "patient002_ES_z001")
    image, label = volumes["patient002_frame06"]
    assert case.image.shape == (1, 6, 8) and case.spacing == pytest.approx((1.25, 1.5))
    np.testing.assert_allclose(case.image[0], image[:, :, 1].T)  # (H, W) = (j, i)
    np.testing.assert_array_equal(case.label, label[:, :, 1].T)
    assert case.label.dtype == np.int64 and case.meta["pathology"] == "DCM"
    train_patients = {c.meta["patient"] for c in data.train}
    val_patients = {c.meta["patient"] for c in data.val}
    assert val_patients and not (train_patients & val_patients)
    assert sum(c.meta["patient"] in val_patients for c in pool) == 6 * len(val_patients)


def test_acdc_2d_resize_scales_spacing(tmp_path):
    make_acdc(tmp_path, train=("patient001", "patient002"))
    data = load_data(DataConfig(name="acdc", root=tmp_path, resize=[3, 4]))
    assert all(c.image.shape == (1, 3, 4) and c.label.shape == (3, 4) for c in data.train + data.test)
    assert data.train[0].spacing == pytest.approx((2.5, 3.0))  # 6 -> 3 rows, 8 -> 4 columns


def test_acdc_3d_frames_reorder_axes_and_spacing(tmp_path):
    volumes = make_acdc(tmp_path)
    data = load_data(DataConfig(name="acdc", root=tmp_path, spatial_dims=3, options={"frames": ["ES"]}, val_fraction=0.0))
    assert len(data.train) == 4 and not data.val and len(data.test) == 1
    case = next(c for c in data.train if c.case_id == "patient001_ES")
    assert case.image.shape == (1, 3, 6, 8) and case.spacing == pytest.approx((10.0, 1.25, 1.5))
    np.testing.assert_allclose(case.image[0], volumes["patient001_frame05"][0].transpose(2, 1, 0))


@pytest.mark.parametrize("defect", ["label_value", "missing_gt", "truncated", "shape", "nan"])
def test_acdc_defects_name_the_file(tmp_path, defect):
    make_acdc(tmp_path, train=("patient001", "patient002"))
    folder = tmp_path / "training" / "patient002"
    gt, img = folder / "patient002_frame01_gt.nii.gz", folder / "patient002_frame01.nii.gz"
    if defect == "label_value":
        save_nifti(gt, np.full(ACDC_SHAPE, 5, np.uint8), ACDC_ZOOMS)
        bad = gt.name
    elif defect == "missing_gt":
        gt.unlink()
        bad = gt.name
    elif defect == "truncated":
        truncate(img)
        bad = img.name
    elif defect == "shape":
        save_nifti(gt, np.zeros((8, 6, 4), np.uint8), ACDC_ZOOMS)
        bad = gt.name
    else:
        data = np.zeros(ACDC_SHAPE, np.float32)
        data[1, 2, 0] = np.nan
        save_nifti(img, data, ACDC_ZOOMS)
        bad = img.name
    with pytest.raises(DataError, match=bad) as info:
        load_data(DataConfig(name="acdc", root=tmp_path))
    assert "\n" not in str(info.value)


def test_acdc_missing_folder(tmp_path):
    make_acdc(tmp_path)
    (tmp_path / "testing").rename(tmp_path / "tests")
    with pytest.raises(DataError, match="testing"):
        load_data(DataConfig(name="acdc", root=tmp_path))


# ---------------------------------------------------------------------------------------- COVID-QU


def make_covidqu(root: Path, task="Inf_segm", mask_name="inf_masks.npy", category="COVID-19", n=(5, 2), scale=255):
    for split, count in zip(("train_and_val", "test"), n):
        folder = root / task / "data_arrays" / category / split
        folder.mkdir(parents=True)
        np.save(folder / "imgs.npy", RNG.random((count, 8, 8)).astype(np.float32))
        np.save(folder / mask_name, (RNG.random((count, 8, 8)) > 0.5).astype(np.uint8) * scale)
    return root / task / "data_arrays" / category


def test_covidqu_infection_masks_0_255_become_binary(tmp_path):
    arrays = make_covidqu(tmp_path)
    data = load_data(DataConfig(name="covidqu", root=tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (4, 1, 2)
    assert data.class_names == ["background", "infection"] and data.in_channels == 1
    masks = np.load(arrays / "train_and_val" / "inf_masks.npy")
    case = next(c for c in data.train + data.val if c.case_id.endswith("00003"))
    assert case.image.shape == (1, 8, 8) and case.image.dtype == np.float32
    np.testing.assert_array_equal(case.label, masks[3] // 255)
    assert set(data.meta["mask_files"].values()) == {"0/255"}


def test_covidqu_lung_masks_and_category(tmp_path):
    make_covidqu(tmp_path, task="Lung_segm", mask_name="lung_masks.npy", category="Normal", scale=1)
    data = load_data(DataConfig(name="covidqu", root=tmp_path, options={"masks": "lung", "category": "Normal"}))
    assert data.class_names == ["background", "lung"] and len(data.test) == 2
    assert any(p.endswith("lung_masks.npy") for p in data.meta["mask_files"])
    with pytest.raises(DataError, match="COVID-19"):  # the default category is absent
        load_data(DataConfig(name="covidqu", root=tmp_path, options={"masks": "lung"}))


def test_covidqu_official_train_val_folders(tmp_path):
    arrays = make_covidqu(tmp_path)
    (arrays / "train_and_val").rename(arrays / "train")
    (arrays / "val").mkdir()
    np.save(arrays / "val" / "imgs.npy", np.zeros((3, 8, 8), np.uint8))
    np.save(arrays / "val" / "inf_masks.npy", np.ones((3, 8, 8), np.uint8))
    data = load_data(DataConfig(name="covidqu", root=tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (5, 3, 2)
    assert all(c.label.min() == 1 for c in data.val)
    pooled = load_data(DataConfig(name="covidqu", root=tmp_path, val_fraction=0.25))
    assert (len(pooled.train), len(pooled.val)) == (6, 2)  # a fraction pools train + val


@pytest.mark.parametrize("defect", ["values", "count", "pickled", "truncated", "missing"])
def test_covidqu_defects_name_the_file(tmp_path, defect):
    arrays = make_covidqu(tmp_path) / "test"
    if defect == "values":
        np.save(arrays / "inf_masks.npy", np.full((2, 8, 8), 3, np.uint8))
        bad = "inf_masks.npy"
    elif defect == "count":
        np.save(arrays / "inf_masks.npy", np.zeros((3, 8, 8), np.uint8))
        bad = "inf_masks.npy"
    elif defect == "pickled":
        np.save(arrays / "imgs.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        bad = "imgs.npy"
    elif defect == "truncated":
        truncate(arrays / "imgs.npy")
        bad = "imgs.npy"
    else:
        (arrays / "inf_masks.npy").unlink()
        bad = "test"
    with pytest.raises(DataError, match=bad):
        load_data(DataConfig(name="covidqu", root=tmp_path))


# ---------------------------------------------------------------------------------------- IDRiD

IDRID_HW = (12, 16)
SEG = Path("Segmentation") / "A. Segmentation"
IDRID_FOLDERS = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates",
                 "SE": "4. Soft Exudates", "OD": "5. Optic Disc"}


def make_idrid(root: Path, n_train=3, n_test=2):
    """Masks: EX as RGB tif (lesion in red), MA as 0/255 grayscale tif, no SE mask for image 02."""
    masks = {}
    for split, names in (("a. Training Set", range(1, n_train + 1)), ("b. Testing Set", range(n_train + 1, n_train + n_test + 1))):
        images = root / SEG / "1. Original Images" / split
        images.mkdir(parents=True)
        truth = root / SEG / "2. All Segmentation Groundtruths" / split
        for folder in IDRID_FOLDERS.values():
            (truth / folder).mkdir(parents=True)
        for i in names:
            stem = f"IDRiD_{i:02d}"
            Image.fromarray(RNG.integers(0, 255, IDRID_HW + (3,), dtype=np.uint8)).save(images / f"{stem}.jpg")
            ex = np.zeros(IDRID_HW, bool)
            ex[2:6, 3:9] = True
            ma = np.zeros(IDRID_HW, bool)
            ma[4:8, 7:10] = True  # overlaps EX at [4:6, 7:9]
            rgb = np.zeros(IDRID_HW + (3,), np.uint8)
            rgb[..., 0] = ex * 255
            Image.fromarray(rgb).save(truth / IDRID_FOLDERS["EX"] / f"{stem}_EX.tif")
            Image.fromarray(ma.astype(np.uint8) * 255).save(truth / IDRID_FOLDERS["MA"] / f"{stem}_MA.tif")
            if i != 2:
                se = np.zeros(IDRID_HW, bool)
                se[9:11, 1:4] = True
                Image.fromarray(se.astype(np.uint8)).save(truth / IDRID_FOLDERS["SE"] / f"{stem}_SE.tif")
            masks[stem] = {"EX": ex, "MA": ma}
    return masks


def test_idrid_binary_task_reads_rgb_masks(tmp_path):
    masks = make_idrid(tmp_path)
    data = load_data(DataConfig(name="idrid", root=tmp_path))  # default lesions: EX
    assert (len(data.train) + len(data.val), len(data.test)) == (3, 2)
    assert data.n_classes == 2 and data.in_channels == 3
    case = next(c for c in data.train + data.val if c.case_id == "IDRiD_01")
    assert case.image.shape == (3,) + IDRID_HW
    np.testing.assert_array_equal(case.label, masks["IDRiD_01"]["EX"].astype(np.int64))


def test_idrid_multiclass_precedence_and_missing_mask(tmp_path):
    masks = make_idrid(tmp_path)
    data = load_data(DataConfig(name="idrid", root=tmp_path, options={"lesions": ["EX", "MA", "SE"]}, val_fraction=0.0))
    assert data.class_names == ["background", "hard_exudates", "microaneurysms", "soft_exudates"]
    by_id = {c.case_id: c for c in data.train}
    label = by_id["IDRiD_01"].label
    ex, ma = masks["IDRiD_01"]["EX"], masks["IDRiD_01"]["MA"]
    assert (label[ma] == 2).all()  # MA wins where it overlaps EX
    assert (label[ex & ~ma] == 1).all()
    assert by_id["IDRiD_01"].meta["overlap_pixels"] == int((ex & ma).sum())
    assert (label == 3).sum() == 6 and (by_id["IDRiD_02"].label == 3).sum() == 0  # no SE file = no lesion


def test_idrid_resize_bilinear_images_nearest_masks(tmp_path):
    make_idrid(tmp_path)
    data = load_data(DataConfig(name="idrid", root=tmp_path, resize=[6, 8], options={"lesions": ["EX", "MA"]}))
    for case in data.train + data.test:
        assert case.image.shape == (3, 6, 8) and case.label.shape == (6, 8)
        assert set(np.unique(case.label)) <= {0, 1, 2} and case.label.dtype == np.int64


@pytest.mark.parametrize("defect", ["mask_shape", "truncated_jpg"])
def test_idrid_defects_name_the_file(tmp_path, defect):
    make_idrid(tmp_path)
    truth = tmp_path / SEG / "2. All Segmentation Groundtruths" / "a. Training Set"
    if defect == "mask_shape":
        bad = truth / IDRID_FOLDERS["EX"] / "IDRiD_02_EX.tif"
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad)
    else:
        bad = tmp_path / SEG / "1. Original Images" / "a. Training Set" / "IDRiD_03.jpg"
        truncate(bad)
    with pytest.raises(DataError, match=bad.name):
        load_data(DataConfig(name="idrid", root=tmp_path))


# ---------------------------------------------------------------------------------------- folders


def make_folders(root: Path, n=5, rgb=False, scale=255, test=True):
    for sub, count in (("", n), ("test", 2 if test else 0)):
        if not count:
            continue
        (root / sub / "images").mkdir(parents=True)
        (root / sub / "masks").mkdir(parents=True)
        for i in range(count):
            shape = (10, 12, 3) if rgb else (10, 12)
            Image.fromarray(RNG.integers(0, 255, shape, dtype=np.uint8)).save(root / sub / "images" / f"img{i}.png")
            mask = np.zeros((10, 12), np.uint8)
            mask[2:5, 3:7] = scale
            Image.fromarray(mask).save(root / sub / "masks" / f"img{i}.png")


def test_folders_binary_0_255_grayscale_and_test_folder(tmp_path):
    make_folders(tmp_path)
    data = load_data(DataConfig(name="folders", root=tmp_path))
    assert (len(data.train), len(data.val), len(data.test)) == (4, 1, 2)
    assert data.n_classes == 2 and data.in_channels == 1
    case = data.train[0]
    assert case.image.shape == (1, 10, 12) and case.label.sum() == 12 and case.label.max() == 1


def test_folders_rgb_npy_and_inferred_classes(tmp_path):
    make_folders(tmp_path, rgb=True, scale=3, test=False)
    np.save(tmp_path / "images" / "extra.npy", RNG.random((10, 12, 3)).astype(np.float32))
    np.save(tmp_path / "masks" / "extra.npy", np.full((10, 12), 1, np.int64))
    data = load_data(DataConfig(name="folders", root=tmp_path, options={"test_fraction": 0.5}))
    assert data.in_channels == 3 and data.n_classes == 4  # max label 3 -> classes 0..3
    assert len(data.test) == 3 and len(data.train) + len(data.val) == 3
    assert all(c.image.shape == (3, 10, 12) for c in data.train + data.val + data.test)


def test_folders_lossy_jpg_mask_is_refused(tmp_path):
    make_folders(tmp_path, scale=1, test=False)
    (tmp_path / "masks" / "img1.png").unlink()
    Image.fromarray(RNG.integers(0, 255, (10, 12), dtype=np.uint8)).save(tmp_path / "masks" / "img1.jpg")
    with pytest.raises(DataError, match="img1.jpg.*lossless"):
        load_data(DataConfig(name="folders", root=tmp_path))


@pytest.mark.parametrize("defect", ["no_mask", "label_value", "shape"])
def test_folders_defects_name_the_file(tmp_path, defect):
    make_folders(tmp_path, scale=1)
    options = {}
    if defect == "no_mask":
        (tmp_path / "masks" / "img3.png").unlink()
        bad = "img3.png"
    elif defect == "label_value":
        Image.fromarray(np.full((10, 12), 7, np.uint8)).save(tmp_path / "masks" / "img2.png")
        options, bad = {"n_classes": 2}, "masks/img2.png"
    else:
        Image.fromarray(np.zeros((9, 12), np.uint8)).save(tmp_path / "test" / "masks" / "img1.png")
        bad = "test/masks/img1.png"
    with pytest.raises(DataError, match=bad):
        load_data(DataConfig(name="folders", root=tmp_path, options=options))


# ---------------------------------------------------------------------------------------- MSD / nnU-Net

MSD_ZOOMS = (0.8, 0.7, 2.5)


def make_msd(root: Path, n=5, v2=False, channels=1, annotated=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    volumes = {}
    for i in range(n):
        case = f"case_{i:03d}"
        shape = (6, 5, 4 + (i % 2))
        label = RNG.integers(0, 3, size=shape).astype(np.uint8)
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", label, MSD_ZOOMS)
        images = [RNG.normal(size=shape).astype(np.float32) for _ in range(channels)]
        if v2:
            for c, image in enumerate(images):
                save_nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", image, MSD_ZOOMS)
        else:
            data = images[0] if channels == 1 else np.stack(images, axis=-1)
            save_nifti(root / "imagesTr" / f"{case}.nii.gz", data, MSD_ZOOMS + ((1.0,) if channels > 1 else ()))
        volumes[case] = (images, label)
    (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"macOS resource fork")
    save_nifti(root / "imagesTs" / ("case_900_0000.nii.gz" if v2 else "case_900.nii.gz"),
               np.zeros((6, 5, 4), np.float32), MSD_ZOOMS)
    if v2:
        meta = {"channel_names": {str(c): f"MR{c}" for c in range(channels)},
                "labels": {"background": 0, "organ": 1, "tumour": 2, "ignore": 3},
                "numTraining": n, "file_ending": ".nii.gz"}
    else:
        meta = {"name": "Task99_Tiny", "modality": {str(c): f"MR{c}" for c in range(channels)},
                "labels": {"0": "background", "1": "organ", "2": "tumour"}, "numTraining": n,
                "training": [{"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
                             for i in range(n)],
                "test": ["./imagesTs/case_900.nii.gz"]}
    if annotated is not None:
        meta["annotated_classes"] = annotated
    (root / "dataset.json").write_text(json.dumps(meta))
    return volumes


def test_msd_3d_test_split_spacing_and_multimodal(tmp_path):
    volumes = make_msd(tmp_path, channels=2)
    data = load_data(DataConfig(name="msd", root=tmp_path, spatial_dims=3))
    assert data.class_names == ["background", "organ", "tumour"] and data.in_channels == 2
    assert (len(data.train), len(data.val), len(data.test)) == (3, 1, 1)  # 0.2 test, then 0.2 val
    case = next(c for c in data.train + data.val + data.test if c.case_id == "case_001")
    images, label = volumes["case_001"]
    assert case.image.shape == (2, 5, 5, 6) and case.spacing == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_allclose(case.image[1], images[1].transpose(2, 1, 0))
    np.testing.assert_array_equal(case.label, label.transpose(2, 1, 0))
    assert len(data.meta["unlabelled_images"]) == 1


def test_msd_2d_slices_keep_cases_in_one_split(tmp_path):
    make_msd(tmp_path, n=6)
    data = load_data(DataConfig(name="msd", root=tmp_path, spatial_dims=2, options={"test_fraction": 0.34}))
    groups = [{c.meta["group"] for c in split} for split in (data.train, data.val, data.test)]
    assert all(groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(len(g) for g in groups) == 6 and len(groups[2]) == 2
    assert all(c.image.shape == (1, 5, 6) and c.spacing == pytest.approx((0.7, 0.8)) for c in data.train)
    assert sum(len(s) for s in (data.train, data.val, data.test)) == 3 * 4 + 3 * 5  # slices along D


def test_nnunet_v2_channels_ignore_label_and_annotated_csv(tmp_path):
    volumes = make_msd(tmp_path, n=4, v2=True, channels=2)
    label = volumes["case_002"][1].copy()
    label[0, 0, 0] = 3  # the "ignore" label
    save_nifti(tmp_path / "labelsTr" / "case_002.nii.gz", label, MSD_ZOOMS)
    (tmp_path / "sparse.csv").write_text("case_id,classes\ncase_000,1;2\n")
    data = load_data(DataConfig(name="msd", root=tmp_path, spatial_dims=3, val_fraction=0.0,
                                options={"test_fraction": 0.0, "annotated_csv": "sparse.csv"}))
    assert data.n_classes == 3 and data.in_channels == 2 and len(data.train) == 4
    by_id = {c.case_id: c for c in data.train}
    assert by_id["case_002"].label[0, 0, 0] == IGNORE_INDEX
    assert by_id["case_000"].annotated == (1, 2) and by_id["case_001"].annotated is None


def test_msd_annotated_classes_are_validated(tmp_path):
    make_msd(tmp_path, n=3, annotated={"case_000": [1, 7]})
    with pytest.raises(DataError, match="dataset.json.*case_000"):
        load_data(DataConfig(name="msd", root=tmp_path, spatial_dims=3))
    (tmp_path / "bad.csv").write_text("case_id,classes\nnope,1\n")
    with pytest.raises(DataError, match="bad.csv.*nope"):
        load_data(DataConfig(name="msd", root=tmp_path, options={"annotated_csv": "bad.csv"}))


def test_msd_sparse_case_must_not_contain_unannotated_class(tmp_path):
    volumes = make_msd(tmp_path, n=3, annotated={"case_001": [1]})
    assert (volumes["case_001"][1] == 2).any()
    with pytest.raises(DataError, match=r"case_001\.nii\.gz.*\[2\]"):
        load_data(DataConfig(name="msd", root=tmp_path, spatial_dims=3))


@pytest.mark.parametrize("defect", ["truncated", "label_value", "missing_channel", "json"])
def test_msd_defects_name_the_file(tmp_path, defect):
    make_msd(tmp_path, n=3, v2=(defect == "missing_channel"), channels=2 if defect == "missing_channel" else 1)
    if defect == "truncated":
        truncate(tmp_path / "imagesTr" / "case_001.nii.gz")
        bad = "case_001.nii.gz"
    elif defect == "label_value":
        save_nifti(tmp_path / "labelsTr" / "case_002.nii.gz", np.full((6, 5, 4), 9, np.uint8), MSD_ZOOMS)
        bad = "labelsTr/case_002.nii.gz"
    elif defect == "missing_channel":
        (tmp_path / "imagesTr" / "case_001_0001.nii.gz").unlink()
        bad = "case_001_0001.nii.gz"
    else:
        (tmp_path / "dataset.json").write_text("{not json")
        bad = "dataset.json"
    with pytest.raises(DataError, match=bad):
        load_data(DataConfig(name="msd", root=tmp_path, spatial_dims=3))


def test_msd_unlabelled_images_for_prediction(tmp_path):
    from medxfer.data.msd import load_unlabelled

    make_msd(tmp_path, n=2, v2=True)
    cases = load_unlabelled(DataConfig(name="msd", root=tmp_path, spatial_dims=3))
    assert [c.case_id for c in cases] == ["case_900"] and cases[0].label is None


# ---------------------------------------------------------------------------------------- check


def test_check_dataset_summarises_counts_classes_and_intensity(tmp_path):
    make_folders(tmp_path)
    report = check_dataset(DataConfig(name="folders", root=tmp_path))
    train = report["splits"]["train"]
    assert (train["cases"], report["splits"]["test"]["cases"]) == (4, 2)
    assert train["shapes"] == {"unique": [[10, 12]]}
    assert train["classes"]["class1"] == {"voxels": 4 * 12, "cases": 4}
    assert train["classes"]["background"]["voxels"] == 4 * (120 - 12)
    pixels = np.concatenate([np.asarray(Image.open(tmp_path / "images" / f"img{i}.png"), float).ravel() for i in range(5)])
    stats = train["intensity"][0]
    assert pixels.min() <= stats["min"] <= stats["mean"] <= stats["max"] <= pixels.max()
    json.dumps(report)  # JSON-able
    assert any("4 cases" in line for line in check_report_lines(report))


def test_check_dataset_reports_nan_pixels_and_empty_dataset(tmp_path):
    make_folders(tmp_path, test=False)
    image = np.ones((10, 12), np.float32)
    image[3, 3] = np.inf
    np.save(tmp_path / "images" / "bad.npy", image)
    np.save(tmp_path / "masks" / "bad.npy", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match="bad.npy.*NaN or inf"):
        check_dataset(DataConfig(name="folders", root=tmp_path))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        check_dataset(DataConfig(name="folders", root=empty))


def test_check_dataset_on_acdc_counts_patients(tmp_path):
    make_acdc(tmp_path)
    report = check_dataset(DataConfig(name="acdc", root=tmp_path, spatial_dims=3))
    splits = report["splits"]
    assert splits["train"]["groups"] + splits["val"]["groups"] == 4
    assert splits["train"]["spacing"]["min"] == splits["train"]["spacing"]["max"] == pytest.approx([10.0, 1.25, 1.5])
    assert sum(v["voxels"] for v in splits["test"]["classes"].values()) == 2 * 8 * 6 * 3
