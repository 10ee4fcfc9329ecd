"""The MONAI networks whose downsampling paths are medxfer encoders (``encoders.MonaiEncoder``), so that weights
published for those networks (MONAI bundles and network checkpoints) load into a medxfer U-Net. A leaf: it
holds the per-network facts (which MONAI modules make each level, their channels, the decoder's key prefixes).

Each encoder is built from the MONAI network itself (the real architecture, random weights): its encoder
modules become medxfer's levels, the rest (MONAI's decoder and head) is dropped. Keys keep MONAI's names under
their level (``conv_0.conv_0.conv.weight`` -> ``levels.0.conv_0.conv_0.conv.weight``), ``map_external_key``
maps a MONAI state dict onto them, and ``outside_keys`` names the decoder keys an import drops. The features
of level ``i`` are exactly those of MONAI's encoder path at that depth (checked in tests).

==========  =======================================================  =====================================
network     levels (MONAI modules)                                   channels (``width`` w), strides
==========  =======================================================  =====================================
basicunet   conv_0 | down_1 | down_2 | down_3 | down_4               w, w, 2w, 4w, 8w (MONAI's default
                                                                     features with w=32); 1, 2, 4, 8, 16
segresnet   convInit + down_layers.0 | down_layers.1 | ... (4)       w, 2w, 4w, 8w; 1, 2, 4, 8
dynunet     input_block | downsamples.0..2 | bottleneck              w, 2w, 4w, 8w, 16w; 1, 2, 4, 8, 16
==========  =======================================================  =====================================

``depth`` must be the network's own (5, 4, 5): a published file has that many levels.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medxfer.errors import ConfigError

# network -> (default depth, level spec: per level the MONAI module paths run in order)
_LEVELS: dict[str, list[list[str]]] = {
    "basicunet": [["conv_0"], ["down_1"], ["down_2"], ["down_3"], ["down_4"]],
    "segresnet": [["convInit", "down_layers.0"], ["down_layers.1"], ["down_layers.2"], ["down_layers.3"]],
    "dynunet": [["input_block"], ["downsamples.0"], ["downsamples.1"], ["downsamples.2"], ["bottleneck"]],
}
# MONAI modules that are not the encoder (their keys are dropped by an import)
_OUTSIDE: dict[str, tuple[str, ...]] = {
    "basicunet": ("upcat_", "final_conv"),
    "segresnet": ("up_layers", "up_samples", "conv_final"),
    "dynunet": ("skip_layers", "upsamples", "output_block", "deep_supervision_heads"),
}
NETWORKS = tuple(_LEVELS)


def _channels(network: str, width: int) -> list[int]:
    if network == "basicunet":
        return [width, width, 2 * width, 4 * width, 8 * width]
    if network == "segresnet":
        return [width * 2**i for i in range(4)]
    return [width * 2**i for i in range(5)]


def build_monai_network(network: str, in_channels: int, spatial_dims: int, width: int) -> nn.Module:
    """The whole MONAI network (random weights) whose encoder path a ``MonaiEncoder`` keeps; also what tests
    build published-style state dicts from."""
    from monai.networks import nets

    if network == "basicunet":
        c = _channels(network, width)
        return nets.BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2,
                              features=(*c, width))
    if network == "segresnet":
        return nets.SegResNet(spatial_dims=spatial_dims, init_filters=width, in_channels=in_channels, out_channels=2)
    if network == "dynunet":
        return nets.DynUNet(spatial_dims, in_channels, 2, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                            upsample_kernel_size=[2, 2, 2, 2], filters=_channels(network, width))
    raise ConfigError(f"unknown MONAI network {network!r} (known: {', '.join(NETWORKS)})")


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    return module


class _OutsideKeys(frozenset):
    """``key in outside``: a key of one of MONAI's decoder modules (matched by prefix)."""

    def __new__(cls, prefixes: tuple[str, ...]):
        self = super().__new__(cls)
        self.prefixes = prefixes
        return self

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.startswith(self.prefixes)


def level_paths(network: str) -> list[list[str]]:
    """Per level, the MONAI module paths it runs in order."""
    if network not in _LEVELS:
        raise ConfigError(f"unknown MONAI network {network!r} (known: {', '.join(NETWORKS)})")
    return _LEVELS[network]


def channels(network: str, width: int) -> list[int]:
    return _channels(network, width)


def outside_prefixes(network: str) -> tuple[str, ...]:
    return _OUTSIDE[network]


def submodule(module: nn.Module, path: str) -> nn.Module:
    return _get(module, path)


def outside_keys(network: str) -> frozenset:
    return _OutsideKeys(_OUTSIDE[network])
