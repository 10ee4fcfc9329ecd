"""MONAI's 3D segmentation networks (SwinUNETR, SegResNet, BasicUNet, DynUNet) split into medxfer's encoder,
decoder and head, with MONAI's own module names, so a MONAI checkpoint or bundle loads into them as it is.

Each network is built by MONAI and cut at its skip connections: the encoder holds the modules that compute the
skip features (one per level, shallow to deep), the decoder the modules that merge them back to full resolution,
the head MONAI's output layer. The forward passes below reproduce MONAI's ``forward`` of each network step by step
(``tests/test_weights3d.py`` checks the logits equal MONAI's own on the same weights), so freezing the encoder,
partial freezing by level, encoder checkpoints and ``medxfer weights import`` work as for every preset.

Sizes come from ``width`` (the channels of the first level) and, where the network's depth varies, ``depth``:

- SwinUNETR: ``feature_size`` = width rounded up to a multiple of 12 (MONAI requires it; the published weights
  use 48); six levels (strides 1-32), whatever ``depth``; inputs a multiple of 32 in every axis;
- SegResNet: ``init_filters`` = width, ``depth`` levels (``blocks_down`` 1, 2, 2, 4, 4, ...); GroupNorm with
  8 groups (fewer when the width is not a multiple of 8);
- BasicUNet: ``features`` = (w, w, 2w, 4w, 8w, w); five levels (strides 1-16), whatever ``depth``;
- DynUNet: filters ``min(w * 2**i, 320)`` (nnU-Net's), ``depth`` levels of stride 2 after a first of stride 1,
  kernel 3.

Options give MONAI's arguments directly where a published checkpoint needs another value (``NETWORK_OPTIONS``);
``deep_supervision`` puts medxfer's auxiliary heads on the decoder blocks' outputs (``MonaiDecoder.forward_stages``).
``from_monai_layout`` renames a whole MONAI network's state dict to the segmenter's keys (``pretrained.load: full``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from medxfer.errors import ConfigError
from medxfer.models.encoders import Encoder, register_encoder

NETWORKS = ("SwinUNETR", "SegResNet", "BasicUNet", "DynUNet")
NETWORK_OPTIONS: dict[str, tuple[str, ...]] = {
    "SwinUNETR": ("feature_size", "depths", "num_heads", "use_v2"),
    "SegResNet": ("init_filters", "blocks_down", "blocks_up", "num_groups"),
    "BasicUNet": ("features",),
    "DynUNet": ("filters", "res_block"),
}
# Modules of the whole MONAI network outside the encoder, as key prefixes: a checkpoint of the whole network holds
# them; an encoder import leaves them out. SwinUNETR's self-supervised pretraining heads (Tang et al. 2022) too.
_OUTSIDE = {
    "SwinUNETR": ("decoder1.", "decoder2.", "decoder3.", "decoder4.", "decoder5.", "out.",
                  "rotation_head.", "contrastive_head.", "conv."),
    "SegResNet": ("up_layers.", "up_samples.", "conv_final."),
    "BasicUNet": ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1.", "final_conv."),
    # skip_layers: MONAI's recursive wrapper registers the encoder's and decoder's modules a second time
    "DynUNet": ("upsamples.", "output_block.", "deep_supervision_heads.", "skip_layers."),
}


def _listed(value: Any, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"model.options.{what} must be a list of integers, got {value!r}")
    return [int(v) for v in value]


def network_kwargs(network: str, width: int, depth: int, options: dict[str, Any]) -> dict[str, Any]:
    """MONAI's constructor arguments (without channels) for ``width``/``depth`` and the options."""
    unknown = sorted(set(options) - set(NETWORK_OPTIONS[network]))
    if unknown:
        raise ConfigError(f"model.options: unknown option(s) {', '.join(unknown)} for MONAI {network} "
                          f"(known: {', '.join(NETWORK_OPTIONS[network])})")
    if network == "SwinUNETR":
        feature_size = int(options.get("feature_size", 12 * math.ceil(width / 12)))
        if feature_size < 12 or feature_size % 12:
            raise ConfigError(f"model.options.feature_size {feature_size}: MONAI's SwinUNETR needs a multiple of 12")
        return {"feature_size": feature_size, "depths": _listed(options.get("depths", [2, 2, 2, 2]), "depths"),
                "num_heads": _listed(options.get("num_heads", [3, 6, 12, 24]), "num_heads"),
                "use_v2": bool(options.get("use_v2", False))}
    if network == "SegResNet":
        init_filters = int(options.get("init_filters", width))
        blocks_down = _listed(options.get("blocks_down", ([1, 2, 2] + [4] * depth)[:depth]), "blocks_down")
        blocks_up = _listed(options.get("blocks_up", [1] * (len(blocks_down) - 1)), "blocks_up")
        if len(blocks_up) != len(blocks_down) - 1:
            raise ConfigError(f"model.options.blocks_up {blocks_up}: needs one entry fewer than blocks_down "
                              f"{blocks_down}")
        groups = int(options.get("num_groups", math.gcd(8, init_filters)))
        if init_filters % groups:
            raise ConfigError(f"model.options.num_groups {groups}: must divide the width {init_filters}")
        return {"init_filters": init_filters, "blocks_down": blocks_down, "blocks_up": blocks_up,
                "norm": ["GROUP", {"num_groups": groups}]}
    if network == "BasicUNet":
        features = _listed(options.get("features", [width, width, 2 * width, 4 * width, 8 * width, width]),
                           "features")
        if len(features) != 6:
            raise ConfigError(f"model.options.features {features}: MONAI's BasicUNet takes 6 numbers")
        return {"features": features}
    if network == "DynUNet":
        filters = _listed(options.get("filters", [min(width * 2**i, 320) for i in range(depth)]), "filters")
        if len(filters) < 2:
            raise ConfigError(f"model.options.filters {filters}: DynUNet needs 2 or more levels")
        n = len(filters)
        return {"filters": filters, "kernel_size": [3] * n, "strides": [1] + [2] * (n - 1),
                "upsample_kernel_size": [2] * (n - 1), "res_block": bool(options.get("res_block", False))}
    raise ConfigError(f"unknown MONAI network {network!r} (known: {', '.join(NETWORKS)})")


class _LinspaceOnCpu(TorchFunctionMode):
    """Builds ``torch.linspace`` tensors on the CPU: MONAI's SwinUNETR reads its drop-path rates from one with
    ``.item()`` while it is built, which a meta-device tensor cannot do (``preset_table`` builds on the meta device)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def build_network(network: str, in_channels: int, out_channels: int, spatial_dims: int,
                  kwargs: dict[str, Any]) -> nn.Module:
    """MONAI's network itself (random weights); also under ``with torch.device("meta")``."""
    from monai.networks import nets

    kwargs = dict(kwargs)
    if "norm" in kwargs:
        kwargs["norm"] = tuple(kwargs["norm"])  # JSON (a manifest) has lists, MONAI wants (name, args)
    try:
        with _LinspaceOnCpu():
            return getattr(nets, network)(spatial_dims=spatial_dims, in_channels=in_channels,
                                          out_channels=out_channels, **kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"MONAI {network}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") \
            from None


class MonaiEncoder(Encoder):
    """The encoder half of a MONAI network (see the module docstring), its modules under MONAI's names."""

    def __init__(self, network: str, in_channels: int, kwargs: dict[str, Any], spatial_dims: int = 3,
                 built: nn.Module | None = None):
        super().__init__()
        if network not in NETWORKS:
            raise ConfigError(f"unknown MONAI network {network!r} (known: {', '.join(NETWORKS)})")
        net = built if built is not None else build_network(network, in_channels, 2, spatial_dims, kwargs)
        self.network = network
        self.in_channels = int(in_channels)
        self.spatial_dims = int(spatial_dims)
        self.arch = {"name": "monai", "network": network, "in_channels": self.in_channels,
                     "spatial_dims": self.spatial_dims, "kwargs": json_ready(kwargs)}
        getattr(self, f"_take_{network.lower()}")(net, kwargs)
        # SegResNet normalises with GroupNorm, which takes one voxel; the others use InstanceNorm
        self._deepest_instance_norm = network != "SegResNet"

    # -- the four networks -----------------------------------------------------------------------------------
    def _take_swinunetr(self, net: nn.Module, kwargs: dict[str, Any]) -> None:
        fs = int(kwargs["feature_size"])
        for name in ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"):
            self.add_module(name, getattr(net, name))
        self.normalize = bool(getattr(net, "normalize", True))
        vit = self.swinViT
        stage = [[getattr(vit, f"layers{i}")] + ([getattr(vit, f"layers{i}c")] if hasattr(vit, f"layers{i}c") else [])
                 for i in range(1, 5)]
        self.levels = [[self.encoder1], [vit.patch_embed, self.encoder2], [*stage[0], self.encoder3],
                       [*stage[1], self.encoder4], stage[2], [*stage[3], self.encoder10]]
        self.channels = [fs, fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
        self.strides = [1, 2, 4, 8, 16, 32]
        self.input_conv_keys = ("encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight",
                                "swinViT.patch_embed.proj.weight")

    def _take_segresnet(self, net: nn.Module, kwargs: dict[str, Any]) -> None:
        self.convInit, self.down_layers = net.convInit, net.down_layers
        self.levels = [[self.convInit, self.down_layers[0]], *[[layer] for layer in self.down_layers[1:]]]
        n = len(self.down_layers)
        self.channels = [int(kwargs["init_filters"]) * 2**i for i in range(n)]
        self.strides = [2**i for i in range(n)]
        self.input_conv_keys = ("convInit.conv.weight",)

    def _take_basicunet(self, net: nn.Module, kwargs: dict[str, Any]) -> None:
        for name in ("conv_0", "down_1", "down_2", "down_3", "down_4"):
            self.add_module(name, getattr(net, name))
        self.levels = [[self.conv_0], [self.down_1], [self.down_2], [self.down_3], [self.down_4]]
        self.channels = [int(c) for c in kwargs["features"][:5]]
        self.strides = [1, 2, 4, 8, 16]
        self.input_conv_keys = ("conv_0.conv_0.conv.weight",)

    def _take_dynunet(self, net: nn.Module, kwargs: dict[str, Any]) -> None:
        self.input_block, self.downsamples, self.bottleneck = net.input_block, net.downsamples, net.bottleneck
        self.levels = [[self.input_block], *[[d] for d in self.downsamples], [self.bottleneck]]
        self.channels = [int(c) for c in kwargs["filters"]]
        self.strides = [int(math.prod(kwargs["strides"][:i + 1])) for i in range(len(self.channels))]
        self.input_conv_keys = ("input_block.conv1.conv.weight", "input_block.conv3.conv.weight")

    def map_external_key(self, key: str) -> list[str]:
        """SwinUNETR: the self-supervised Swin weights of Tang et al. 2022 (``model_swinvit.pt``) name the
        transformer's keys without ``swinViT.`` (or as ``swin_vit.``) and its MLP layers ``fc1``/``fc2`` where
        MONAI has ``linear1``/``linear2``; this gives MONAI's name."""
        if self.network != "SwinUNETR":
            return []
        key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        if key.startswith("swin_vit."):
            return [f"swinViT.{key.removeprefix('swin_vit.')}"]
        return [key, f"swinViT.{key}"]

    def optional_prefixes(self) -> tuple[str, ...]:
        """Parts a file may leave out whole, kept at their initialisation (the manifest counts them): SwinUNETR's
        convolutional encoder blocks, absent from the self-supervised weights, which hold the transformer alone."""
        if self.network == "SwinUNETR":
            return ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
        return ()

    @property
    def first_conv_key(self) -> str | None:  # type: ignore[override]
        return self.input_conv_keys[0]

    @property
    def name(self) -> str:
        return f"MONAI {self.network}"

    def outside_prefixes(self) -> tuple[str, ...]:
        """Key prefixes of the whole MONAI network (and its pretraining heads) that are not the encoder's."""
        return _OUTSIDE[self.network]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        if self.network == "SwinUNETR":
            hidden = self.swinViT(x, self.normalize)
            return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                    hidden[3], self.encoder10(hidden[4])]
        if self.network == "SegResNet":
            x = self.convInit(x)
            features = []
            for layer in self.down_layers:
                x = layer(x)
                features.append(x)
            return features
        if self.network == "BasicUNet":
            features = [self.conv_0(x)]
            for layer in (self.down_1, self.down_2, self.down_3, self.down_4):
                features.append(layer(features[-1]))
            return features
        features = [self.input_block(x)]
        for layer in self.downsamples:
            features.append(layer(features[-1]))
        features.append(self.bottleneck(features[-1]))
        return features


class MonaiDecoder(nn.Module):
    """The decoder half of a MONAI network: merges the encoder's features back to full resolution as MONAI does."""

    def __init__(self, network: str, net: nn.Module, kwargs: dict[str, Any]):
        super().__init__()
        self.network = network
        if network == "SwinUNETR":
            for name in ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1"):
                self.add_module(name, getattr(net, name))
            fs = int(kwargs["feature_size"])
            self._stage_channels = [8 * fs, 4 * fs, 2 * fs, fs, fs]
        elif network == "SegResNet":
            self.up_samples, self.up_layers = net.up_samples, net.up_layers
            n = len(kwargs["blocks_down"])
            self._stage_channels = [int(kwargs["init_filters"]) * 2**i for i in reversed(range(n - 1))]
        elif network == "BasicUNet":
            for name in ("upcat_4", "upcat_3", "upcat_2", "upcat_1"):
                self.add_module(name, getattr(net, name))
            features = [int(c) for c in kwargs["features"]]
            self._stage_channels = [features[3], features[2], features[1], features[5]]
        else:
            self.upsamples = net.upsamples
            self._stage_channels = [int(c) for c in kwargs["filters"][-2::-1]]
        self.out_channels = self._stage_channels[-1]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_stages(features)[-1]

    def forward_stages(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The output of every decoder block, coarsest first (the last is full resolution): what deep
        supervision's heads read, as for medxfer's ``UNetDecoder``."""
        outputs = []
        if self.network == "SwinUNETR":
            x = self.decoder5(features[5], features[4])
            outputs.append(x)
            for block, skip in zip((self.decoder4, self.decoder3, self.decoder2, self.decoder1), features[3::-1]):
                x = block(x, skip)
                outputs.append(x)
        elif self.network == "SegResNet":
            x = features[-1]
            for up, layer, skip in zip(self.up_samples, self.up_layers, features[-2::-1]):
                x = layer(up(x) + skip)
                outputs.append(x)
        elif self.network == "BasicUNet":
            x = features[4]
            for block, skip in zip((self.upcat_4, self.upcat_3, self.upcat_2, self.upcat_1), features[3::-1]):
                x = block(x, skip)
                outputs.append(x)
        else:
            x = features[-1]
            for block, skip in zip(self.upsamples, features[-2::-1]):
                x = block(x, skip)
                outputs.append(x)
        return outputs

    def stage_channels(self) -> list[int]:
        """Channels of ``forward_stages``' outputs, coarsest first."""
        return list(self._stage_channels)


_HEADS = {"SwinUNETR": "out", "SegResNet": "conv_final", "BasicUNet": "final_conv", "DynUNet": "output_block"}


def build_parts(network: str, in_channels: int, n_classes: int, kwargs: dict[str, Any],
                spatial_dims: int = 3) -> tuple[MonaiEncoder, MonaiDecoder, nn.Module]:
    """``(encoder, decoder, head)`` of one MONAI network with ``n_classes`` outputs."""
    net = build_network(network, in_channels, n_classes, spatial_dims, kwargs)
    encoder = MonaiEncoder(network, in_channels, kwargs, spatial_dims, built=net)
    return encoder, MonaiDecoder(network, net, kwargs), getattr(net, _HEADS[network])


def monai_key(key: str, network: str) -> str | None:
    """The MONAI network's key of a medxfer segmenter key (``encoder.X``/``decoder.X`` -> ``X``, ``head.`` -> the
    output layer), for comparing with or writing MONAI checkpoints; None for medxfer-only keys."""
    part, _, rest = key.partition(".")
    if part in ("encoder", "decoder"):
        return rest
    if part == "head":
        return f"{_HEADS[network]}.{rest}"
    return None


# where a whole MONAI network sits in other projects' files (SuPreM: "backbone."; wrappers: "model.", "net.")
_NETWORK_PREFIXES = ("", "backbone.", "model.", "net.")


def from_monai_layout(state: dict[str, torch.Tensor], model_keys: Sequence[str],
                      network: str) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """A whole MONAI network's state dict renamed to a medxfer segmenter's keys (``encoder.``, ``decoder.``,
    ``head.``), for ``pretrained.load: full`` / ``encoder_decoder`` from a MONAI checkpoint or bundle. Returns
    ``(renamed, unexpected keys)``, or None when the file is not in MONAI's layout (a medxfer checkpoint).
    MONAI's second registration of the modules (DynUNet's ``skip_layers``) and DynUNet's deep-supervision heads are
    left out."""
    wanted = {name: key for key in model_keys if (name := monai_key(key, network)) is not None}
    best: tuple[str, dict[str, torch.Tensor]] | None = None
    for prefix in _NETWORK_PREFIXES:
        renamed = {wanted[k[len(prefix):]]: v for k, v in state.items()
                   if k.startswith(prefix) and k[len(prefix):] in wanted}
        if renamed and (best is None or len(renamed) > len(best[1])):
            best = (prefix, renamed)
    if best is None or any(k.startswith(("encoder.", "decoder.")) for k in state):
        return None
    prefix, renamed = best
    unexpected = [k for k in state if k.startswith(prefix) and k[len(prefix):] not in wanted
                  and not k[len(prefix):].startswith(("skip_layers.", "deep_supervision_heads."))]
    return renamed, unexpected


def json_ready(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    return value


def _create(name: str, in_channels: int, spatial_dims: int, width: int, depth: int | None,
            options: dict[str, Any]) -> MonaiEncoder:
    network = name.removeprefix("monai:")
    return MonaiEncoder(network, in_channels, network_kwargs(network, width, depth or 5, options),
                        spatial_dims=spatial_dims)


def _rebuild(arch: dict[str, Any]) -> MonaiEncoder:
    return MonaiEncoder(str(arch["network"]), int(arch["in_channels"]), dict(arch["kwargs"]),
                        spatial_dims=int(arch.get("spatial_dims", 3)))


register_encoder("monai", _create, _rebuild)
