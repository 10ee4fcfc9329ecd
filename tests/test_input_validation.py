"""Invalid config values and silently accepted inputs are one-line errors naming the file and key
(#18.10, #18.14)."""

import json

import pytest
import torch

from medxfer.cli import main
from medxfer.config import MAX_YAML_NODES, PretrainConfig, RunConfig, load_config
from medxfer.errors import CheckpointError, ConfigError


def _load(tmp_path, text, model=RunConfig):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, model)


@pytest.mark.parametrize("text, key", [
    ("seed: -1", "seed"),
    (f"seed: {2**70}", "seed"),
    ("train: {num_workers: -1}", "train.num_workers"),
    ("train: {precision: banana}", "train.precision"),
    ("train: {accelerator: banana}", "train.accelerator"),
    ("train: {max_steps: -5}", "train.max_steps"),
    ("train: {max_steps: 0}", "train.max_steps"),
    ("train: {early_stopping_patience: -1}", "train.early_stopping_patience"),
    ("data: {patch_size: [0, 0]}", "data.patch_size"),
    ("data: {patch_size: [32, 32, 32]}", "data"),  # 3D patch on 2D data
    ("data: {resize: [40000, 40000]}", "data.resize"),
    ("data: {percentile_clip: [-10, 200]}", "data.percentile_clip"),
    ("model: {width: 100000}", "model.width"),
])
def test_invalid_run_values_are_one_line_errors(tmp_path, text, key):
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'c.yaml'}: {key}") and "\n" not in message


def test_pretraining_values_are_checked_too(tmp_path):
    for text, key in (("train: {precision: banana}", "train.precision"), ("seed: -3", "seed"),
                      ("train: {accelerator: gpus}", "train.accelerator")):
        with pytest.raises(ConfigError, match=key):
            _load(tmp_path, text, PretrainConfig)


def test_valid_values_still_load(tmp_path):
    config = _load(tmp_path, "seed: 4294967295\ntrain: {precision: 16, accelerator: cpu, max_steps: 3}\n"
                             "data: {spatial_dims: 3, patch_size: [16, 32, 32], percentile_clip: [0, 100]}\n")
    assert config.train.precision == "16" and config.data.patch_size == [16, 32, 32]


def test_empty_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="empty config file"):
        _load(tmp_path, "")


def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: line 3: duplicate key 'train' \(first on line 1\)"):
        _load(tmp_path, "train: {lr: 0.1}\nseed: 1\ntrain: {lr: 0.2}\n")
    # keys merged in with "<<" may be overridden: that is what merges are for
    from medxfer.config import safe_load_yaml

    assert safe_load_yaml("base: &b {lr: 0.1, max_steps: 2}\ntrain:\n  <<: *b\n  lr: 0.2\n")["train"] == \
        {"lr": 0.2, "max_steps": 2}


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):  # 10**9 values once expanded, a few hundred bytes on disk
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(ConfigError, match=f"over {MAX_YAML_NODES}"):
        _load(tmp_path, "\n".join(lines) + "\n")


def test_accelerator_gpu_without_one_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "run.yaml"
    config.write_text("train: {accelerator: gpu, max_steps: 1}\n")
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.accelerator" in err and "no CUDA GPU" in err and "\n" not in err
    assert not (tmp_path / "out" / "runs").exists()


def test_nan_weights_are_refused_naming_the_file(tmp_path):
    from medxfer.config import ModelConfig
    from medxfer.inference import load_trained_model
    from medxfer.models import build_segmenter
    from medxfer.models.weights import save_model_weights

    spec = ModelConfig(preset="unet", width=4, depth=3, in_channels=1, n_classes=2).model_dump(mode="json")
    model = build_segmenter(spec)
    with torch.no_grad():
        next(model.encoder.parameters()).fill_(float("nan"))
    save_model_weights(model, tmp_path / "model.pt", manifest={"model": spec})
    with pytest.raises(CheckpointError, match=r"model\.pt: weights contain NaN"):
        load_trained_model(tmp_path)


def test_absurd_width_in_model_json_is_refused(tmp_path):
    from medxfer.config import ModelConfig
    from medxfer.inference import load_trained_model
    from medxfer.models import build_segmenter
    from medxfer.models.weights import save_model_weights

    spec = ModelConfig(preset="unet", width=4, depth=3, in_channels=1, n_classes=2).model_dump(mode="json")
    save_model_weights(build_segmenter(spec), tmp_path / "model.pt", manifest={"model": spec})
    manifest = json.loads((tmp_path / "model.json").read_text())
    manifest["model"]["width"] = 200000
    (tmp_path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.json: width") as error:
        load_trained_model(tmp_path)
    assert "\n" not in str(error.value)


def test_finetune_from_a_nan_encoder_names_the_file_and_leaves_no_run(tmp_path, capsys):
    from medxfer.config import ModelConfig
    from medxfer.models import build_segmenter, save_encoder

    model = build_segmenter(ModelConfig(preset="unet", width=4, depth=3, in_channels=1, n_classes=2)
                            .model_dump(mode="json"))
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.fill_(float("nan"))
    encoder = save_encoder(model, tmp_path / "nan_encoder.pt", length=1)
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{name: demo, train_images: 4}}\nmodel: {{preset: unet, width: 4, depth: 3}}\n"
                      f"pretrained: {{checkpoint: {encoder}}}\ntrain: {{max_steps: 1}}\n")
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nan_encoder.pt" in err and "NaN" in err and "\n" not in err
    assert not any((tmp_path / "out").rglob("result.json"))


def test_pretraining_with_accelerator_gpu_without_one_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "pretrain.yaml"
    config.write_text("train: {accelerator: cuda}\nschedule: {lengths: [0, 1]}\n")
    assert main(["pretrain", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.accelerator" in err and "no CUDA GPU" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
