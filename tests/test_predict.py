"""predict: a tiny saved model applied to 2D files and 3D NIfTI volumes; bad inputs are reported and skipped."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from medxfer.config import RunConfig, config_to_dict, parse_config
from medxfer.errors import CheckpointError, DataError
from medxfer.models.weights import save_model_weights
from medxfer.predict import load_trained_model, predict
from medxfer.records import write_record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_run(run_dir, preset: str, spatial_dims: int, normalization: str = "minmax",
             calibrate: np.ndarray | None = None) -> torch.nn.Module:
    """A run folder as finetune leaves it: model.pt + model.json + result.json (untrained tiny model).
    ``calibrate``: a normalised input on which the head bias is set so that half the pixels are foreground."""
    from medxfer.models import build_segmenter

    torch.manual_seed(0)
    spec = {"preset": preset, "width": 4, "depth": 3, "in_channels": 1, "n_classes": 2, "options": {}}
    model = build_segmenter(spec).eval()
    if calibrate is not None:
        with torch.no_grad():
            logits = model(torch.from_numpy(calibrate)[None, None])[0]
            model.head.bias[1] -= (logits[1] - logits[0]).median()
    save_model_weights(model, run_dir / "model.pt", manifest={"model": spec})
    config = parse_config({"data": {"spatial_dims": spatial_dims, "normalization": normalization},
                           "model": {"preset": preset, "width": 4, "depth": 3}}, RunConfig)
    write_record(run_dir, {"kind": "finetune", "status": "done", "run_id": "tiny", "config": config_to_dict(config)})
    return model.eval()


def test_predict_2d_folder_writes_masks_in_the_input_format(tmp_path):
    rng = np.random.default_rng(0)
    npy = rng.normal(0, 1, (32, 48)).astype(np.float32)
    x = (npy - npy.min()) / (npy.max() - npy.min())  # min-max normalisation, as the run's config says
    model = save_run(tmp_path / "run", "unet", 2, calibrate=x)
    inputs = tmp_path / "in"
    inputs.mkdir()
    png = (rng.random((37, 45)) * 255).astype(np.uint8)  # not a multiple of the stride: padded and cropped
    Image.fromarray(png).save(inputs / "a.png")
    rgb = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(inputs / "b.jpg")
    tif = rng.normal(100, 20, (40, 40)).astype(np.float32)
    tifffile.imwrite(inputs / "c.tif", tif)
    np.save(inputs / "d.npy", npy)
    (inputs / "broken.png").write_bytes(PNG_SIGNATURE + b"not really a png")
    (inputs / "notes.txt").write_text("not an image")

    out = tmp_path / "out"
    summary = predict(tmp_path / "run", inputs, out)

    assert [f["input"] for f in summary["failed"]] == [str(inputs / "broken.png")]
    assert "broken.png" in summary["failed"][0]["error"]
    assert len(summary["written"]) == 4 and summary["settings"]["source"] == "result.json"
    masks = {
        "a": np.asarray(Image.open(out / "a_mask.png")),
        "b": np.asarray(Image.open(out / "b_mask.png")),  # jpg input: a lossless png mask
        "c": tifffile.imread(out / "c_mask.tif"),
        "d": np.load(out / "d_mask.npy"),
    }
    assert masks["a"].shape == png.shape and masks["b"].shape == rgb.shape[:2]
    assert masks["c"].shape == tif.shape and masks["d"].shape == npy.shape
    for stem, mask in masks.items():
        # PNG masks are 0/255 (visible in an image viewer); the other formats hold class indices
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= ({0, 255} if stem in "ab" else {0, 1})
        overlay = (out / f"{stem}_overlay.png").read_bytes()
        assert overlay[:8] == PNG_SIGNATURE
        Image.open(out / f"{stem}_overlay.png").load()
    # Same preprocessing as in training: min-max normalisation (the run's config), then softmax > 0.5.
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)[None, None]), dim=1)[0, 1].numpy()
    np.testing.assert_array_equal(masks["d"], (probs > 0.5).astype(np.uint8))
    assert summary["png_scale"] == 255
    assert 0 < masks["d"].mean() < 1
    written = json.loads((out / "predict_summary.json").read_text())
    assert written["failed"] == summary["failed"] and len(written["written"]) == 4


def test_predict_nifti_keeps_shape_and_affine(tmp_path):
    save_run(tmp_path / "run", "unet3d", 3)
    affine = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    volume = np.random.default_rng(1).normal(50, 10, (14, 16, 10)).astype(np.float32)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(volume, affine), inputs / "ct.nii.gz")
    nib.save(nib.Nifti1Image(volume[:12, :12, :8], affine), inputs / "small.nii")
    (inputs / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")

    summary = predict(tmp_path / "run" / "model.pt", inputs, tmp_path / "out")

    assert [f["input"].rsplit("/", 1)[-1] for f in summary["failed"]] == ["corrupt.nii.gz"]
    mask = nib.load(tmp_path / "out" / "ct_mask.nii.gz")
    assert mask.shape == volume.shape and np.allclose(mask.affine, affine)
    assert np.asarray(mask.dataobj).dtype == np.uint8
    assert [f["shape"] for f in summary["written"] if f["input"].endswith("ct.nii.gz")] == [list(volume.shape)]
    small = nib.load(tmp_path / "out" / "small_mask.nii")
    assert small.shape == (12, 12, 8) and np.allclose(small.affine, affine)
    assert (tmp_path / "out" / "ct_overlay.png").read_bytes()[:8] == PNG_SIGNATURE


def test_2d_model_segments_a_volume_slice_by_slice_in_the_loader_axes(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.normal(0, 1, (24, 16, 3)).astype(np.float32)  # NIfTI [i, j, k]: 3 slices of (H, W) = (16, 24)
    first = volume[:, :, 0].T
    model = save_run(tmp_path / "run", "unet", 2, calibrate=(first - first.min()) / (first.max() - first.min()))
    inputs = tmp_path / "in"
    inputs.mkdir()
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), inputs / "cine.nii.gz")
    summary = predict(tmp_path / "run", inputs, tmp_path / "out")
    assert not summary["failed"]
    mask = nib.load(tmp_path / "out" / "cine_mask.nii.gz")
    assert mask.shape == volume.shape and np.allclose(mask.affine, affine)
    voxels = np.asarray(mask.dataobj)
    for k in range(volume.shape[2]):
        plane = volume[:, :, k].T  # (H, W) as the ACDC/MSD loaders give it
        x = (plane - plane.min()) / (plane.max() - plane.min())
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x)[None, None]), dim=1)[0, 1].numpy()
        np.testing.assert_array_equal(voxels[:, :, k].T, (probs > 0.5).astype(np.uint8))
    assert 0 < voxels[:, :, 0].mean() < 1


def test_predict_reports_wrong_dimensionality_per_file(tmp_path):
    save_run(tmp_path / "run", "unet3d", 3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(inputs / "flat.png")
    np.save(inputs / "ok.npy", np.random.default_rng(2).random((8, 16, 16)).astype(np.float32))
    summary = predict(tmp_path / "run", inputs, tmp_path / "out")
    assert len(summary["written"]) == 1 and np.load(tmp_path / "out" / "ok_mask.npy").shape == (8, 16, 16)
    assert summary["failed"][0]["input"].endswith("flat.png") and "3D model" in summary["failed"][0]["error"]


def test_bad_model_and_missing_inputs_are_one_line_errors(tmp_path):
    run = tmp_path / "run"
    save_run(run, "unet", 2)
    with pytest.raises(DataError, match="not found"):
        predict(run, tmp_path / "nowhere", tmp_path / "out")
    (run / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_trained_model(run)
    with pytest.raises(CheckpointError, match="not found"):
        load_trained_model(tmp_path / "empty")


def test_predict_reproduces_the_evaluation_of_a_real_finetune_run(tmp_path):
    """Same preprocessing as in training: predicting the saved test images of a (2-step) demo run gives
    back the per-image Dice its record holds."""
    from medxfer.data import load_data
    from medxfer.evaluation.metrics import segmentation_metrics
    from medxfer.finetune import run_finetune

    config = parse_config({"data": {"name": "demo", "options": {"domain": "B"}, "train_images": 4},
                           "model": {"preset": "unet", "width": 4, "depth": 3},
                           "train": {"strategy": "scratch", "max_steps": 2, "batch_size": 2, "accelerator": "cpu"}},
                          RunConfig)
    run = run_finetune(config, tmp_path / "results")
    recorded = {row["case_id"]: row["dice index"] for row in run.record["metrics"]["target"]["per_image"]}
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = load_data(config.data).test[:3]
    for case in cases:
        np.save(inputs / f"{case.case_id}.npy", case.image[0])
    summary = predict(run.run_dir, inputs, tmp_path / "out")
    assert len(summary["written"]) == 3
    for case in cases:
        mask = np.load(tmp_path / "out" / f"{case.case_id}_mask.npy").astype(np.int64)
        probs = np.stack([1.0 - mask, mask]).astype(np.float32)
        dice = segmentation_metrics(probs, case.label, n_classes=2)["dice index"]
        assert dice == pytest.approx(recorded[case.case_id], abs=1e-9)


def test_a_lone_model_file_uses_the_preprocessing_in_its_manifest(tmp_path):
    from medxfer.models import build_segmenter

    spec = {"preset": "unet", "width": 4, "depth": 3, "in_channels": 1, "n_classes": 2, "options": {}}
    save_model_weights(build_segmenter(spec), tmp_path / "model.pt",
                       manifest={"model": spec, "data": {"normalization": "minmax", "percentile_clip": [1, 99],
                                                         "patch_size": [16, 16], "resize": None,
                                                         "spatial_dims": 2}})
    np.save(tmp_path / "big.npy", np.random.default_rng(4).random((40, 56)).astype(np.float32))
    summary = predict(tmp_path / "model.pt", tmp_path / "big.npy", tmp_path / "out")
    settings = summary["settings"]
    assert settings["source"] == "model manifest" and settings["normalization"] == "minmax"
    assert settings["patch_size"] == [16, 16]  # sliding windows over the larger input
    assert np.load(tmp_path / "out" / "big_mask.npy").shape == (40, 56)


def _decompression_bomb_png(path) -> None:
    """A valid PNG whose header claims 40000 x 40000 pixels (Pillow refuses to decode it)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = struct.pack(">II", 40000, 40000)  # IHDR width, height
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))


def _nan_affine_nifti(path) -> None:
    image = nib.Nifti1Image(np.random.default_rng(5).random((16, 16, 2)).astype(np.float32), np.eye(4))
    image.set_sform(np.eye(4), code=2)
    image.set_qform(np.eye(4), code=0)
    nib.save(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[280:284] = np.float32(np.nan).tobytes()  # srow_x[0] (nibabel itself refuses to write a NaN affine)
    path.write_bytes(bytes(raw))


def test_bad_inputs_are_skipped_with_a_reason_and_the_batch_goes_on(tmp_path, capsys):
    from medxfer.cli import main

    save_run(tmp_path / "run", "unet", 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    _decompression_bomb_png(inputs / "a_bomb.png")
    _nan_affine_nifti(inputs / "b_nan.nii")
    np.save(inputs / "c_ok.npy", np.random.default_rng(6).random((16, 16)).astype(np.float32))
    summary = predict(tmp_path / "run", inputs, tmp_path / "out")
    assert [entry["input"].rsplit("/", 1)[-1] for entry in summary["written"]] == ["c_ok.npy"]
    reasons = {entry["input"].rsplit("/", 1)[-1]: entry["error"] for entry in summary["failed"]}
    assert "too large" in reasons["a_bomb.png"] and "affine" in reasons["b_nan.nii"]
    assert main(["predict", str(tmp_path / "run"), str(inputs), "--out", str(tmp_path / "out2"),
                 "--no-overlays"]) == 1
    assert "2 input(s) skipped" in capsys.readouterr().err
    assert (tmp_path / "out2" / "c_ok_mask.npy").is_file()


def test_an_unexpected_error_in_one_file_skips_only_that_file(tmp_path, monkeypatch):
    import medxfer.predict as predict_module

    save_run(tmp_path / "run", "unet", 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        np.save(inputs / f"{name}.npy", np.random.default_rng(7).random((16, 16)).astype(np.float32))
    real = predict_module._fit_channels

    def fails_on_a(image, in_channels, path, **options):
        if path.name == "a.npy":
            raise ZeroDivisionError("unexpected")
        return real(image, in_channels, path, **options)

    monkeypatch.setattr(predict_module, "_fit_channels", fails_on_a)
    summary = predict(tmp_path / "run", inputs, tmp_path / "out")
    assert len(summary["written"]) == 1 and summary["failed"][0]["error"] == "ZeroDivisionError: unexpected"


def test_spacing_mismatch_warns_with_both_spacings_and_is_recorded(tmp_path, caplog):
    from medxfer.records import read_record

    save_run(tmp_path / "run", "unet", 2)
    record = read_record(tmp_path / "run" / "result.json")
    record["train_spacing"] = {"median": [1.14, 1.14], "min": [1.1, 1.1], "max": [1.2, 1.2]}  # in-plane, 2D run
    write_record(tmp_path / "run", record)
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = np.random.default_rng(8).random((16, 16, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.63, 0.63, 5.0, 1.0])), inputs / "fine.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.diag([1.15, 1.15, 5.0, 1.0])), inputs / "same.nii.gz")
    with caplog.at_level("WARNING", logger="medxfer.predict"):
        summary = predict(tmp_path / "run", inputs, tmp_path / "out", overlays=False)
    warnings = [r.getMessage() for r in caplog.records if "spacing" in r.getMessage()]
    assert len(warnings) == 1 and "fine.nii.gz" in warnings[0]
    assert "[5, 0.63, 0.63]" in warnings[0] and "[1.14, 1.14]" in warnings[0]
    entries = {e["input"].rsplit("/", 1)[-1]: e for e in summary["written"]}
    assert entries["fine.nii.gz"]["spacing"] == pytest.approx([5.0, 0.63, 0.63]) and entries["fine.nii.gz"]["spacing_mismatch"]
    assert entries["same.nii.gz"]["spacing"] == pytest.approx([5.0, 1.15, 1.15])
    assert not entries["same.nii.gz"]["spacing_mismatch"]
    on_disk = json.loads((tmp_path / "out" / "predict_summary.json").read_text())
    assert on_disk["train_spacing"]["median"] == [1.14, 1.14]


def test_spacing_summary_of_training_cases():
    from medxfer.data.base import Case, spacing_summary

    cases = [Case(image=np.zeros((1, 4, 4), np.float32), label=None, case_id=str(i), spacing=(s, s))
             for i, s in enumerate((1.0, 1.5, 2.0))]
    assert spacing_summary(cases) == {"median": [1.5, 1.5], "min": [1.0, 1.0], "max": [2.0, 2.0]}
    assert spacing_summary([Case(image=np.zeros((1, 4, 4), np.float32), label=None, case_id="x")]) is None


def test_axis_chooses_the_slicing_and_a_plane_or_shape_unlike_training_warns(tmp_path, caplog):
    rng = np.random.default_rng(3)
    volume = rng.normal(0, 1, (8, 16, 12)).astype(np.float32)  # NIfTI [i, j, k], RAS affine: k is axial
    model = save_run(tmp_path / "run", "unet", 2)
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    record.update(train_shapes=[[16, 8]], slice_orientation="axial", class_names=["background", "hippocampus"])
    write_record(tmp_path / "run", record)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "in" / "head.nii.gz")

    default = predict(tmp_path / "run", tmp_path / "in", tmp_path / "k")["written"][0]
    assert (default["slice_axis"], default["slice_plane"], default["geometry_warnings"]) == ("k", "axial", [])
    with caplog.at_level("WARNING"):
        entry = predict(tmp_path / "run", tmp_path / "in", tmp_path / "i", axis="sagittal")["written"][0]
    assert (entry["slice_axis"], entry["slice_plane"]) == ("i", "sagittal")
    assert entry["geometry_warnings"] == ["slices are 12x16 pixels, the training images were 16x8",
                                          "slices are sagittal, the model was trained on axial slices (set --axis)"]
    assert "trained on axial slices" in caplog.text
    voxels = np.asarray(nib.load(tmp_path / "i" / "head_mask.nii.gz").dataobj)
    assert voxels.shape == volume.shape
    for i in (0, 5):
        plane = volume[i].T  # (H, W) = (k, j), as the loaders lay a slice out
        x = (plane - plane.min()) / (plane.max() - plane.min())
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x))[None, None]), dim=1)[0, 1].numpy()
        np.testing.assert_array_equal(voxels[i].T, (probs > 0.5).astype(np.uint8))
    with pytest.raises(DataError, match="--axis 'x'"):
        from medxfer.predict import slice_axis
        slice_axis("x", nib.load(tmp_path / "in" / "head.nii.gz"))


def test_predict_overlays_name_the_classes():
    from medxfer.report.overlays import overlay_figure

    label = np.zeros((16, 16), dtype=np.int64)
    label[4:8, 4:8], label[9:12, 9:12] = 1, 2
    figure = overlay_figure(np.zeros((1, 16, 16), np.float32), label, 3, "x.png",
                            class_names=["background", "hippocampus", "amygdala"])
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert texts == ["hippocampus", "amygdala"]
