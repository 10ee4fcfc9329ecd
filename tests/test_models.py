"""Model zoo: encoders describe their features truthfully, every preset segments at input resolution,
attention gates gate, bad inputs fail with one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from medxfer.config import ModelConfig
from medxfer.errors import ConfigError, MedxferError
from medxfer.models import (
    PRESETS,
    AttentionGate,
    InputShapeError,
    UNetDecoder,
    build_classifier,
    build_segmenter,
    count_parameters,
    create_encoder,
    encoder_from_arch,
    preset_table,
)

# A Swin small enough for CPU tests: 64x64 input -> maps 16, 8, 4, 2 with window 4 (the last one clamped to 2).
TINY_SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_spec(preset: str) -> tuple[dict, tuple[int, ...]]:
    """Keyword arguments and an input shape that keep ``preset`` tiny: 3D inputs are 16^3, or larger where the preset
    takes nothing that small (``smallest_input``, e.g. 64x32x32 for SwinUNETR: stride 32, instance-normalised)."""
    spec = {"preset": preset, "in_channels": 2, "n_classes": 3, "width": 4, "depth": 3}
    if PRESETS[preset].spatial_dims == 3:
        with torch.device("meta"):
            smallest = build_segmenter(**spec).smallest_input
        return spec, (2, 2, *(max(16, s) for s in smallest))
    if preset.startswith("swin"):
        spec.update(depth=4, options=dict(TINY_SWIN))
        return spec, (2, 2, 64, 64)
    return spec, (2, 2, 32, 32)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_returns_logits_at_input_resolution(preset):
    spec, shape = tiny_spec(preset)
    model = build_segmenter(**spec)
    assert model.spatial_dims == PRESETS[preset].spatial_dims == len(shape) - 2
    logits = model(torch.randn(shape))
    assert logits.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(logits).all()
    logits.mean().backward()  # the whole graph is differentiable: every parameter gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_full_depth_resnet50_attention_unet_at_64():
    model = build_segmenter(preset="resnet50_attention_unet", in_channels=1, n_classes=2, width=4)
    assert model.encoder.strides == [2, 4, 8, 16, 32]
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2, 64, 64)


def test_build_segmenter_from_model_config_and_overrides():
    config = ModelConfig(preset="attention_unet", in_channels=1, n_classes=4, width=2, depth=4)
    model = build_segmenter(config, n_classes=5)
    assert model.preset == "attention_unet"
    assert model.encoder.channels == [2, 4, 8, 16]
    assert model.head.out_channels == 5
    assert model.spec["n_classes"] == 5 and model.spec["depth"] == 4
    assert all(stage.gate is not None for stage in model.decoder.stages)
    plain = build_segmenter(config.model_copy(update={"preset": "unet"}))
    assert all(stage.gate is None for stage in plain.decoder.stages)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"preset": "unet_plus_plus", "in_channels": 1, "n_classes": 2}, "unknown preset"),
        ({"preset": "unet", "in_channels": 1}, "model.n_classes"),
        ({"preset": "unet", "in_channels": 1, "n_classes": 2, "options": {"img_size": 64}}, "img_size"),
        ({"preset": "unet", "in_channels": 1, "n_classes": 2, "widht": 8}, "widht"),
        ({"preset": "unet3d", "in_channels": 1, "n_classes": 2, "options": {"pretrained": True}}, "pretrained"),
    ],
)
def test_bad_model_specs_are_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        build_segmenter(**kwargs)
    assert "\n" not in str(info.value)


ENCODER_CASES = {
    "unet2d": (dict(name="unet", in_channels=1, width=4, depth=4), (2, 1, 32, 32)),
    "unet3d": (dict(name="unet", in_channels=2, width=2, depth=5, spatial_dims=3), (1, 2, 32, 32, 32)),
    "resnet18": (dict(name="resnet18", in_channels=1), (1, 1, 64, 64)),
    "resnet34": (dict(name="resnet34", in_channels=3, depth=4), (1, 3, 32, 32)),
    "resnet50": (dict(name="resnet50", in_channels=1), (1, 1, 64, 64)),
    "swin": (dict(name="swin_tiny_patch4_window7_224", in_channels=1, **TINY_SWIN), (1, 1, 64, 64)),
    "genesis": (dict(name="genesis", in_channels=1, width=2, depth=4, spatial_dims=3), (1, 1, 16, 16, 16)),
    "monai_swin_unetr": (dict(name="monai:SwinUNETR", in_channels=1, width=12, spatial_dims=3), (1, 1, 64, 32, 32)),
    "monai_segresnet": (dict(name="monai:SegResNet", in_channels=2, width=4, depth=3, spatial_dims=3),
                        (1, 2, 16, 16, 16)),
    "monai_basicunet": (dict(name="monai:BasicUNet", in_channels=1, width=2, spatial_dims=3), (1, 1, 32, 16, 16)),
    "monai_dynunet": (dict(name="monai:DynUNet", in_channels=1, width=4, depth=4, spatial_dims=3),
                      (1, 1, 16, 16, 16)),
}


@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoder_description_matches_its_features(case):
    kwargs, shape = ENCODER_CASES[case]
    kwargs = dict(kwargs)
    encoder = create_encoder(kwargs.pop("name"), **kwargs).eval()
    with torch.no_grad():
        features = encoder(torch.randn(shape))
    assert len(features) == encoder.n_levels == len(encoder.channels) == len(encoder.strides) == len(encoder.levels)
    for feature, channels, stride in zip(features, encoder.channels, encoder.strides):
        assert feature.shape[:2] == (shape[0], channels)  # channels-first, also for Swin (NHWC inside)
        assert tuple(feature.shape[2:]) == tuple(s // stride for s in shape[2:])
    assert encoder.strides == sorted(encoder.strides)
    # Every parameter belongs to exactly one level, so freezing by level covers the whole encoder.
    level_params = [id(p) for i in range(encoder.n_levels) for m in encoder.level_modules(i) for p in m.parameters()]
    assert len(level_params) == len(set(level_params)) == len(list(encoder.parameters()))
    # The arch dict is JSON and rebuilds the same architecture.
    arch = json.loads(json.dumps(encoder.arch))
    rebuilt = encoder_from_arch(arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}
    assert rebuilt.channels == encoder.channels and rebuilt.strides == encoder.strides


def test_expected_strides_of_known_encoders():
    assert create_encoder("unet", 1, width=4, depth=5).strides == [1, 2, 4, 8, 16]
    assert create_encoder("unet", 1, width=4, depth=5, spatial_dims=3).strides == [1, 2, 4, 8, 16]
    assert create_encoder("resnet18", 1).strides == [2, 4, 8, 16, 32]
    assert create_encoder("swin_tiny_patch4_window7_224", 1, **TINY_SWIN).strides == [4, 8, 16, 32]


def test_only_inflatable_timm_encoders_are_3d_and_swin_geometry_is_checked():
    assert create_encoder("resnet18", 1, spatial_dims=3).strides == [2, 4, 8, 16, 32]
    with pytest.raises(ConfigError, match="cannot inflate swin_tiny_patch4_window7_224.*PatchEmbed layer is 2D-only"):
        create_encoder("swin_tiny_patch4_window7_224", 1, spatial_dims=3, **TINY_SWIN)
    with pytest.raises(ConfigError, match="window"):
        create_encoder("swin_tiny_patch4_window7_224", 1, **{**TINY_SWIN, "img_size": 96, "window_size": 7})


@pytest.mark.parametrize("preset, shape", [("unet", (1, 1, 30, 32)), ("resnet18_unet", (1, 1, 48, 40)),
                                           ("unet3d", (1, 1, 16, 16, 12))])
def test_input_size_not_a_multiple_of_the_total_stride_is_a_clear_error(preset, shape):
    model = build_segmenter(preset=preset, in_channels=1, n_classes=2, width=2, depth=4)
    with pytest.raises(InputShapeError) as info:
        model(torch.randn(shape))
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MedxferError)
    assert "x".join(map(str, shape[2:])) in message
    assert f"multiple of {model.required_multiple}" in message
    assert "\n" not in message


def test_wrong_dims_channels_and_swin_size_are_clear_errors():
    model = build_segmenter(preset="unet", in_channels=1, n_classes=2, width=2, depth=2)
    with pytest.raises(InputShapeError, match="1 input channel"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(InputShapeError, match="2D"):
        model(torch.randn(1, 1, 16, 16, 16))
    swin = build_segmenter(preset="swin_unet", in_channels=1, n_classes=2, width=2, options=dict(TINY_SWIN))
    with pytest.raises(InputShapeError, match="img_size 64x64"):
        swin(torch.randn(1, 1, 32, 32))


def test_decoder_restores_resolution_for_any_first_stride():
    # Fake encoder with levels at strides 3 and 6: one 2x stage with a skip, then a 3x stage to full size.
    decoder = UNetDecoder([5, 7], [3, 6], spatial_dims=2, decoder_channels=[4])
    out = decoder([torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)])
    assert out.shape == (2, decoder.out_channels, 24, 24)


def test_attention_gate_coefficients_control_the_skip():
    gate = AttentionGate(skip_channels=4, gate_channels=6, factor=2, spatial_dims=2).eval()
    skip_a, skip_b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    signal = torch.randn(1, 6, 4, 4)
    with torch.no_grad():
        out = gate(skip_a, signal)
        alpha = gate.last_coefficients
        assert out.shape == skip_a.shape and alpha.shape == (1, 1, 8, 8)
        assert ((alpha >= 0) & (alpha <= 1)).all()
        # The coefficients depend on the gating signal.
        gate(skip_a, torch.randn(1, 6, 4, 4))
        assert not torch.allclose(alpha, gate.last_coefficients)
        # Gate closed: the skip no longer reaches the output. Gate open: the output is W(skip).
        gate.psi.bias.fill_(-30.0)
        assert torch.allclose(gate(skip_a, signal), gate(skip_b, signal), atol=1e-6)
        gate.psi.bias.fill_(30.0)
        assert torch.allclose(gate(skip_a, signal), gate.output(skip_a), atol=1e-5)


def test_attention_maps_are_exposed_shallowest_first():
    model = build_segmenter(preset="attention_unet3d", in_channels=1, n_classes=2, width=2, depth=3).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 16, 16, 16))
    maps = model.decoder.attention_maps()
    assert [tuple(m.shape[2:]) for m in maps] == [(16, 16, 16), (8, 8, 8)]


def test_classifier_pools_the_deepest_level():
    encoder = create_encoder("unet", 3, width=4, depth=3)
    classifier = build_classifier(encoder, n_classes=7).eval()
    assert classifier.encoder is encoder and classifier.head.in_features == encoder.channels[-1]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = classifier(x)
        pooled = encoder(x)[-1].mean(dim=(2, 3))
    assert logits.shape == (2, 7)
    assert torch.allclose(logits, classifier.head(pooled), atol=1e-6)
    with pytest.raises(ConfigError):
        build_classifier(torch.nn.Linear(2, 2), 3)


def test_preset_table_lists_every_preset_with_true_parameter_counts():
    rows = preset_table()
    assert [r[0] for r in rows] == list(PRESETS)
    for name, description, params, dims in rows:
        assert description and "\n" not in description and dims == PRESETS[name].spatial_dims
        assert params > 0
    counts = {r[0]: r[2] for r in rows}
    # Counted on the meta device; must equal a real build at the same defaults.
    assert counts["unet"] == count_parameters(build_segmenter(preset="unet", in_channels=1, n_classes=2))
    assert counts["attention_unet"] > counts["unet"]
    assert counts["resnet50_unet"] > counts["resnet18_unet"]
