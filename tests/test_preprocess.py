"""The plan-and-preprocess step (medxfer.data.preprocess) and the cache-backed patch dataset, on a few tiny
synthetic CT volumes at anisotropic spacings; resampling against nibabel / scipy references."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to
from scipy import ndimage

from medxfer.config import DataConfig, PreprocessConfig
from medxfer.data import load_data
from medxfer.data import preprocess as pp
from medxfer.data.patch_dataset import CachedPatchDataset, default_num_workers
from medxfer.data.sampling import EpochSeededSampler
from medxfer.errors import ConfigError

# (i, j, k) voxel sizes as a NIfTI header has them: thick slices along k
ZOOMS = [(0.8, 0.8, 3.0), (1.0, 1.0, 2.5), (0.9, 0.9, 3.5), (0.8, 0.8, 3.0), (1.0, 1.0, 2.5)]


def make_ct_dataset(root: Path, n: int = 5, channel: str = "CT") -> dict:
    """``n`` CT-like volumes (air -1000, a soft-tissue ellipsoid labelled 1 with a denser core labelled 2)."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = {}
    for i in range(n):
        zooms = ZOOMS[i % len(ZOOMS)]
        shape = (22 + i, 20, 7 + i % 2)  # (i, j, k)
        grid = np.stack(np.meshgrid(*[np.arange(s) * z for s, z in zip(shape, zooms)], indexing="ij"))
        centre = np.array([s * z / 2 for s, z in zip(shape, zooms)])[:, None, None, None]
        radius = np.sqrt((((grid - centre) / np.array([6.0, 5.0, 7.0])[:, None, None, None]) ** 2).sum(0))
        label = np.where(radius < 0.5, 2, np.where(radius < 1.0, 1, 0)).astype(np.uint8)
        image = np.where(label > 0, 40.0 + 200.0 * (label == 2), -1000.0) + rng.normal(0, 15, shape)
        affine = np.diag([*zooms, 1.0])
        affine[:3, 3] = [-10.0 * i, 5.0, 2.0]
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"ct_{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"ct_{i}.nii.gz")
        cases[f"ct_{i}"] = (image, label, zooms)
    meta = {"name": "TinyCT", "channel_names": {"0": channel},
            "labels": {"background": 0, "tissue": 1, "core": 2}, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return cases


def config(root: Path, cache: Path, **preprocess) -> DataConfig:
    return DataConfig(name="msd", root=root, spatial_dims=3, val_fraction=0.25,
                      preprocess=PreprocessConfig(cache_dir=cache, **preprocess))


# ------------------------------------------------------------------------------------------- spacing
def test_target_spacing_is_the_median_unless_one_axis_is_anisotropic():
    # isotropic-ish: plain median per axis
    assert pp.target_spacing([[1.0, 0.8, 0.8], [2.0, 0.9, 0.9], [1.5, 1.0, 1.0]],
                             [[100, 200, 200]] * 3) == pytest.approx([1.5, 0.9, 0.9])
    # thick slices (median 5 mm > 3 x 0.8) and few of them (20 * 3 < 256): 10th percentile of the slice axis
    spacings = [[5.0, 0.8, 0.8], [3.0, 0.8, 0.8], [6.0, 0.7, 0.7], [4.0, 0.8, 0.8], [5.0, 0.9, 0.9]]
    shapes = [[20, 256, 256]] * 5
    expected = float(np.percentile([5.0, 3.0, 6.0, 4.0, 5.0], 10))
    assert pp.target_spacing(spacings, shapes) == pytest.approx([expected, 0.8, 0.8])
    # anisotropic spacing but many slices: nnU-Net keeps the median
    assert pp.target_spacing(spacings, [[400, 256, 256]] * 5) == pytest.approx([5.0, 0.8, 0.8])
    assert pp.anisotropic_axis((3.0, 0.8, 0.8)) == 0 and pp.anisotropic_axis((1.0, 0.8, 1.2)) is None


def test_resampling_matches_nibabel_on_the_same_grid():
    rng = np.random.default_rng(1)
    volume = ndimage.gaussian_filter(rng.normal(size=(9, 14, 12)), 1.5).astype(np.float32)  # (D, H, W)
    spacing, target = (3.0, 0.8, 1.1), (1.5, 1.0, 1.0)
    shape = pp.resampled_shape(volume.shape, spacing, target)
    assert shape == (18, 11, 13)
    ours = pp.resample_image(volume[None], shape, separate_axis=None, order=1)[0]
    # nibabel works in the file's (i, j, k) = our axes reversed
    affine = np.diag([*spacing[::-1], 1.0])
    affine[:3, 3] = [4.0, -2.0, 7.0]
    new_affine = pp.resampled_affine(affine, volume.shape[::-1], shape[::-1])
    reference = resample_from_to(nib.Nifti1Image(volume.transpose(2, 1, 0), affine), (shape[::-1], new_affine),
                                 order=1, mode="nearest").get_fdata().transpose(2, 1, 0)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # cubic spline agrees with scipy's zoom under the same (field-of-view) convention
    cubic = pp.resample_image(volume[None], shape)[0]
    np.testing.assert_allclose(cubic, ndimage.zoom(volume, np.divide(shape, volume.shape), order=3,
                                                   mode="nearest", grid_mode=True), atol=1e-5)


def test_resampled_affine_keeps_the_field_of_view_and_round_trips():
    affine = np.array([[0.0, 0.0, -2.5, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.8, 0.0, 4.0], [0, 0, 0, 1.0]])
    old, new = (40, 30, 12), (36, 24, 30)
    moved = pp.resampled_affine(affine, old, new)
    # the outer voxel corners (index -0.5 and n - 0.5) land on the same world points
    for corner_old, corner_new in [((-0.5,) * 3, (-0.5,) * 3),
                                   (tuple(n - 0.5 for n in old), tuple(n - 0.5 for n in new))]:
        np.testing.assert_allclose(affine @ [*corner_old, 1.0], moved @ [*corner_new, 1.0], atol=1e-9)
    np.testing.assert_allclose(pp.resampled_affine(moved, new, old), affine, atol=1e-12)
    # the voxel size along each axis scales by old / new
    np.testing.assert_allclose(np.linalg.norm(moved[:3, :3], axis=0),
                               np.linalg.norm(affine[:3, :3], axis=0) * np.divide(old, new))


def test_labels_survive_a_resampling_round_trip_and_anisotropic_axes_stay_unblended():
    label = np.zeros((6, 24, 24), dtype=np.uint8)
    label[2:5, 6:18, 5:15] = 1
    label[3, 10:14, 8:12] = 2
    label[0, 0:3, 0:3] = 255  # unannotated voxels are a value like any other
    spacing = (3.0, 0.8, 0.8)
    shape = pp.resampled_shape(label.shape, spacing, (1.0, 1.0, 1.0))
    up = pp.resample_label(label, shape, pp.anisotropic_axis(spacing))
    assert set(np.unique(up)) == {0, 1, 2, 255}
    # slice-wise nearest neighbour along the thick axis: every new slice is a copy of a resampled old one
    assert all(any(np.array_equal(up[d], up[e]) for e in range(3 * k, 3 * k + 3)) for k in range(6)
               for d in range(3 * k, 3 * k + 3))
    one_hot = np.stack([(up == v).astype(np.float32) for v in (0, 1, 2, 255)])
    back = pp.resample_to_input(one_hot, label.shape, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)
    restored = np.array([0, 1, 2, 255])[back.argmax(0)]
    assert (restored == label).mean() > 0.97


def test_ct_normalisation_uses_the_dataset_foreground_statistics(tmp_path):
    cases = make_ct_dataset(tmp_path / "data")
    data = load_data(config(tmp_path / "data", tmp_path / "cache"))
    plan = data.meta["plan"]
    assert plan["normalization"] == ["ct"]
    # every foreground voxel is sampled in volumes this small: the statistics are the pooled foreground's
    pooled = np.concatenate([image[label > 0] for image, label, _ in cases.values()])
    stats = plan["intensity_statistics"][0]
    assert stats["mean"] == pytest.approx(pooled.mean(), rel=1e-5)
    assert stats["sd"] == pytest.approx(pooled.std(), rel=1e-5)
    assert stats["p00_5"] == pytest.approx(np.percentile(pooled, 0.5), rel=1e-5)
    assert stats["p99_5"] == pytest.approx(np.percentile(pooled, 99.5), rel=1e-5)
    # median spacing in (D, H, W); the thick axis's 10th percentile is not taken (7 slices x 3 mm is not
    # under a third of the in-plane extent), so it is the median
    zooms = np.array([z[::-1] for _, _, z in cases.values()])
    assert plan["target_spacing"] == pytest.approx(np.median(zooms, axis=0).tolist())
    # a cached case = the reference pipeline: nibabel axes, scipy resampling, clip + z-score
    case = next(c for c in data.train + data.val + data.test if c.case_id == "ct_2")
    image, label, zooms_2 = cases["ct_2"]
    volume = image.transpose(2, 1, 0)
    shape = pp.resampled_shape(volume.shape, zooms_2[::-1], plan["target_spacing"])
    in_plane = ndimage.zoom(volume.astype(np.float32), np.divide((volume.shape[0], *shape[1:]), volume.shape),
                            order=3, mode="nearest", grid_mode=True)
    resampled = ndimage.zoom(in_plane, np.divide(shape, in_plane.shape), order=0, mode="nearest", grid_mode=True)
    expected = (np.clip(resampled, stats["p00_5"], stats["p99_5"]) - stats["mean"]) / stats["sd"]
    assert isinstance(case.image, np.memmap) and case.image.shape == (1, *shape)
    np.testing.assert_allclose(case.image[0], expected, rtol=1e-4, atol=1e-4)
    assert case.spacing == pytest.approx(tuple(plan["target_spacing"]))


def test_mri_channels_are_normalised_per_image(tmp_path):
    make_ct_dataset(tmp_path / "data", n=3, channel="T2")
    data = load_data(config(tmp_path / "data", tmp_path / "cache"))
    assert data.meta["plan"]["normalization"] == ["zscore"]
    for case in data.train + data.val + data.test:
        assert float(case.image.mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(case.image.std()) == pytest.approx(1.0, abs=1e-3)


def test_the_cache_is_reused_and_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    make_ct_dataset(tmp_path / "data", n=4)
    cfg = config(tmp_path / "data", tmp_path / "cache")
    first = load_data(cfg)
    direct = load_data(DataConfig(name="msd", root=tmp_path / "data", spatial_dims=3, val_fraction=0.25))
    for split in ("train", "val", "test"):  # the same cases in each split as the loader reads them
        assert [c.case_id for c in getattr(first, split)] == [c.case_id for c in getattr(direct, split)]
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert (folder / "plan.json").is_file() and len(list((folder / "cases").glob("*_image.npy"))) == 4

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as m:
        m.setattr(pp, "_write_cache", refuse)
        again = load_data(cfg)  # nothing is recomputed
        assert [c.case_id for c in again.train] == [c.case_id for c in first.train]
        # the cache folder is not part of the key; the settings are
        assert pp.plan_key(cfg, []) == pp.plan_key(cfg.model_copy(update={"preprocess": PreprocessConfig(
            cache_dir=tmp_path / "elsewhere")}), [])
        assert pp.plan_key(cfg, []) != pp.plan_key(config(tmp_path / "data", tmp_path / "cache",
                                                          target_spacing=[2.0, 1.0, 1.0]), [])
    image = nib.load(tmp_path / "data" / "imagesTr" / "ct_1_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) + 5.0, image.affine),
             tmp_path / "data" / "imagesTr" / "ct_1_0000.nii.gz")
    load_data(cfg)
    folders = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 2 and not list((tmp_path / "cache").glob(".*partial*"))


def test_preprocess_refuses_layouts_it_cannot_resample(tmp_path):
    with pytest.raises(ConfigError, match="msd layout"):
        load_data(DataConfig(name="demo", spatial_dims=3, preprocess=PreprocessConfig(cache_dir=tmp_path)))
    with pytest.raises(ValueError, match="target_spacing"):
        PreprocessConfig(target_spacing=[1.0, 0.0, 1.0])


# ----------------------------------------------------------------------------------- patch dataset
def test_patches_come_from_the_cache_seeded_per_item(tmp_path):
    make_ct_dataset(tmp_path / "data", n=4)
    data = load_data(config(tmp_path / "data", tmp_path / "cache"))
    cases = data.train + data.val
    dataset = CachedPatchDataset(cases, 3, (8, 16, 16), foreground_ratio=1.0, augment=True)
    item = dataset[(0, 7)]
    assert item["image"].shape == (1, 8, 16, 16) and item["label"].shape == (8, 16, 16)
    assert item["label"].dtype == torch.int64 and (item["label"] > 0).any()  # centred on foreground
    again = dataset[(0, 7)]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
    # a patch is the cached volume's voxels where it fits (no augmentation)
    plain = CachedPatchDataset(cases, 3, (4, 8, 8), foreground_ratio=0.0, augment=False)
    patch = plain[(1, 3)]
    volume = np.asarray(cases[1].image[0])
    hits = [(z, y, x) for z in range(volume.shape[0] - 3) for y in range(volume.shape[1] - 7)
            for x in range(volume.shape[2] - 7)
            if np.array_equal(volume[z:z + 4, y:y + 8, x:x + 8], patch["image"][0].numpy())]
    assert hits
    # a volume smaller than the patch is padded
    big = CachedPatchDataset(cases, 3, (64, 8, 8), foreground_ratio=0.0, augment=False)[(0, 1)]
    assert big["image"].shape == (1, 64, 8, 8) and float(big["image"][0, -1].abs().max()) == 0.0


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    from torch.utils.data import DataLoader

    make_ct_dataset(tmp_path / "data", n=4)
    data = load_data(config(tmp_path / "data", tmp_path / "cache"))
    dataset = CachedPatchDataset(data.train + data.val, 3, (4, 8, 8), augment=True)

    def batches(workers):
        loader = DataLoader(dataset, batch_size=2, num_workers=workers,
                            sampler=EpochSeededSampler(len(dataset), 3))
        return [b["image"] for b in loader]

    for a, b in zip(batches(0), batches(1)):
        assert torch.equal(a, b)
    assert default_num_workers(False, cores=16) == 0
    assert default_num_workers(True, cores=16) == 4 and default_num_workers(True, cores=2) == 1


# --------------------------------------------------------------------------- fine-tune and predict
def finetune_and_predict(tmp_path: Path, accelerator: str = "cpu", precision: str = "32"):
    from medxfer.config import RunConfig
    from medxfer.finetune import run_finetune
    from medxfer.predict import predict

    cases = make_ct_dataset(tmp_path / "data", n=5)
    data = config(tmp_path / "data", tmp_path / "cache").model_copy(update={"patch_size": [4, 16, 16]})
    run = RunConfig(data=data, model={"preset": "unet3d", "width": 4, "depth": 3},
                    train={"strategy": "scratch", "max_steps": 2, "batch_size": 2, "num_workers": 0,
                           "accelerator": accelerator, "precision": precision, "checkpoint_every_s": None})
    result = run_finetune(run, tmp_path / "out")
    plan = result.record["preprocess_plan"]
    assert plan["normalization"] == ["ct"] and len(plan["target_spacing"]) == 3
    # a new input at its own spacing and affine: the mask comes back on its grid, with its affine
    image, _, zooms = cases["ct_0"]
    affine = np.array([[0.0, -0.7, 0.0, 12.0], [0.7, 0.0, 0.0, -3.0], [0.0, 0.0, 4.0, 8.0], [0, 0, 0, 1.0]])
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(image[:, :, :5].astype(np.float32), affine), inputs / "new.nii.gz")
    summary = predict(result.run_dir, inputs, tmp_path / "pred", overlays=False)
    assert not summary["failed"] and summary["settings"]["plan"]["target_spacing"] == plan["target_spacing"]
    mask = nib.load(tmp_path / "pred" / "new_mask.nii.gz")
    assert mask.shape == image[:, :, :5].shape and np.allclose(mask.affine, affine)
    return result


def test_finetune_on_preprocessed_data_and_predict_on_the_input_grid(tmp_path):
    result = finetune_and_predict(tmp_path)
    assert result.record["steps_trained"] == 2 and result.record["status"] == "done"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_finetune_on_preprocessed_data_on_the_gpu_in_bf16(tmp_path):
    result = finetune_and_predict(tmp_path, accelerator="gpu", precision="bf16-mixed")
    assert result.record["environment"]["cuda"] and np.isfinite(result.record["best_val_dice"] or 0.0)


def test_warm_up_imports_the_inferer_and_leaves_the_model_as_it_was():
    import sys

    from medxfer.data.patches import predict_logits, warm_up
    from medxfer.models import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter(preset="unet3d", in_channels=1, n_classes=2, width=2, depth=2).eval()
    volume = torch.randn(1, 1, 12, 10, 9)
    before = predict_logits(model, volume, patch_size=(8, 8, 8), size_multiple=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    warm_up(model, (8, 8, 8), size_multiple=2, sw_batch_size=2)
    assert "monai.inferers" in sys.modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(before, predict_logits(model, volume, patch_size=(8, 8, 8), size_multiple=2))


def test_cached_patches_take_the_configured_augmentation(tmp_path):
    make_ct_dataset(tmp_path / "data", n=3)
    data = load_data(config(tmp_path / "data", tmp_path / "cache"))
    cases = data.train + data.val + data.test
    names = {a: [type(t).__name__ for t in CachedPatchDataset(cases, 3, (4, 8, 8), augment=a).transform().transforms]
             for a in (True, "nnunet")}
    assert "RandFlipd" in names[True] and names["nnunet"] != names[True]
    assert CachedPatchDataset(cases, 3, (4, 8, 8), augment=False).transform() is None
    item = CachedPatchDataset(cases, 3, (4, 8, 8), augment="nnunet")[(0, 5)]
    assert item["image"].shape == (1, 4, 8, 8) and item["label"].shape == (4, 8, 8)
