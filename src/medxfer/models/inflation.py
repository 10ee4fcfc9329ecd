"""2D -> 3D inflation (I3D, Carreira & Zisserman 2017): a 2D convolutional network turned into its 3D
counterpart, so that 2D ImageNet weights can start a 3D encoder.

A ``k x k`` kernel becomes ``k x k x k``: the 2D kernel repeated along depth and divided by ``k``, so a
volume of identical slices gives each slice the 2D network's response. Strides, dilations and pooling
are the same along depth as in-plane. Depth is padded by repeating the edge slices (in-plane padding is
as in 2D: zeros, or TensorFlow "same"), which keeps that identity exact up to the volume's borders and
does not darken the first and last slices of a patch.

Only layers whose 3D meaning is unambiguous are converted (convolutions, BatchNorm, max-pooling and
timm's BatchNorm+activation); any other 2D-specific layer (e.g. squeeze-excitation's spatial mean) makes
``inflate_network`` refuse with a ConfigError instead of silently computing something else.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medxfer.errors import ConfigError

# Modules whose forward works on 5D tensors as it does on 4D ones (elementwise, or containers of the
# converted layers that only add and chain them).
_DIMENSION_FREE = {
    "ReLU", "ReLU6", "SiLU", "GELU", "Sigmoid", "Hardswish", "Hardsigmoid", "Identity", "Dropout", "DropPath",
    "Sequential", "ModuleList", "ModuleDict", "FeatureListNet",
    # timm ResNet and EfficientNet blocks: convs, norms and a residual sum
    "BasicBlock", "Bottleneck", "DepthwiseSeparableConv", "InvertedResidual",
}


def inflate_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """A 2D kernel ``(out, in, kh, kw)`` as a 3D one ``(out, in, depth, kh, kw)``: repeated along depth
    and divided by ``depth`` (I3D), so identical slices give the 2D response."""
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


class InflatedConv3d(nn.Conv3d):
    """The 3D counterpart of a 2D convolution (kernel, stride and dilation of its height along depth).

    Depth is padded by repeating edge slices; height and width as the 2D layer did (fixed zero padding,
    or TensorFlow "same" padding computed from the input size for timm's ``Conv2dSame``).
    """

    def __init__(self, conv: nn.Conv2d):
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        self.tf_same = type(conv).__name__ in ("Conv2dSame", "Conv2dSameExport")
        if not self.tf_same and (isinstance(conv.padding, str) or conv.padding_mode != "zeros"):
            raise ConfigError(f"cannot inflate a convolution with padding {conv.padding!r} ({conv.padding_mode})")
        plane_padding = (0, 0) if self.tf_same else tuple(conv.padding)
        super().__init__(conv.in_channels, conv.out_channels, (kh, kh, kw), stride=(sh, sh, sw),
                         padding=(0, *plane_padding), dilation=(dh, dh, dw), groups=conv.groups,
                         bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        self.depth_padding = 0 if self.tf_same else int(plane_padding[0])
        with torch.no_grad():
            self.weight.copy_(inflate_kernel(conv.weight, kh))
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def _same_padding(self, size: int, axis: int) -> tuple[int, int]:
        k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            front, back = self._same_padding(x.shape[-3], 0)
            top, bottom = self._same_padding(x.shape[-2], 1)
            left, right = self._same_padding(x.shape[-1], 2)
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        else:
            front = back = self.depth_padding
        if front or back:
            x = F.pad(x, (0, 0, 0, 0, front, back), mode="replicate")
        return super().forward(x)


class BatchNormAct3d(nn.BatchNorm3d):
    """timm's ``BatchNormAct2d`` for 5D tensors: BatchNorm, then its dropout and activation modules
    (same state-dict keys, so 2D weights load as they are)."""

    def __init__(self, norm: nn.BatchNorm2d):
        super().__init__(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats, device=_device_of(norm))
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _device_of(module: nn.Module) -> Any:
    tensor = next(iter(module.state_dict().values()), None)
    return None if tensor is None else tensor.device


def _inflated(module: nn.Module, where: str) -> nn.Module | None:
    """The 3D replacement of one layer, or None when it has none (kept if dimension-free)."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        return InflatedConv3d(module)
    if isinstance(module, nn.BatchNorm2d):
        inflated = BatchNormAct3d(module) if kind == "BatchNormAct2d" else nn.BatchNorm3d(
            module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats, device=_device_of(module))
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                getattr(inflated, name).copy_(tensor)
        return inflated
    if isinstance(module, nn.MaxPool2d):
        def triple(v):
            return (v, v, v) if isinstance(v, int) else (v[0], *v)
        return nn.MaxPool3d(triple(module.kernel_size), triple(module.stride), triple(module.padding),
                            triple(module.dilation), ceil_mode=module.ceil_mode)
    if kind in _DIMENSION_FREE:
        return None
    raise ConfigError(f"cannot inflate {where or 'the network'} to 3D: its {kind} layer is 2D-only "
                      "(inflatable: ResNet and EfficientNet-Lite encoders)")


def inflate_network(network: nn.Module, where: str = "") -> nn.Module:
    """Turn ``network`` (in place) into its 3D counterpart; 2D weights are inflated, norms copied."""
    for name, child in list(network.named_children()):
        replacement = _inflated(child, f"{where}.{name}" if where else name)
        if replacement is not None:
            setattr(network, name, replacement)
        else:
            inflate_network(child, f"{where}.{name}" if where else name)
    return network
