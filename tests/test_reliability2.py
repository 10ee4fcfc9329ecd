"""Reliability, round two (issue #31): the 22 attacks that still lost data, hung or traced back.

Each test is named after what must hold; the comment on it gives the issue item. Full disks are a small
tmpfs (needs root; skipped elsewhere) or an injected ENOSPC.
"""

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from medxfer.cli import main
from medxfer.errors import ConfigError, DiskFull
from medxfer.io import LOCK_FILE, atomic_path, atomic_torch_save, folder_lock

TINY_RUN = {"data": {"name": "demo", "options": {"domain": "A"}, "train_images": 4},
            "model": {"preset": "unet", "width": 4, "depth": 3},
            "train": {"strategy": "scratch", "max_steps": 2, "batch_size": 4}}
TINY_PRETRAIN = {"model": {"preset": "unet", "width": 4, "depth": 3}, "schedule": {"lengths": [0, 1, 2]},
                 "classification": {"n_per_class": 4, "val_per_class": 2}, "train": {"batch_size": 16}}


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- items 11 and 16: a full disk while saving model.pt, a checkpoint or the record ---------------------


def test_a_full_disk_in_torch_save_is_one_line_naming_the_file(small_disk):
    """Item 11: torch.save raised "RuntimeError ... unexpected pos" (its ENOSPC only the context)."""
    from medxfer.training.resume import AtomicCheckpointIO

    target = small_disk / "model.pt"
    with pytest.raises(DiskFull, match=r"model\.pt: no space left on the device"):
        atomic_torch_save({"w": torch.zeros(200_000)}, target)
    with pytest.raises(DiskFull, match=r"last\.ckpt: no space left on the device"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(200_000)}}, small_disk / "last.ckpt")
    assert list(small_disk.iterdir()) == []  # no temp file, no torn target


def test_pretraining_on_a_full_disk_exits_2_with_one_line(small_disk, tmp_path, capsys):
    """Item 11 through the CLI: pretraining checkpoints on a 256 KiB disk."""
    config = write_yaml(tmp_path / "pretrain.yaml", {**TINY_PRETRAIN, "model": {**TINY_PRETRAIN["model"],
                                                                                 "width": 16}})
    assert main(["pretrain", str(config), "--out", str(small_disk / "out")]) == 2
    line = one_error_line(capsys)
    assert "no space left on the device" in line and str(small_disk) in line
    assert not list(small_disk.rglob("*.tmp"))


@pytest.mark.slow
def test_a_full_disk_at_the_record_names_it_and_leaves_no_model_without_record(tmp_path, monkeypatch, capsys):
    """Item 16: "error: No space left on device" named no file, and model.pt stayed without its record."""
    import medxfer.records

    real = medxfer.records.atomic_write_json

    def full_at_record(path, obj):
        if Path(path).name != "result.json":
            return real(path, obj)
        with atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medxfer.records, "atomic_write_json", full_at_record)
    config = write_yaml(tmp_path / "run.yaml", TINY_RUN)
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "result.json: no space left on the device" in line
    out = tmp_path / "out"
    assert not list(out.rglob("model.*")) and not list(out.rglob("result.json")) and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(medxfer.records, "atomic_write_json", real)
    assert main(["finetune", str(config), "--out", str(out)]) == 0
    assert len(list(out.rglob("model.pt"))) == 1 and len(list(out.rglob("result.json"))) == 1


# --- item 12: a deeply nested YAML; item 13: data check's bad options ------------------------------------


def test_a_deeply_nested_yaml_config_is_one_line(tmp_path, capsys):
    """Item 12: 100,000 nested "[" raised RecursionError."""
    config = tmp_path / "deep.yaml"
    config.write_text("[" * 100_000)
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "deep.yaml: YAML nested too deeply" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, problem", [
    (["demo", "-o", "n_classes=[[["], "--option n_classes: line 1"),
    (["nosuch"], "data check: name: Input should be"),
    (["demo", "--dims", "4"], "data check: spatial_dims: Input should be 2 or 3"),
])
def test_data_check_bad_options_are_one_line(args, problem, capsys):
    """Item 13: each of these ended in a traceback."""
    assert main(["data", "check", *args]) == 2
    assert problem in one_error_line(capsys)


# --- item 21: a folder in use is refused before the heavy imports; item 22: --out / ----------------------


def test_a_locked_folder_is_refused_before_torch_is_imported(tmp_path):
    """Item 21: the second process paid the whole start-up (torch, Lightning) before the lock refused it."""
    out = tmp_path / "out"
    script = ("import sys; from medxfer.cli import main; "
              f"code = main(['finetune', 'missing.yaml', '--out', {str(out)!r}]); "
              "print(code, 'torch' in sys.modules)")
    with folder_lock(out, "output folder"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "in use by another medxfer process" in done.stderr and str(out) in done.stderr


@pytest.mark.parametrize("where", ["/", "~"])
def test_the_root_and_home_folders_are_refused_as_output(where, tmp_path, capsys):
    """Item 22: `--out /` was accepted and filled the root folder."""
    out = os.path.expanduser(where)
    assert main(["finetune", str(tmp_path / "missing.yaml"), "--out", out]) == 2
    assert f"{out}: refusing the" in one_error_line(capsys)
    assert not Path(out, LOCK_FILE).exists()
    # forced: the folder passes, and the command goes on to its next check (here: the missing config)
    assert main(["--allow-any-out", "finetune", str(tmp_path / "missing.yaml"), "--out", out]) == 2
    assert "missing.yaml: config file not found" in one_error_line(capsys)


# --- item 2: huge finite values; item 3: a 4D NIfTI; item 8: a pixel bomb; item 15: 10^9 classes -------


def test_zscore_of_huge_finite_values_is_the_zscore_of_the_scaled_image():
    """Item 2: a float32 image around 1e30 overflowed the z-score and became all zeros."""
    from medxfer.data.transforms import normalize_image

    image = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    for method in ("zscore", "minmax", "percentile"):
        huge = normalize_image(image * np.float32(1e30), method)
        assert np.isfinite(huge).all() and huge.std() > 0.1
        np.testing.assert_allclose(huge, normalize_image(image, method), atol=1e-4)


def _save_tiny_run(run_dir: Path, preset: str = "unet", spatial_dims: int = 2) -> None:
    from medxfer.config import RunConfig, config_to_dict, parse_config
    from medxfer.models import build_segmenter
    from medxfer.models.weights import save_model_weights
    from medxfer.records import write_record

    spec = {"preset": preset, "width": 4, "depth": 3, "in_channels": 1, "n_classes": 2, "options": {}}
    save_model_weights(build_segmenter(spec).eval(), run_dir / "model.pt", manifest={"model": spec})
    config = parse_config({"data": {"spatial_dims": spatial_dims}, "model": {"preset": preset, "width": 4,
                                                                            "depth": 3}}, RunConfig)
    write_record(run_dir, {"kind": "finetune", "status": "done", "run_id": "tiny", "config": config_to_dict(config)})


def test_predict_refuses_a_4d_nifti_instead_of_averaging_its_volumes(tmp_path):
    """Item 3: 3 volumes in one NIfTI were averaged into one and segmented, with only an INFO line."""
    import nibabel as nib

    from medxfer.predict import predict

    _save_tiny_run(tmp_path / "run", "unet3d", 3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((16, 16, 8, 3)).astype(np.float32), np.eye(4)), inputs / "three.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((16, 16, 8)).astype(np.float32), np.eye(4)), inputs / "one.nii.gz")
    summary = predict(tmp_path / "run", inputs, tmp_path / "out", overlays=False)
    assert [Path(w["input"]).name for w in summary["written"]] == ["one.nii.gz"]
    assert summary["failed"][0]["input"].endswith("three.nii.gz")
    assert "holds 3 volumes" in summary["failed"][0]["error"]
    assert not (tmp_path / "out" / "three_mask.nii.gz").exists()


def _pixel_bomb(path: Path) -> None:
    Image.new("1", (12000, 12000)).save(path)  # 17 KB on disk, 144 Mpx decoded


def test_a_pixel_bomb_png_is_refused_from_its_header(tmp_path, capsys):
    """Item 8: a 1-bit 12000 x 12000 PNG made predict take 19.6 GB and data check 65 s."""
    from medxfer.predict import predict

    _save_tiny_run(tmp_path / "run")
    inputs = tmp_path / "in"
    inputs.mkdir()
    _pixel_bomb(inputs / "bomb.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(inputs / "good.png")
    started = time.perf_counter()
    summary = predict(tmp_path / "run", inputs, tmp_path / "out", overlays=False)
    assert time.perf_counter() - started < 10
    assert [Path(w["input"]).name for w in summary["written"]] == ["good.png"]
    assert "bomb.png: image of 12000 x 12000 = 144,000,000 pixels exceeds the limit" in summary["failed"][0]["error"]
    # data check: one line, at once
    root = tmp_path / "tiles"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    _pixel_bomb(root / "images" / "a.png")
    Image.new("L", (16, 16)).save(root / "masks" / "a.png")
    assert main(["data", "check", "folders", str(root)]) == 2
    assert "a.png: image of 12000 x 12000" in one_error_line(capsys)


def test_npy_and_nifti_headers_claiming_too_many_voxels_are_refused_before_reading(tmp_path):
    """Item 8 for the other formats: the shape comes from the header; the data is never read."""
    import nibabel as nib

    from medxfer.data.folders import read_raster
    from medxfer.data.msd import read_nifti
    from medxfer.errors import DataError

    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 512))
    header.set_data_dtype(np.uint8)
    nifti = tmp_path / "huge.nii"
    nifti.write_bytes(header.binaryblock + b"\0" * 4)  # the header alone: 2 G voxels claimed, none stored
    with pytest.raises(DataError, match=r"huge\.nii: image of 512 x 2048 x 2048|huge\.nii: image of 2048 x 2048 x 512"):
        read_nifti(nifti)
    npy = tmp_path / "huge.npy"
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (12000, 12000)})
    with pytest.raises(DataError, match=r"huge\.npy: image of 12000 x 12000"):
        read_raster(npy)


def test_a_model_manifest_claiming_a_billion_classes_is_one_line(tmp_path):
    """Item 15: predict tried to allocate 32 GB for the head."""
    from medxfer.errors import CheckpointError
    from medxfer.inference import load_trained_model

    run = tmp_path / "run"
    _save_tiny_run(run)
    manifest = json.loads((run / "model.json").read_text())
    manifest["model"]["n_classes"] = 10**9
    (run / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.json: n_classes: .*less than or equal to 255"):
        load_trained_model(run)


# --- item 4: booleans for numbers; item 5: data.resize everywhere ---------------------------------------


def test_a_boolean_for_a_number_is_refused_everywhere_in_the_config(tmp_path):
    """Item 4: `lr: yes` trained with lr = 1.0."""
    from medxfer.config import PretrainConfig, RunConfig, load_config, parse_config

    config = tmp_path / "run.yaml"
    config.write_text("data: {name: demo}\ntrain: {lr: yes}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.lr: .*a boolean where a number"):
        load_config(config, RunConfig)
    for bad in ({"data": {"train_images": True}}, {"data": {"resize": [True, 8]}}, {"seed": False},
                {"model": {"width": True}}, {"evaluation": {"threshold": True}}):
        with pytest.raises(ConfigError, match="a boolean where a number"):
            parse_config(bad, RunConfig)
    with pytest.raises(ConfigError, match=r"train\.lr: .*a boolean"):
        parse_config({"train": {"lr": True}}, PretrainConfig)
    # what stays accepted: ints for floats, YAML's "1e-3" (a string to PyYAML), real booleans
    accepted = parse_config({"train": {"lr": 1, "encoder_lr_factor": "1e-3"}, "data": {"augment": False}}, RunConfig)
    assert accepted.train.lr == 1.0 and accepted.train.encoder_lr_factor == 1e-3 and accepted.data.augment is False


@pytest.mark.parametrize("name", ["demo", "colin27"])
def test_data_resize_is_applied_by_every_loader(name):
    """Item 5: the demo and colin27 loaders ignored data.resize (same metrics, new run id)."""
    from medxfer.config import DataConfig
    from medxfer.data import load_data

    data = load_data(DataConfig(name=name, resize=[24, 40]))
    cases = data.train + data.val + data.test
    assert cases and {c.spatial_shape for c in cases} == {(24, 40)}
    assert {c.label.shape for c in cases if c.label is not None} == {(24, 40)}
    assert all(c.label.dtype == np.int64 and c.image.dtype == np.float32 for c in cases)
    assert {c.spatial_shape for c in load_data(DataConfig(name=name)).train} != {(24, 40)}  # the cache is untouched


# --- item 19: one image of another size; item 20: a one-image dataset ----------------------------------


def _tiles(root: Path, shapes) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i, shape in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / "images" / f"t{i}.png")
        mask = np.zeros(shape, np.uint8)
        mask[2:8, 4:12] = 1
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")
    return root


def test_an_image_of_another_size_is_named_by_finetune_and_data_check(tmp_path, capsys):
    """Item 19: "training images differ in size" named no file, and data check passed (exit 0) listing two
    shapes."""
    root = _tiles(tmp_path / "tiles", [(16, 16)] * 9 + [(16, 24)])
    config = write_yaml(tmp_path / "run.yaml", {**TINY_RUN, "data": {"name": "folders", "root": str(root),
                                                                       "val_fraction": 0.0,
                                                                       "options": {"test_fraction": 0.0}}})
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "training images differ in size: 9 are 16 x 16, but" in line and "t9.png is 16 x 24" in line
    assert main(["data", "check", "folders", str(root)]) == 2  # its default splits: 7 of 8 train/val images
    line = one_error_line(capsys)
    assert "training images differ in size: 7 are 16 x 16, but" in line and "t9.png is 16 x 24" in line
    # a run that trains on patches or resizes takes them: data check told so passes
    assert main(["data", "check", "folders", str(root), "--patch-size", "8,8"]) == 0
    assert main(["data", "check", "folders", str(root), "--resize", "16x16"]) == 0
    assert "shapes [[16, 16]]" in capsys.readouterr().out
    assert main(["data", "check", "folders", str(root), "--resize", "16,a"]) == 2
    assert "--resize '16,a': expected whole numbers" in one_error_line(capsys)


def test_a_run_without_validation_or_test_images_says_so_and_records_it(tmp_path, caplog):
    """Item 20: one image/mask pair trained with no validation and no test, recorded n_images 0 silently."""
    from medxfer.config import RunConfig, parse_config
    from medxfer.finetune import run_finetune

    root = _tiles(tmp_path / "one", [(16, 16)])
    config = parse_config({**TINY_RUN, "data": {"name": "folders", "root": str(root)},
                           "train": {**TINY_RUN["train"], "max_steps": 1}}, RunConfig)
    with caplog.at_level(logging.WARNING, logger="medxfer.finetune"):
        record = run_finetune(config, tmp_path / "out").record
    assert record["n_train_images"] == 1
    assert any("no validation images (1 training)" in w for w in record["warnings"])
    assert any("no labelled test images" in w for w in record["warnings"])
    assert "no labelled test images" in caplog.text and "no validation images" in caplog.text


# --- item 18: one killed sweep worker ---------------------------------------------------------------------


def killed_at_seed_1(config, out_dir):
    """A stand-in for run_finetune: seed 1 dies as the OOM killer would end it, the others write a record."""
    import signal

    from medxfer.finetune import run_id_for
    from medxfer.records import run_dir, write_record

    if config.seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # in progress while the other worker dies
    write_record(run_dir(out_dir, run_id_for(config)), {"kind": "finetune", "status": "done", "seed": config.seed})


@pytest.mark.slow
def test_one_killed_worker_fails_its_run_with_the_reason_and_the_rest_run(tmp_path):
    """Item 18: the pool broke: 10 runs "failed" (3 of them had a result.json, none an error.json) and 7
    queued ones never ran."""
    from medxfer.config import RunConfig, parse_config
    from medxfer.finetune import run_id_for
    from medxfer.records import read_record, run_dir
    from medxfer.sweep.backends import RunJob, run_process_pool

    configs = [parse_config({**TINY_RUN, "seed": seed}, RunConfig) for seed in range(6)]
    jobs = [RunJob(run_id_for(c), c, str(tmp_path), run_fn=killed_at_seed_1) for c in configs]
    outcomes = []
    run_process_pool(jobs, outcomes.append, workers=2)
    by_seed = {c.seed: next(o for o in outcomes if o.run_id == run_id_for(c)) for c in configs}
    assert len(outcomes) == 6
    assert by_seed[1].status == "failed" and "killed by SIGKILL" in by_seed[1].error
    error = read_record(run_dir(tmp_path, run_id_for(configs[1])) / "error.json")
    assert "killed by SIGKILL" in error["error"]
    assert all(by_seed[s].status == "done" for s in (0, 2, 3, 4, 5))
    assert all((run_dir(tmp_path, run_id_for(configs[s])) / "result.json").is_file() for s in (0, 2, 3, 4, 5))


# --- item 9: a Ray address where nothing listens ---------------------------------------------------------


def test_a_ray_address_with_nothing_listening_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Item 9: `--address 127.0.0.1:6399` with no cluster was still retrying after 590 s, having written a
    lock and a sweep record."""
    import socket

    with socket.socket() as probe:  # a free loopback port: bound, then closed, so nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    grid = write_yaml(tmp_path / "grid.yaml", {"name": "ray", "base": TINY_RUN, "axes": {"seed": [0, 1]}})
    started = time.perf_counter()
    code = main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--backend", "ray",
                 "--address", f"127.0.0.1:{port}"])
    assert code == 2 and time.perf_counter() - started < 30
    assert f"--address 127.0.0.1:{port}: no Ray cluster reachable there" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# --- item 17: following the advice into the same folder ---------------------------------------------------


@pytest.mark.slow
def test_a_pretraining_that_failed_before_its_first_checkpoint_does_not_lock_the_folder(tmp_path, capsys):
    """Item 17: after a diverged pretraining, the rerun with a lower lr into the same --out was refused as
    "another config"."""
    from medxfer.config import PretrainConfig, parse_config
    from medxfer.errors import TrainingDiverged
    from medxfer.pretraining import read_checkpoints, run_pretraining

    def config(**train):
        return parse_config({**TINY_PRETRAIN, "schedule": {"lengths": [0, 6]},
                             "train": {**TINY_PRETRAIN["train"], "log_every_n_steps": 1, **train}},
                            PretrainConfig, source="test")

    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged):
        run_pretraining(config(lr=1e8), out)
    assert [c.length for c in read_checkpoints(out)] == [0]  # nothing trained was kept
    result = run_pretraining(config(lr=1e-3), out)  # the advice followed, same folder
    assert result.record["status"] == "done" and [c.length for c in read_checkpoints(out)] == [0, 6]
    # a folder with trained checkpoints stays its config's, and the message says how to go on
    config_file = write_yaml(tmp_path / "other.yaml", {**TINY_PRETRAIN, "schedule": {"lengths": [0, 6]},
                                                      "seed": 7})
    capsys.readouterr()  # Lightning's banners of the runs above
    assert main(["pretrain", str(config_file), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "another config" in line and "up to length 6" in line and "delete this one to start over" in line


def test_the_folder_guard_replaces_only_a_run_without_trained_checkpoints(tmp_path):
    """Item 17, the rule itself: another config's folder holding only its length-0 (untrained) checkpoint
    is taken over; one holding a trained checkpoint is refused with how to go on."""
    from medxfer.config import PretrainConfig, parse_config
    from medxfer.models import build_segmenter
    from medxfer.models.weights import save_encoder
    from medxfer.pretraining.checkpoints import CONFIG_FILE, checkpoint_path, guard_folder, read_checkpoints

    config = parse_config(TINY_PRETRAIN, PretrainConfig, source="test")
    model = build_segmenter({"preset": "unet", "width": 4, "depth": 3, "in_channels": 1, "n_classes": 2})
    out = tmp_path / "out"
    guard_folder(out, config, "first")
    save_encoder(model, checkpoint_path(out, 0), length=0)
    (out / "lightning").mkdir()
    (out / "lightning" / "last.ckpt").write_bytes(b"the failed run's resume state")
    guard_folder(out, config, "second")  # the first failed before training anything: replaced
    assert json.loads((out / CONFIG_FILE).read_text())["config_hash"] == "second"
    assert read_checkpoints(out) == [] and not (out / "lightning").exists()
    save_encoder(model, checkpoint_path(out, 3), length=3)
    with pytest.raises(ConfigError, match="up to length 3; use another output folder, or delete this one"):
        guard_folder(out, config, "third")


# --- items 6, 10, 14: analyze on hostile tables ---------------------------------------------------------


def _analyze_tables(lengths=(0, 10, 20, 40), seeds=(0, 1, 2), levels=(1, 2)):
    """A small downstream table and its robustness scores (two datasets, one encoder)."""
    rng = np.random.default_rng(0)
    down, rob = [], []
    for dataset in ("ACDC", "COVIDQUDataset"):
        for n in lengths:
            for seed in seeds:
                down.append({"model": "basic U-Net", "dataset": dataset, "pretraining length": n, "seed": seed,
                             "freeze encoder": False, "pretraining scheme": "advanced",
                             "dice index": 0.7 + 0.001 * n + 0.01 * rng.random()})
            for level in levels:
                for pooled in (True, False):
                    rob.append({"dataset": dataset, "metric": "cosine", "margin": 0.5, "encoder": "u-net_encoder",
                                "pretraining_scheme": "advanced_training", "pooled": pooled, "level": level,
                                "pretraining_length": n, "robustness": rng.random()})
    return pd.DataFrame(down), pd.DataFrame(rob)


def test_analyze_leaves_out_a_row_whose_level_is_no_number_and_says_so(tmp_path):
    """Item 6: `level: top` became level -1, a variant of its own averaging levels 1 and 2."""
    from medxfer.report.analyze import analyze

    down, rob = _analyze_tables()
    top = rob[rob["level"] == 1].assign(level="top")
    result = analyze(down, pd.concat([rob, top], ignore_index=True), figures=False, n_resamples=20,
                     out_dir=tmp_path)
    variants = {v for g in result.groups for v in g.scores}
    assert variants == {f"cosine margin=0.5 level={lv} {p}" for lv in (1, 2) for p in ("pooled", "flat")}
    quality = pd.read_csv(tmp_path / "data_quality.csv")
    row = quality[quality["check"] == "unreadable level"]
    assert len(row) == 1 and row["where"].iloc[0] == f"{len(top)} row(s)" and "'top'" in row["detail"].iloc[0]


def test_analyze_leaves_out_infinite_dice_and_scores_and_reports_them(tmp_path, capsys):
    """Item 14: +inf Dice or -inf scores ended in a ValueError from scikit-learn."""
    down, rob = _analyze_tables()
    down.loc[3, "dice index"] = np.inf
    rob.loc[[2, 5], "robustness"] = -np.inf
    down.to_csv(tmp_path / "results.csv", index=False)
    rob.to_csv(tmp_path / "robustness.csv", index=False)
    code = main(["analyze", "--downstream", str(tmp_path / "results.csv"), "--robustness",
                 str(tmp_path / "robustness.csv"), "--out", str(tmp_path / "analysis")])
    assert code == 0, capsys.readouterr().err
    quality = pd.read_csv(tmp_path / "analysis" / "data_quality.csv")
    infinite = quality[quality["check"] == "infinite value"].set_index("table")["where"].to_dict()
    assert infinite == {str(tmp_path / "results.csv"): "1 row(s)", str(tmp_path / "robustness.csv"): "2 row(s)"}


def test_analyze_of_many_variants_finishes_printing_progress(tmp_path, capsys):
    """Item 10: 25,000 variants had not finished after 240 s, printing nothing; 1,002 were refused. The
    per-variant work is vectorised now: 1,002 variants x 4 lengths x 2 datasets finish in seconds of CPU
    time, and the stages print as plain lines off a terminal."""
    down, rob = _analyze_tables(levels=range(1, 502))
    down.to_csv(tmp_path / "results.csv", index=False)
    rob.to_csv(tmp_path / "robustness.csv", index=False)
    started = time.process_time()  # CPU time: the wall clock of a shared machine says more about the others
    assert main(["analyze", "--downstream", str(tmp_path / "results.csv"), "--robustness",
                 str(tmp_path / "robustness.csv"), "--out", str(tmp_path / "analysis")]) == 0
    assert time.process_time() - started < 40  # ~6 s; before, refused (and 500 variants took 48 s)
    out = capsys.readouterr().out
    assert "analyze: read 24 downstream and 8016 score rows" in out
    assert "analyze: 2 groups, 1002 score variants: evaluating" in out and "analyze: rules: " in out
    decisions = pd.read_csv(tmp_path / "analysis" / "decisions.csv")
    assert decisions["rule"].str.endswith("level=501 flat | argmin").sum() == 2  # every variant, every group


def test_analyze_warns_about_many_variants_and_refuses_too_many(tmp_path, monkeypatch, caplog, capsys):
    """Item 10, the bounds: above MANY_VARIANTS a warning; above MAX_VARIANTS one line at once, nothing
    written (the limits are lowered here: the real ones are 5,000 and 50,000)."""
    import medxfer.report.analyze.inputs as inputs

    down, rob = _analyze_tables(levels=range(1, 6))  # 10 variants
    down.to_csv(tmp_path / "results.csv", index=False)
    rob.to_csv(tmp_path / "robustness.csv", index=False)
    command = ["analyze", "--downstream", str(tmp_path / "results.csv"), "--robustness",
               str(tmp_path / "robustness.csv"), "--out", str(tmp_path / "analysis")]
    monkeypatch.setattr(inputs, "MANY_VARIANTS", 8)
    with caplog.at_level(logging.WARNING, logger="medxfer.report.analyze.inputs"):
        assert main(command) == 0
    assert "10 score variants (the reference study has 150): analyze takes minutes" in caplog.text
    capsys.readouterr()
    monkeypatch.setattr(inputs, "MAX_VARIANTS", 9)
    assert main([*command[:-1], str(tmp_path / "refused")]) == 2
    assert "robustness.csv: 10 score variants, more than the 9 analyze evaluates" in one_error_line(capsys)
    assert not (tmp_path / "refused").exists()


# --- item 1: a reused score folder ---------------------------------------------------------------------


def _score_setup(tmp_path, lengths=(0, 1, 2)):
    from medxfer.models.encoders import UNetEncoder
    from medxfer.models.weights import save_encoder

    folder = tmp_path / "checkpoints"
    for length in lengths:
        torch.manual_seed(length)
        save_encoder(UNetEncoder(3, width=2, depth=2), folder / f"encoder_len{length:04d}.pt", length=length,
                     scheme="simple")
    return folder


SCORE_YAML = ("data: {name: demo, options: {domain: B}}\ncheckpoints: checkpoints\nn_images: 4\n"
              "crop_size: [32, 32]\nbootstrap: 0\nmetrics: [l2]\nmargins: [0.5]\npooled: [true]\n"
              "stop: {rule: argmin, metric: l2, margin: 0.5, level: -1, pooled: true}\n")


def test_a_score_folder_holds_one_config_and_its_outputs_as_one_set(tmp_path, capsys):
    """Item 1: a second score into the same --out left the first one's baselines.csv beside the new
    robustness.csv; a score whose stop variant was not scored overwrote robustness.csv, kept the old
    recommendation.json and exited 2."""
    from medxfer.transferability.scoring import load_score_config, run_score

    _score_setup(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "score.yaml").write_text(SCORE_YAML)
    first = run_score(load_score_config(tmp_path / "score.yaml"), out)
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"robustness.csv", "recommendation.json", "score_config.json"} <= set(written)
    # another config (here: its stop variant is not scored) into the same folder: refused, nothing touched
    (tmp_path / "other.yaml").write_text(SCORE_YAML.replace("margin: 0.5, level", "margin: 0.25, level"))
    assert main(["score", str(tmp_path / "other.yaml"), "--out", str(out)]) == 2
    assert "holds the scores of another score config" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == written
    # ... and into a fresh folder: refused before anything is written
    assert main(["score", str(tmp_path / "other.yaml"), "--out", str(tmp_path / "fresh")]) == 2
    assert "is not among the scored variants" in one_error_line(capsys)
    assert not (tmp_path / "fresh").exists()
    # the same config again: the set is rewritten whole (a stale file of it would be removed)
    (out / "baselines.csv").write_text("left over\n")
    again = run_score(load_score_config(tmp_path / "score.yaml"), out)
    assert not (out / "baselines.csv").exists()
    pd.testing.assert_frame_equal(again.table.drop(columns="time_s"), first.table.drop(columns="time_s"))


def test_an_interrupted_score_resumes_from_its_last_scored_checkpoint(tmp_path, monkeypatch):
    """Item 1: `score` resumes per checkpoint (and holds the folder's lock meanwhile)."""
    import medxfer.transferability.scoring as scoring
    from medxfer.errors import FolderInUse

    _score_setup(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "score.yaml").write_text(SCORE_YAML)
    config = scoring.load_score_config(tmp_path / "score.yaml")
    real, scored = scoring.score_checkpoint, []

    def interrupted_at_the_third(encoder, images, config, progress=False):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(1)
        return real(encoder, images, config, progress=progress)

    monkeypatch.setattr(scoring, "score_checkpoint", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        scoring.run_score(config, out)
    assert not (out / "robustness.csv").exists()  # nothing of a half-done set
    monkeypatch.setattr(scoring, "score_checkpoint", lambda *a, **k: scored.append(1) or real(*a, **k))
    result = scoring.run_score(config, out)
    assert len(scored) == 3  # only the third checkpoint was scored again
    assert sorted(result.table["pretraining_length"].unique()) == [0, 1, 2]
    assert not list(out.glob(".score-partial-*"))
    with folder_lock(out, "score folder"):
        with pytest.raises(FolderInUse):
            scoring.run_score(config, out)


# --- item 7: a resumed run is exact, and says it was resumed -----------------------------------------------


class _KilledAtStep:
    """Raises (as a kill would end the process) when training reaches ``step``."""

    def __new__(cls, step: int):
        import lightning as L

        class Killed(L.Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == step:
                    raise RuntimeError(f"killed at step {step}")

        return Killed()


@pytest.mark.parametrize("sampling,augment", [("with_replacement", True), ("epochs", "nnunet")])
def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path, sampling, augment):
    """Item 7: a run resumed mid-epoch ended at another Dice (0.897 vs 0.886): it restarted the epoch with a
    new batch order and new augmentation draws. Now batches and item seeds come from (seed, epoch) and the
    loader's position is in last.ckpt, so the resumed run's weights equal the uninterrupted run's exactly."""
    from medxfer.config import RunConfig, parse_config
    from medxfer.finetune import run_finetune

    # 6 training images at batch 4: 2 steps an epoch; a checkpoint after every step; killed at step 3
    # (mid-way through the second epoch) and resumed
    # no validation: the last weights are evaluated (the best-by-validation ones could predate the kill)
    data = {**TINY_RUN["data"], "train_images": 6, "augment": augment, "val_fraction": 0.0}
    config = parse_config({**TINY_RUN, "data": data,
                           "train": {**TINY_RUN["train"], "max_steps": 6, "sampling": sampling, "lr": 1e-2,
                                     "checkpoint_every_s": 1e-9, "threads": 1}}, RunConfig)
    plain = run_finetune(config, tmp_path / "plain")
    with pytest.raises(RuntimeError, match="killed at step 3"):
        run_finetune(config, tmp_path / "resumed", callbacks=[_KilledAtStep(3)])
    resumed = run_finetune(config, tmp_path / "resumed")
    assert resumed.record["resumed_at_steps"] == [3] and resumed.record["steps_trained"] == 6
    weights = [torch.load(run.run_dir / "model.pt", weights_only=True) for run in (plain, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.dumps(resumed.record["metrics"]) == json.dumps(plain.record["metrics"])  # NaN-safe, exact


def test_an_epoch_s_batches_depend_on_the_seed_and_epoch_only():
    """Item 7, the sampler: the loader's position survives a state_dict round trip, and a loader that
    resumes at (epoch, batch) hands out what a fresh one hands out from there on."""
    from medxfer.data.sampling import EpochSeededSampler, ResumableDataLoader

    class Echo(torch.utils.data.Dataset):  # an item is its (index, seed) pair
        def __len__(self):
            return 10

        def __getitem__(self, item):
            return item

    def loader():
        return ResumableDataLoader(Echo(), EpochSeededSampler(10, 7, replacement=True, num_samples=12), 4,
                                   collate_fn=lambda batch: batch)

    fresh = loader()
    epochs = [list(fresh) for _ in range(3)]
    assert fresh.state_dict() == {"epoch": 3, "batches": 0} and len(epochs[0]) == 3
    assert epochs[0] != epochs[1] and all(isinstance(pair, tuple) for pair in epochs[0][0])
    stopped = loader()
    stream = iter(stopped)
    [next(stream) for _ in range(2)]
    state = stopped.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    again = loader()  # from epoch 0, batch 2 on (then epochs 1 and 2)
    again.load_state_dict(state)
    assert [list(again) for _ in range(3)] == [epochs[0][2:], epochs[1], epochs[2]]
    assert EpochSeededSampler(10, 7).epoch_items(0) != EpochSeededSampler(10, 8).epoch_items(0)


@pytest.mark.slow
def test_a_resumed_run_records_the_step_it_resumed_at(tmp_path):
    """Item 7: a run resumed mid-way ended at another Dice than the uninterrupted one, and result.json did
    not say it was resumed."""
    import lightning as L

    from medxfer.config import RunConfig, parse_config
    from medxfer.finetune import run_finetune

    class CtrlCAtStep2(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 2:  # after the first epoch's resume checkpoint
                raise KeyboardInterrupt

    config = parse_config({**TINY_RUN, "train": {**TINY_RUN["train"], "batch_size": 2, "max_steps": 4,
                                                  "checkpoint_every_s": None}}, RunConfig)
    assert run_finetune(config, tmp_path / "plain").record["resumed_at_step"] is None
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, tmp_path / "out", callbacks=[CtrlCAtStep2()])
    record = run_finetune(config, tmp_path / "out").record
    assert record["resumed_at_step"] == 2 and record["resumed_at_steps"] == [2]
    assert record["steps_trained"] == 4


def test_every_resume_of_a_run_is_counted_until_it_starts_afresh(tmp_path):
    """Item 7, the bookkeeping: each resume adds its step; a fresh start (no usable checkpoint) clears them."""
    from medxfer.finetune import note_resume

    last = tmp_path / "last.ckpt"
    for step, expected in ((3, [3]), (5, [3, 5])):
        torch.save({"global_step": step, "state_dict": {}}, last)
        assert note_resume(tmp_path, last) == expected
    assert note_resume(tmp_path, None) == [] and note_resume(tmp_path, None) == []
