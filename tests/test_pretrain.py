"""Pretraining with a checkpoint schedule: classification on the embedded stand-in, resume, hooks,
sparse-label 3D segmentation pretraining, and downstream runs starting from its checkpoints."""

import json

import numpy as np
import pytest
import torch

from medxfer.config import PretrainConfig, RunConfig, parse_config
from medxfer.errors import ConfigError
from medxfer.models.weights import encoder_from_checkpoint, list_checkpoints, read_state_dict
from medxfer.pretraining import prepare_pretraining, resolve_model_checkpoint, resolve_recipe, run_pretraining
from medxfer.training.tasks import scheduled_lr_factor

MANIFEST_FIELDS = ("pretraining_length", "length_unit", "val_accuracy", "scheme", "architecture", "dataset", "seed")


def classification_config(**overrides):
    base = {
        "model": {"preset": "unet", "width": 4, "depth": 3},
        "classification": {"n_per_class": 10, "val_per_class": 5},
        "schedule": {"unit": "epoch", "lengths": [0, 1, 2, 3]},
        "train": {"batch_size": 32, "resume_every_n_steps": 2},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(base, PretrainConfig)


def checkpoint_files(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_classification_pretraining_learns_and_saves_the_schedule(tmp_path):
    config = classification_config(
        model={"width": 8, "depth": 4},
        classification={"n_per_class": 40, "val_per_class": 20},
        schedule={"lengths": [0, 1, 2, 4]},
    )
    result = run_pretraining(config, tmp_path)
    assert checkpoint_files(tmp_path) == [f"encoder_len{n:04d}.{ext}" for n in (0, 1, 2, 4) for ext in ("json", "pt")]
    assert result.lengths == [0, 1, 2, 4]
    listed = list_checkpoints(tmp_path / "checkpoints")
    assert [n for n, _, _ in listed] == [0, 1, 2, 4]
    steps_per_epoch = 400 // 32  # drop_last
    for length, path, manifest in listed:
        for name in MANIFEST_FIELDS:
            assert name in manifest, name
        assert manifest["pretraining_length"] == manifest["length"] == length
        assert manifest["length_unit"] == "epoch" and manifest["scheme"] == "simple"
        assert manifest["architecture"] == "unet" and manifest["dataset"] == "natural" and manifest["seed"] == 0
        assert manifest["epoch"] == length and manifest["step"] == length * steps_per_epoch
    # 10 classes: chance is 0.1; a few epochs of a tiny U-Net encoder must do clearly better.
    final = result.checkpoints[-1].val_accuracy
    assert final > 0.3, [c.val_accuracy for c in result.checkpoints]
    # The checkpoints are distinct states: the random init differs from the trained encoder.
    first, last = (read_state_dict(c.path) for c in (result.checkpoints[0], result.checkpoints[-1]))
    assert not torch.equal(first["levels.0.block.0.weight"], last["levels.0.block.0.weight"])
    encoder = encoder_from_checkpoint(result.checkpoints[-1].path)
    assert encoder.channels == [8, 16, 32, 64] and encoder.in_channels == 3
    # The record says what was done; the resume checkpoint is gone once the run is finished.
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["status"] == "done" and [c["length"] for c in record["checkpoints"]] == [0, 1, 2, 4]
    assert record["epochs_trained"] == 4 and not (tmp_path / "lightning").exists()
    # A finished run is returned as is, without training or rewriting anything.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    again = run_pretraining(config, tmp_path)
    assert again.lengths == [0, 1, 2, 4]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()} == before


@pytest.mark.parametrize("unit, lengths", [("epoch", [0, 1, 2, 3]), ("step", [0, 3, 5, 7])])
def test_resume_after_interrupt_gives_the_same_checkpoint_set(tmp_path, unit, lengths):
    config = classification_config(schedule={"unit": unit, "lengths": lengths})
    reference = run_pretraining(config, tmp_path / "reference")

    calls = []

    def interrupt_at_third(length, encoder, manifest):
        calls.append(length)
        if length == lengths[2]:
            raise RuntimeError("simulated interrupt")
        return {"probe": length}

    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated interrupt"):
        run_pretraining(config, out, hooks=[interrupt_at_third])
    assert calls == lengths[:3]
    assert (out / "lightning" / "last.ckpt").is_file()
    saved_before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert sorted(saved_before) == [f"encoder_len{n:04d}.{e}" for n in lengths[:2] for e in ("json", "pt")]

    resumed_calls = []
    result = run_pretraining(config, out, hooks=[lambda n, enc, m: resumed_calls.append(n) or {"probe": n}])
    assert resumed_calls == lengths[2:]  # hooks are not run again for checkpoints on disk
    assert checkpoint_files(out) == checkpoint_files(tmp_path / "reference")
    assert result.lengths == reference.lengths == lengths
    # Existing checkpoint files were not rewritten; the steps/epochs of every checkpoint match the reference.
    for name, mtime in saved_before.items():
        assert (out / "checkpoints" / name).stat().st_mtime_ns == mtime
    assert [c.manifest["step"] for c in result.checkpoints] == [c.manifest["step"] for c in reference.checkpoints]
    assert [c.manifest["probe"] for c in result.checkpoints] == lengths
    assert result.record["steps_trained"] == reference.record["steps_trained"]


def test_hooks_can_stop_and_must_not_clash(tmp_path):
    def stop_after_one(length, encoder, manifest):
        assert not encoder.training  # hooks see the encoder in eval mode
        assert manifest["pretraining_length"] == length and "val_accuracy" in manifest
        return {"score": float(length), "stop": length == 1}

    class ScoreCallback:  # any callback with on_checkpoint is a hook too
        def __init__(self):
            self.seen = []

        def on_checkpoint(self, length, encoder, manifest):
            self.seen.append(length)

    import lightning as L

    class LightningScore(L.Callback, ScoreCallback):
        pass

    callback = LightningScore()
    callback.__init__()
    result = run_pretraining(classification_config(), tmp_path / "stop", callbacks=[callback], hooks=[stop_after_one])
    assert result.lengths == [0, 1] and callback.seen == [0, 1]
    assert result.record["status"] == "stopped" and result.record["stopped_at"] == 1
    assert result.checkpoints[1].manifest["stop_requested"] is True
    assert result.checkpoints[1].manifest["score"] == 1.0
    assert result.record["checkpoints"][1]["hooks"] == {"score": 1.0}

    with pytest.raises(ConfigError, match="val_accuracy"):
        run_pretraining(classification_config(), tmp_path / "clash", hooks=[lambda n, e, m: {"val_accuracy": 1.0}])


def test_classification_checkpoint_starts_a_downstream_run(tmp_path):
    from medxfer.finetune import run_finetune

    pretrained = run_pretraining(classification_config(schedule={"lengths": [0, 1]}), tmp_path / "pretrain")
    config = parse_config({
        "data": {"name": "demo", "options": {"domain": "B"}, "train_images": 2},  # grayscale: RGB conv adapted
        "model": {"preset": "unet", "width": 4, "depth": 3},
        "pretrained": {"checkpoint": str(tmp_path / "pretrain" / "checkpoints"), "length": 1, "load": "encoder"},
        "train": {"max_steps": 2, "batch_size": 2},
    }, RunConfig)
    info = run_finetune(config, tmp_path / "runs").record["pretraining"]
    assert info["length"] == 1 and info["scheme"] == "simple" and info["load"] == "encoder"
    assert info["accuracy"] == pretrained.checkpoints[1].val_accuracy
    with pytest.raises(Exception, match="whole-model"):
        resolve_model_checkpoint(tmp_path / "pretrain", 1)  # classification saves encoders only


def test_one_folder_holds_one_config(tmp_path):
    run_pretraining(classification_config(schedule={"lengths": [0]}), tmp_path)
    assert checkpoint_files(tmp_path) == ["encoder_len0000.json", "encoder_len0000.pt"]
    with pytest.raises(ConfigError, match="another config"):
        run_pretraining(classification_config(schedule={"lengths": [0]}, seed=1), tmp_path)


def test_schemes_and_schedule():
    simple = resolve_recipe(classification_config())
    advanced = resolve_recipe(classification_config(scheme="advanced"))
    assert simple["optimizer"] == "sgd" and simple["label_smoothing"] == 0.0 and simple["warmup_fraction"] == 0.0
    assert advanced["label_smoothing"] == 0.1 and advanced["warmup_fraction"] > 0 and advanced["weight_decay"] > 0
    assert advanced["augmentation"] == "advanced" and advanced["auto_augment"] == "trivial"
    overridden = resolve_recipe(classification_config(scheme="advanced", train={"label_smoothing": 0.0, "lr": 0.01}))
    assert overridden["label_smoothing"] == 0.0 and overridden["lr"] == 0.01 and overridden["optimizer"] == "adamw"
    with pytest.raises(ConfigError, match="schedule.lengths"):
        classification_config(schedule={"lengths": [1, 1]})

    total, warmup = 100, 10
    factors = [scheduled_lr_factor(s, total, "cosine", warmup) for s in range(total)]
    assert all(a < b for a, b in zip(factors[:warmup], factors[1:warmup]))  # linear warm-up rises
    assert factors[warmup - 1] == 1.0 and factors[warmup] == 1.0
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:])) and factors[-1] < 0.01
    steps = [scheduled_lr_factor(s, total, "step") for s in (0, 49, 50, 74, 75, 99)]
    assert steps == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


# --------------------------------------------------------------------------------------------------
# Sparse-label segmentation pretraining (3D) and downstream runs from it

N_CASES, SIDE, N_FOREGROUND = 8, 16, 3


def write_sparse_msd(root, seed=0):
    """8 volumes 16^3, 3 foreground cubes each (distinct intensities); every case annotates 1 or 2 of
    the 3 classes and its label map leaves the others unlabelled (0), as real sparse data does."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    annotated = {}
    for case in range(N_CASES):
        image = rng.normal(0.0, 0.3, (SIDE, SIDE, SIDE)).astype(np.float32)
        full = np.zeros((SIDE, SIDE, SIDE), np.uint8)
        for k in range(1, N_FOREGROUND + 1):
            x, y, z = rng.integers(0, SIDE - 5, size=3)
            full[x:x + 5, y:y + 5, z:z + 5] = k
        image += np.array([0.0, 2.0, -2.0, 4.0], np.float32)[full]
        classes = sorted(rng.choice(np.arange(1, N_FOREGROUND + 1), size=1 + case % 2, replace=False).tolist())
        label = np.where(np.isin(full, classes), full, 0).astype(np.uint8)
        name = f"case{case:02d}"
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
        annotated[name] = classes
    (root / "dataset.json").write_text(json.dumps({
        "name": "sparse3d", "labels": {"0": "background", "1": "bright", "2": "dark", "3": "brighter"},
        "modality": {"0": "MR"}, "annotated_classes": annotated,
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in annotated],
    }))
    return annotated


def segmentation_config(root, **train):
    return parse_config({
        "task": "segmentation",
        "model": {"preset": "unet3d", "width": 4, "depth": 3},
        "data": {"name": "msd", "root": str(root), "spatial_dims": 3, "options": {"test_fraction": 0.25}},
        "schedule": {"unit": "epoch", "lengths": [0, 1, 3]},
        "train": {"batch_size": 2, "optimizer": "adam", "lr": 0.01, **train},
    }, PretrainConfig)


@pytest.fixture(scope="module")
def sparse_pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse3d")
    annotated = write_sparse_msd(root / "data")
    out = root / "pretrain"
    result = run_pretraining(segmentation_config(root / "data"), out)
    return root / "data", out, result, annotated


def test_sparse_segmentation_pretraining_trains_and_saves_both_files(sparse_pretrained):
    _, out, result, _ = sparse_pretrained
    assert result.lengths == [0, 1, 3]
    assert sorted(p.name for p in (out / "models").glob("*.pt")) == [f"model_len{n:04d}.pt" for n in (0, 1, 3)]
    record = result.record
    assert record["task"] == "segmentation" and record["loss"] == "partial_dice_ce"
    assert record["annotation"]["partially_annotated_cases"] == record["n_train_images"] > 0
    manifests = [c.manifest for c in result.checkpoints]
    assert all(m["val_accuracy"] is None for m in manifests)
    assert all(m["val_dice"] is not None and 0.0 <= m["val_dice"] <= 1.0 for m in manifests)
    losses = [m["train_loss"] for m in manifests[1:]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_sparse_loss_ignores_unannotated_classes(sparse_pretrained):
    data_root, _, _, annotated = sparse_pretrained
    setup = prepare_pretraining(segmentation_config(data_root))
    batch = next(iter(setup.train_loader))
    mask = batch["annotated"]  # (N, 4) bool from Case.annotated
    assert mask.shape == (len(batch["image"]), N_FOREGROUND + 1) and bool(mask[:, 0].all())
    assert not bool(mask.all())  # every case misses at least one class
    torch.manual_seed(0)
    logits = torch.randn(len(batch["image"]), N_FOREGROUND + 1, SIDE, SIDE, SIDE)
    loss_fn = setup.module.loss_fn
    loss = loss_fn(logits, batch["label"], annotated=mask)
    # Moving probability between background and a class the case does not annotate changes nothing:
    # unlabelled voxels may be that class, so they are not counted as background.
    case = 0
    missing = [k for k in range(1, N_FOREGROUND + 1) if not mask[case, k]][0]
    present = [k for k in range(1, N_FOREGROUND + 1) if mask[case, k]][0]
    swapped = logits.clone()
    swapped[case, [0, missing]] = logits[case, [missing, 0]]
    assert float(loss_fn(swapped, batch["label"], annotated=mask)) == pytest.approx(float(loss), abs=1e-5)
    swapped = logits.clone()
    swapped[case, [0, present]] = logits[case, [present, 0]]
    assert abs(float(loss_fn(swapped, batch["label"], annotated=mask)) - float(loss)) > 1e-3
    # A loss that would count missing annotations as background is refused for sparse data.
    with pytest.raises(ConfigError, match="partial"):
        prepare_pretraining(segmentation_config(data_root, loss="dice_ce"))


@pytest.mark.parametrize("load", ["encoder", "full", "encoder_decoder"])
def test_downstream_run_starts_from_each_kind_of_base_model(sparse_pretrained, tmp_path, load):
    from medxfer.finetune import run_finetune

    data_root, out, result, _ = sparse_pretrained
    # Encoders: the checkpoint folder + length; whole models: the model file of that length.
    checkpoint = out / "checkpoints" if load == "encoder" else resolve_model_checkpoint(out / "checkpoints", 3)
    assert load == "encoder" or checkpoint == out / "models" / "model_len0003.pt"
    config = parse_config({
        "data": {"name": "msd", "root": str(data_root), "spatial_dims": 3, "options": {"test_fraction": 0.25}},
        "model": {"preset": "unet3d", "width": 4, "depth": 3},
        "pretrained": {"checkpoint": str(checkpoint), "length": 3, "load": load},
        # A frozen encoder and a vanishing learning rate: the loaded weights must still be there afterwards.
        "train": {"strategy": "frozen_encoder", "max_steps": 2, "batch_size": 2, "lr": 1e-9,
                  "loss": "partial_dice_ce"},
    }, RunConfig)
    run = run_finetune(config, tmp_path)
    info = run.record["pretraining"]
    assert info["load"] == load and info["length"] == 3 and run.record["steps_trained"] == 2
    assert info["accuracy"] is None  # segmentation pretraining records Dice, not accuracy
    final = read_state_dict(run.run_dir / "model.pt")
    base = read_state_dict(out / "models" / "model_len0003.pt")
    weights = [k for k in base if k.endswith("weight") and "running" not in k]
    encoder_keys = [k for k in weights if k.startswith("encoder.")]
    decoder_keys = [k for k in weights if k.startswith("decoder.")]
    head_keys = [k for k in weights if k.startswith("head.")]

    def same(keys):
        return all(torch.allclose(final[k], base[k], atol=1e-6) for k in keys)

    assert same(encoder_keys)
    assert same(decoder_keys) == (load in ("full", "encoder_decoder"))
    assert same(head_keys) == (load == "full")


@pytest.mark.parametrize("stop_early", [False, True])
def test_online_score_section_scores_every_checkpoint(tmp_path, stop_early):
    import pandas as pd

    online = {"data": {"name": "demo", "options": {"domain": "B"}}, "stop_early": stop_early,
              "settings": {"n_images": 4, "metrics": ["cosine"], "margins": [0.5], "pooled": [True],
                           # a rule that must fire at the second checkpoint: no gain can beat min_delta 10
                           "stop": {"rule": "patience", "patience": 1, "min_delta": 10.0}}}
    config = classification_config(schedule={"lengths": [0, 1, 2]}, online_score=online)
    result = run_pretraining(config, tmp_path)
    expected = [0, 1] if stop_early else [0, 1, 2]
    assert result.lengths == expected
    for checkpoint in result.checkpoints:
        assert 0.0 <= checkpoint.manifest["robustness"] <= 1.0 + 0.5
    table = pd.read_csv(tmp_path / "robustness_online.csv")
    assert sorted(table["pretraining_length"].unique().tolist()) == expected
    assert list(table.columns[:9]) == ["dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled",
                                       "level", "pretraining_length", "robustness"]
