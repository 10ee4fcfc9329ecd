"""Published 3D weights: MONAI networks (SwinUNETR, SegResNet, BasicUNet, DynUNet; checkpoints, bundles, the
self-supervised Swin weights) and the Models Genesis / SuPreM U-Net import into medxfer presets, every tensor arriving;
a file that does not fit is a one-line error naming the file and the first key that does not fit.

State dicts come from the real architectures with random weights: MONAI's own networks, and the Models Genesis /
SuPreM U-Net's key names and shapes (its ``unet3d.py``: four ``down_tr`` levels, three ``up_tr``, ``out_tr``).
Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medxfer.cli import app
from medxfer.data.patches import predict_logits
from medxfer.errors import CheckpointError
from medxfer.models import (
    InputShapeError,
    build_encoder,
    build_segmenter,
    encoder_from_checkpoint,
    freeze_encoder,
    load_encoder_weights,
    load_model_weights,
    read_manifest,
)
from medxfer.models.importing import import_weights
from medxfer.models.monai_networks import build_network, monai_key, network_kwargs

# preset -> (MONAI network, width, depth, input size: its smallest_input at least): tiny versions of each
MONAI_CASES = {
    "monai_swin_unetr": ("SwinUNETR", 12, 5, (64, 32, 32)),
    "monai_segresnet": ("SegResNet", 8, 3, (16, 16, 16)),
    "monai_basicunet": ("BasicUNet", 2, 5, (32, 16, 16)),
    "monai_dynunet": ("DynUNet", 4, 4, (16, 16, 16)),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def monai_network(preset: str, out_channels: int = 3) -> torch.nn.Module:
    network, width, depth, _ = MONAI_CASES[preset]
    net = build_network(network, 1, out_channels, 3, network_kwargs(network, width, depth, {}))
    with torch.no_grad():  # random values everywhere, norms and biases too, so a tensor left behind shows
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return net


def assert_encoder_holds(encoder_state: dict, source: dict, rename=lambda k: k) -> None:
    """Every tensor of the encoder equals the file's tensor of the same (renamed) key."""
    assert encoder_state
    for key, tensor in encoder_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(tensor, source[rename(key)]), key


@pytest.mark.parametrize("preset", sorted(MONAI_CASES))
@pytest.mark.parametrize("wrapping", ["plain", "lightning_ddp"])
def test_monai_checkpoints_import_every_encoder_tensor(tmp_path, preset, wrapping):
    network, width, depth, _ = MONAI_CASES[preset]
    state = monai_network(preset).state_dict()
    saved = state if wrapping == "plain" else {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(saved, tmp_path / "monai.pt")
    path = import_weights(tmp_path / "monai.pt", preset, tmp_path / "out", in_channels=1, width=width, depth=depth)
    manifest = read_manifest(path)
    imported = torch.load(path, weights_only=True)
    assert_encoder_holds(imported, state)
    assert manifest["tensors_loaded"] == sum(1 for k in imported if not k.endswith("num_batches_tracked")) \
        or manifest["tensors_loaded"] == len(imported)
    assert manifest["keys_dropped"] > 0  # the decoder and the output layer
    # the manifest rebuilds the encoder; a segmenter of the preset takes it
    rebuilt = encoder_from_checkpoint(path)
    assert_encoder_holds(rebuilt.state_dict(), state)
    model = build_segmenter(preset=preset, in_channels=1, n_classes=2, width=width, depth=depth)
    load_encoder_weights(model, path)
    assert_encoder_holds(model.encoder.state_dict(), state)


@pytest.mark.parametrize("preset", sorted(MONAI_CASES))
def test_monai_presets_compute_what_monai_computes(preset):
    """The split into encoder, decoder and head is MONAI's network: the same weights give the same logits."""
    network, width, depth, side = MONAI_CASES[preset]
    net = monai_network(preset).eval()
    model = build_segmenter(preset=preset, in_channels=1, n_classes=3, width=width, depth=depth).eval()
    source = net.state_dict()
    model.load_state_dict({k: source[monai_key(k, network)] for k in model.state_dict()})
    x = torch.randn(1, 1, *side)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)
    # the strategies see an encoder: frozen_encoder freezes it alone
    freeze_encoder(model, "all")
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in [*model.decoder.parameters(), *model.head.parameters()])


@pytest.mark.parametrize("preset", ["monai_segresnet", "monai_dynunet"])
def test_a_whole_monai_network_starts_a_run_with_its_decoder(tmp_path, preset):
    """pretrained.load full / encoder_decoder from a MONAI file: the same logits as MONAI's network (full), and
    everything but the output layer for new classes (encoder_decoder); SuPreM's backbone. prefix too."""
    network, width, depth, side = MONAI_CASES[preset]
    net = monai_network(preset).eval()
    state = net.state_dict()
    torch.save({"net": {**{f"module.backbone.{k}": v for k, v in state.items()},
                        "module.organ_embedding": torch.randn(3, 8)}}, tmp_path / "whole.pth")
    model = build_segmenter(preset=preset, in_channels=1, n_classes=3, width=width, depth=depth).eval()
    load_model_weights(model, tmp_path / "whole.pth")
    x = torch.randn(1, 1, *side)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)
    other = build_segmenter(preset=preset, in_channels=1, n_classes=5, width=width, depth=depth)
    load_model_weights(other, tmp_path / "whole.pth", head=False)
    assert_encoder_holds({k: v for k, v in other.state_dict().items() if not k.startswith("head.")}, state,
                         lambda k: monai_key(k, network))
    wrong = build_segmenter(preset=preset, in_channels=1, n_classes=5, width=width, depth=depth)
    with pytest.raises(CheckpointError, match=r"whole\.pth: does not fit this model: .*other shapes") as info:
        load_model_weights(wrong, tmp_path / "whole.pth")  # full: the output layer has 3 classes, not 5
    assert "\n" not in str(info.value)


def test_monai_bundle_folder_imports_with_its_name(tmp_path):
    state = monai_network("monai_segresnet").state_dict()
    bundle = tmp_path / "spleen_ct_segmentation"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    torch.save(state, bundle / "models" / "model.pt")
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "Spleen CT", "version": "0.5.9",
                                                                   "license": "Apache-2.0"}))
    path = import_weights(bundle, "monai_segresnet", tmp_path / "out", in_channels=1, width=8, depth=3)
    manifest = read_manifest(path)
    assert manifest["source"].startswith("MONAI bundle Spleen CT (version 0.5.9")
    assert manifest["label"] == "MONAI bundle Spleen CT" and manifest["licence"] == "Apache-2.0"
    assert_encoder_holds(torch.load(path, weights_only=True), state)


def test_self_supervised_swin_weights_load_the_transformer_and_leave_the_conv_blocks(tmp_path):
    """Tang et al.'s model_swinvit.pt: the Swin transformer alone, keys without swinViT., MLP layers fc1/fc2,
    pretraining heads beside it."""
    state = monai_network("monai_swin_unetr").state_dict()
    ssl = {f"module.{k.removeprefix('swinViT.').replace('.linear1.', '.fc1.').replace('.linear2.', '.fc2.')}": v
           for k, v in state.items() if k.startswith("swinViT.")}
    ssl["module.rotation_head.weight"] = torch.randn(4, 8)
    ssl["module.contrastive_head.weight"] = torch.randn(8, 8)
    torch.save({"state_dict": ssl}, tmp_path / "model_swinvit.pt")
    path = import_weights(tmp_path / "model_swinvit.pt", "monai_swin_unetr", tmp_path / "out", in_channels=1,
                          width=12)
    imported = torch.load(path, weights_only=True)
    transformer = {k: v for k, v in imported.items() if k.startswith("swinViT.")}
    assert_encoder_holds(transformer, state)
    manifest = read_manifest(path)
    assert manifest["tensors_left_at_init"] == sum(1 for k in imported if not k.startswith("swinViT."))
    assert manifest["keys_dropped"] == 2


# --------------------------------------------------------------------------------------------------
# Models Genesis / SuPreM


def genesis_layout(base: int = 32, n_class: int = 1) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the published Models Genesis / SuPreM UNet3D at base width ``base`` (published:
    32), from the architecture its papers and code describe."""
    shapes: dict[str, tuple[int, ...]] = {}

    def unit(prefix: str, cin: int, cout: int) -> None:  # LUConv: conv1 (bias) + bn1 (ContBatchNorm3d)
        shapes[f"{prefix}.conv1.weight"] = (cout, cin, 3, 3, 3)
        shapes[f"{prefix}.conv1.bias"] = (cout,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn1.{name}"] = (cout,)
        shapes[f"{prefix}.bn1.num_batches_tracked"] = ()

    cin = 1
    for i in range(4):
        mid = base * 2**i
        unit(f"down_tr{64 * 2**i}.ops.0", cin, mid)
        unit(f"down_tr{64 * 2**i}.ops.1", mid, 2 * mid)
        cin = 2 * mid
    for name, channels, level in (("up_tr256", 16 * base, 2), ("up_tr128", 8 * base, 1), ("up_tr64", 4 * base, 0)):
        shapes[f"{name}.up_conv.weight"] = (channels, channels, 2, 2, 2)
        shapes[f"{name}.up_conv.bias"] = (channels,)
        out = base * 2 ** (level + 1)
        unit(f"{name}.ops.0", channels + channels // 2, out)
        unit(f"{name}.ops.1", out, out)
    shapes["out_tr.final_conv.weight"] = (n_class, 2 * base, 1, 1, 1)
    shapes["out_tr.final_conv.bias"] = (n_class,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape)
            for k, shape in shapes.items()}


def genesis_name(key: str) -> str:
    """The published network's key of a genesis_unet3d encoder key."""
    level, rest = key.removeprefix("levels.").split(".", 1)
    return f"down_tr{64 * 2**int(level)}.{rest}"


def test_the_published_genesis_layout_fits_the_preset_at_width_32():
    with torch.device("meta"):
        encoder = build_encoder(preset="genesis_unet3d", in_channels=1)
    published = genesis_layout(32)
    assert encoder.channels == [64, 128, 256, 512] and encoder.strides == [1, 2, 4, 8]
    for key, tensor in encoder.state_dict().items():
        assert tuple(tensor.shape) == published[genesis_name(key)], key


@pytest.mark.parametrize("layout", ["models_genesis", "suprem"])
def test_genesis_and_suprem_state_dicts_import_every_encoder_tensor(tmp_path, layout):
    state = random_state(genesis_layout(base=4, n_class=3))
    if layout == "models_genesis":  # Genesis_Chest_CT.pt: {"state_dict": {"module.down_tr64...": ...}}
        saved = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:  # supervised_suprem_unet_2100.pth: {"net": {"module.backbone.down_tr64...": ..., other heads}}
        saved = {"net": {**{f"module.backbone.{k}": v for k, v in state.items()},
                         "module.precls_conv.0.weight": torch.randn(8, 4),
                         "module.organ_embedding": torch.randn(25, 512)}, "epoch": 2100}
    torch.save(saved, tmp_path / "unet.pth")
    path = import_weights(tmp_path / "unet.pth", "genesis_unet3d", tmp_path / "out", in_channels=1, width=4)
    imported = torch.load(path, weights_only=True)
    assert len(imported) == sum(1 for k in state if k.startswith("down_tr"))
    assert_encoder_holds(imported, state, genesis_name)
    manifest = read_manifest(path)
    assert manifest["arch"] == {"name": "genesis", "in_channels": 1, "spatial_dims": 3, "width": 4, "depth": 4}
    assert manifest["keys_dropped"] == sum(1 for k in state if k.startswith(("up_tr", "out_tr")))
    # fine-tuning takes it: a genesis_unet3d segmenter with any decoder option (deep supervision too)
    model = build_segmenter(preset="genesis_unet3d", in_channels=1, n_classes=2, width=4,
                            options={"deep_supervision": True})
    load_encoder_weights(model, path)
    assert_encoder_holds(model.encoder.state_dict(), state, genesis_name)
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 2, 16, 16, 16)


def test_a_shallower_genesis_encoder_takes_the_first_levels(tmp_path):
    state = random_state(genesis_layout(base=4))
    torch.save(state, tmp_path / "unet.pt")
    path = import_weights(tmp_path / "unet.pt", "genesis_unet3d", tmp_path / "out", in_channels=1, width=4, depth=3)
    imported = torch.load(path, weights_only=True)
    assert {genesis_name(k).split(".")[0] for k in imported} == {"down_tr64", "down_tr128", "down_tr256"}
    assert_encoder_holds(imported, state, genesis_name)


# --------------------------------------------------------------------------------------------------
# Files that do not fit: one line, naming the file and the first key


def test_a_genesis_file_of_another_width_names_the_file_and_the_first_key(tmp_path):
    torch.save(random_state(genesis_layout(base=4)), tmp_path / "unet.pth")
    with pytest.raises(CheckpointError) as info:
        import_weights(tmp_path / "unet.pth", "genesis_unet3d", tmp_path / "out", in_channels=1, width=8)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "unet.pth"))
    assert "other shapes" in message and "down_tr64.ops.0.conv1.weight (4, 1, 3, 3, 3) vs (8, 1, 3, 3, 3)" in message
    assert not (tmp_path / "out").exists()


def test_a_monai_file_of_another_size_or_network_is_a_one_line_error(tmp_path):
    network, width, depth, _ = MONAI_CASES["monai_segresnet"]
    torch.save(monai_network("monai_segresnet").state_dict(), tmp_path / "segresnet.pt")
    with pytest.raises(CheckpointError, match=r"segresnet\.pt: does not fit .*other shapes.*convInit\.conv\.weight "
                                              r"\(8, 1, 3, 3, 3\) vs \(16, 1, 3, 3, 3\)") as info:
        import_weights(tmp_path / "segresnet.pt", "monai_segresnet", tmp_path / "a", in_channels=1, width=16,
                       depth=depth)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"segresnet\.pt: does not fit the MONAI BasicUNet encoder: .*missing") \
            as info:
        import_weights(tmp_path / "segresnet.pt", "monai_basicunet", tmp_path / "b", in_channels=1, width=2)
    assert "\n" not in str(info.value)


def test_cli_imports_a_monai_checkpoint_with_its_width(tmp_path):
    torch.save({"model": monai_network("monai_dynunet").state_dict()}, tmp_path / "dynunet.pt")
    result = CliRunner().invoke(app, ["weights", "import", str(tmp_path / "dynunet.pt"), "--preset", "monai_dynunet",
                                      "--width", "4", "--depth", "4", "--in-channels", "1", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "MONAI DynUNet" in result.output and Path(tmp_path / "out" / "encoder.pt").is_file()


def test_an_input_too_small_for_an_instance_normalised_deepest_level_is_a_clear_error():
    model = build_segmenter(preset="monai_basicunet", in_channels=1, n_classes=2, width=2)
    assert model.smallest_input == (32, 16, 16)
    with pytest.raises(InputShapeError, match="16x16x16 leaves one voxel at the deepest level .*at least 32") as info:
        model(torch.randn(1, 1, 16, 16, 16))
    assert "\n" not in str(info.value)
    # whole-image inference pads such a volume as far as the model needs, and crops back
    assert predict_logits(model.eval(), torch.randn(1, 1, 16, 16, 12), size_multiple=16).shape == (1, 2, 16, 16, 12)
