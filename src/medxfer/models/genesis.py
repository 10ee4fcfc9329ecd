"""The encoder of the Models Genesis 3D U-Net (Zhou et al. 2019, MICCAI / MedIA 2021), which SuPreM (Li et al.,
ICLR 2024) also uses for its U-Net: medxfer's ``genesis_unet3d`` preset puts medxfer's U-Net decoder on it.

The published network (``unet3d.py`` of MrGiovanni/ModelsGenesis, ``backbone/unet.py`` of MrGiovanni/SuPreM) has four
encoder levels ``down_tr64 .. down_tr512``. Level ``i`` (stride ``2**i``; 2x max-pooling before every level but the
first) is two (3x3x3 conv with bias - BatchNorm - ReLU) units named ``ops.0`` / ``ops.1``, each ``conv1`` + ``bn1``;
the first conv goes to ``32 * 2**i`` channels, the second doubles them, so the levels have 64, 128, 256 and 512
channels (width 32). ``map_external_key`` maps those names onto this encoder's (``down_tr64.ops.0.conv1.weight`` ->
``levels.0.ops.0.conv1.weight``); the published decoder (``up_tr*``) and output layer (``out_tr``) are not loaded.

One difference: the published BatchNorm (``ContBatchNorm3d``) normalises with the batch's statistics at inference too;
here BatchNorm uses its running statistics in eval mode, as every medxfer model (the files carry them).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from medxfer.errors import ConfigError
from medxfer.models.encoders import Encoder, register_encoder

GENESIS_LEVELS = 4  # the published network's encoder levels
_EXTERNAL_LEVEL = re.compile(r"^down_tr(\d+)\.(.+)$")


class _ConvUnit(nn.Module):
    """3x3x3 conv (with bias) - BatchNorm - ReLU, under the published unit's names (conv1, bn1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class GenesisEncoder(Encoder):
    """Models Genesis / SuPreM 3D U-Net encoder (see the module docstring): level ``i`` has ``2 * width * 2**i``
    channels at stride ``2**i``; ``depth`` levels, at most 4 (a larger value means all 4)."""

    def __init__(self, in_channels: int, width: int = 32, depth: int = GENESIS_LEVELS, spatial_dims: int = 3):
        super().__init__()
        if spatial_dims != 3:
            raise ConfigError(f"the Models Genesis encoder is 3D only, got spatial_dims {spatial_dims}")
        if width < 1 or depth < 1 or in_channels < 1:
            raise ConfigError(f"Models Genesis encoder needs in_channels, width and depth >= 1, got {in_channels}, "
                              f"{width}, {depth}")
        depth = min(int(depth), GENESIS_LEVELS)
        self.in_channels, self.spatial_dims = int(in_channels), 3
        self.channels = [2 * int(width) * 2**i for i in range(depth)]
        self.strides = [2**i for i in range(depth)]
        levels, previous = [], self.in_channels
        for i, channels in enumerate(self.channels):
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 0:
                parts["pool"] = nn.MaxPool3d(2)
            parts["ops"] = nn.Sequential(_ConvUnit(previous, channels // 2), _ConvUnit(channels // 2, channels))
            levels.append(nn.Sequential(parts))
            previous = channels
        self.levels = nn.ModuleList(levels)
        self.first_conv_key = "levels.0.ops.0.conv1.weight"
        self.arch = {"name": "genesis", "in_channels": self.in_channels, "spatial_dims": 3, "width": int(width),
                     "depth": depth}

    @property
    def name(self) -> str:
        return "Models Genesis U-Net"

    def map_external_key(self, key: str) -> list[str]:
        """This encoder's name of a published network's key (``down_tr128.ops.1.bn1.weight`` ->
        ``levels.1.ops.1.bn1.weight``); [] for keys of other parts."""
        match = _EXTERNAL_LEVEL.match(key)
        if not match or int(match[1]) % 64 or (int(match[1]) // 64) & (int(match[1]) // 64 - 1):
            return []
        return [f"levels.{(int(match[1]) // 64).bit_length() - 1}.{match[2]}"]

    def outside_prefixes(self) -> tuple[str, ...]:
        """The published decoder and output layer, and encoder levels beyond ``depth``."""
        beyond = tuple(f"down_tr{64 * 2**i}." for i in range(len(self.channels), GENESIS_LEVELS))
        return ("up_tr", "out_tr.", *beyond, *(f"levels.{i}." for i in range(len(self.channels), GENESIS_LEVELS)))


def _create(name: str, in_channels: int, spatial_dims: int, width: int, depth: int | None,
            options: dict) -> GenesisEncoder:
    if options:
        raise ConfigError(f"unknown option(s) for the genesis encoder: {', '.join(sorted(options))}")
    return GenesisEncoder(in_channels, width=width, depth=depth or GENESIS_LEVELS, spatial_dims=spatial_dims)


def _rebuild(arch: dict) -> GenesisEncoder:
    return GenesisEncoder(int(arch["in_channels"]), width=int(arch["width"]), depth=int(arch["depth"]))


register_encoder("genesis", _create, _rebuild)
