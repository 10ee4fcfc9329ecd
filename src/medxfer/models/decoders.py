"""U-Net decoders (plain and attention-gated), 2D and 3D, for any encoder's channels and strides.

The decoder walks from the deepest level up: at each shallower level it upsamples, concatenates the
level's skip features (optionally passed through an additive attention gate, Oktay et al. 2018) and applies
a double conv. Encoders whose first level is already downsampled (ResNet: stride 2, Swin: stride 4) get extra
upsampling stages without skips, so the output is always at input resolution for inputs whose size is a
multiple of the total stride.

Upsampling (``upsample``): ``"interpolate"`` (the default) is a 1x1 convolution followed by bilinear
(trilinear) interpolation; ``"transposed"`` is a transposed convolution with kernel = stride = the stride
ratio, medxfer's only decoder until the default changed. A transposed convolution whose kernel equals its
stride paints every coarse pixel with one learnt k x k pattern: early in training and on few images the
predictions show that lattice (a class on every other pixel of every other row); interpolation has none.
Checkpoints keep their decoder: a manifest without ``upsample`` was written by the transposed-conv decoder
(``segmenter.LEGACY_UPSAMPLE``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medxfer.errors import ConfigError
from medxfer.models.encoders import (
    InputShapeError,
    batch_norm_nd,
    conv_nd,
    conv_transpose_nd,
    double_conv,
    shape_text,
)


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, "Attention U-Net").

    The gating signal ``g`` is the coarser decoder feature (before upsampling). The skip ``x`` is
    brought to g's grid by a strided conv (theta), g by a 1x1 conv (phi); ``relu(theta + phi)`` goes
    through a 1x1 conv (psi) and a sigmoid to one coefficient per coarse voxel, which is resampled to
    x's grid and multiplies x. A 1x1 conv + BatchNorm (W) then mixes the gated skip, as in the paper.
    The last coefficients are kept in ``last_coefficients`` (detached) for visualisation.
    """

    def __init__(
        self,
        skip_channels: int,
        gate_channels: int,
        inter_channels: int | None = None,
        factor: int = 2,
        spatial_dims: int = 2,
    ):
        super().__init__()
        conv = conv_nd(spatial_dims)
        inter_channels = inter_channels or max(skip_channels // 2, 1)
        self.spatial_dims = spatial_dims
        # No bias on theta: phi's bias already shifts the sum.
        self.theta = conv(skip_channels, inter_channels, kernel_size=factor, stride=factor, bias=False)
        self.phi = conv(gate_channels, inter_channels, kernel_size=1, bias=True)
        self.psi = conv(inter_channels, 1, kernel_size=1, bias=True)
        self.output = nn.Sequential(
            conv(skip_channels, skip_channels, kernel_size=1, bias=False),
            batch_norm_nd(spatial_dims)(skip_channels),
        )
        self.last_coefficients: torch.Tensor | None = None

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        theta = self.theta(skip)
        phi = self.phi(gate)
        if phi.shape[2:] != theta.shape[2:]:
            phi = F.interpolate(phi, size=theta.shape[2:], mode=self._mode, align_corners=False)
        coefficients = torch.sigmoid(self.psi(F.relu(theta + phi)))
        if coefficients.shape[2:] != skip.shape[2:]:
            coefficients = F.interpolate(coefficients, size=skip.shape[2:], mode=self._mode, align_corners=False)
        self.last_coefficients = coefficients.detach()
        return self.output(skip * coefficients)

    @property
    def _mode(self) -> str:
        return "bilinear" if self.spatial_dims == 2 else "trilinear"


UPSAMPLE_MODES = ("interpolate", "transposed")


def upsampling(in_channels: int, out_channels: int, factor: int, spatial_dims: int, mode: str) -> nn.Module:
    """Upsample by ``factor`` and map ``in_channels`` -> ``out_channels`` (see the module docstring)."""
    if factor == 1:
        return conv_nd(spatial_dims)(in_channels, out_channels, kernel_size=1)
    if mode == "transposed":
        return conv_transpose_nd(spatial_dims)(in_channels, out_channels, kernel_size=factor, stride=factor)
    if mode == "interpolate":
        # the 1x1 conv first: interpolation is linear, so the order is the same map, on fewer channels
        return nn.Sequential(conv_nd(spatial_dims)(in_channels, out_channels, kernel_size=1),
                             nn.Upsample(scale_factor=factor, mode="bilinear" if spatial_dims == 2 else "trilinear",
                                         align_corners=False))
    raise ConfigError(f"decoder: unknown upsample {mode!r} (known: {', '.join(UPSAMPLE_MODES)})")


class UpStage(nn.Module):
    """Upsample by ``factor``, concatenate the (optionally gated) skip, double conv."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        factor: int,
        spatial_dims: int,
        attention: bool = False,
        norm: str = "batch",
        upsample: str = "interpolate",
    ):
        super().__init__()
        self.out_channels = out_channels
        self.up = upsampling(in_channels, out_channels, factor, spatial_dims, upsample)
        self.gate = (
            AttentionGate(skip_channels, in_channels, factor=factor, spatial_dims=spatial_dims)
            if attention and skip_channels
            else None
        )
        self.block = double_conv(out_channels + skip_channels, out_channels, spatial_dims, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None and self.gate is not None:
            skip = self.gate(skip, x)
        x = self.up(x)
        if skip is not None:
            if x.shape[2:] != skip.shape[2:]:
                raise InputShapeError(
                    f"decoder: upsampled features {shape_text(x.shape[2:])} do not match the skip features "
                    f"{shape_text(skip.shape[2:])}; the input size must be a multiple of the total stride"
                )
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


def _split_factor(stride: int) -> list[int]:
    """Upsampling steps that multiply to ``stride``: 2x steps, plus one odd remainder if any."""
    factors = []
    while stride > 1 and stride % 2 == 0:
        factors.append(2)
        stride //= 2
    if stride > 1:
        factors.append(stride)
    return factors


class UNetDecoder(nn.Module):
    """U-Net decoder for an encoder with ``encoder_channels`` / ``encoder_strides`` (shallow to deep).

    ``decoder_channels[i]`` is the width after merging level ``i``'s skip (one per level except the
    deepest; default: the encoder's channels). ``final_channels`` is the width of the extra stages that
    bring a stride > 1 first level back to input resolution (default: ``decoder_channels[0]``).
    ``out_channels`` is the width of the returned full-resolution map. ``norm``: the blocks' normalisation
    (``encoders.NORMS``; the attention gates keep BatchNorm). ``upsample``: see the module docstring.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_strides: Sequence[int],
        spatial_dims: int = 2,
        decoder_channels: Sequence[int] | None = None,
        final_channels: int | None = None,
        attention: bool = False,
        norm: str = "batch",
        upsample: str = "interpolate",
    ):
        super().__init__()
        encoder_channels = [int(c) for c in encoder_channels]
        strides = [int(s) for s in encoder_strides]
        n = len(encoder_channels)
        if n < 1 or len(strides) != n:
            raise ConfigError(f"decoder: got {n} encoder channels but {len(strides)} strides")
        if strides[0] < 1 or any(b % a for a, b in zip(strides, strides[1:])) or strides != sorted(strides):
            raise ConfigError(f"decoder: encoder strides {strides} must increase by integer factors")
        if decoder_channels is None:
            decoder_channels = encoder_channels[:-1]
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != n - 1:
            raise ConfigError(
                f"decoder: need {n - 1} decoder channel counts (one per level but the deepest), "
                f"got {len(decoder_channels)}"
            )
        self.spatial_dims = spatial_dims
        self.attention = attention
        self.encoder_strides = strides
        self.total_stride = strides[-1]

        stages = []
        current = encoder_channels[-1]
        for i in reversed(range(n - 1)):
            stages.append(
                UpStage(
                    current,
                    encoder_channels[i],
                    decoder_channels[i],
                    factor=strides[i + 1] // strides[i],
                    spatial_dims=spatial_dims,
                    attention=attention,
                    norm=norm,
                    upsample=upsample,
                )
            )
            current = decoder_channels[i]
        self.stages = nn.ModuleList(stages)

        final_channels = int(final_channels or (decoder_channels[0] if decoder_channels else current))
        final = []
        for factor in _split_factor(strides[0]):
            final.append(UpStage(current, 0, final_channels, factor=factor, spatial_dims=spatial_dims, norm=norm,
                                 upsample=upsample))
            current = final_channels
        self.final_stages = nn.ModuleList(final)
        self.out_channels = current

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_stages(features)[-1]

    def forward_stages(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The output of every stage, coarsest first; the last one is ``forward``'s full-resolution map
        (deep supervision reads the others)."""
        if len(features) != len(self.stages) + 1:
            raise InputShapeError(
                f"decoder expects {len(self.stages) + 1} feature maps (one per encoder level), got {len(features)}"
            )
        x = features[-1]
        outputs = []
        for stage, skip in zip(self.stages, reversed(features[:-1])):
            x = stage(x, skip)
            outputs.append(x)
        for stage in self.final_stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def stage_channels(self) -> list[int]:
        """Channels of ``forward_stages``' outputs, coarsest first."""
        return [stage.out_channels for stage in [*self.stages, *self.final_stages]]

    def attention_maps(self) -> list[torch.Tensor]:
        """Gate coefficients of the last forward pass, shallowest level first (empty without attention)."""
        maps = [s.gate.last_coefficients for s in self.stages if s.gate is not None]
        return [m for m in reversed(maps) if m is not None]


class AttentionUNetDecoder(UNetDecoder):
    """U-Net decoder with additive attention gates on every skip connection."""

    def __init__(self, encoder_channels, encoder_strides, spatial_dims=2, decoder_channels=None, final_channels=None,
                 upsample="interpolate"):
        super().__init__(
            encoder_channels,
            encoder_strides,
            spatial_dims=spatial_dims,
            decoder_channels=decoder_channels,
            final_channels=final_channels,
            attention=True,
            upsample=upsample,
        )
