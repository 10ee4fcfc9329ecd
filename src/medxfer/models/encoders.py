"""Encoders: a common interface, the classic U-Net encoder (2D/3D) and timm-backed encoders.

Every encoder returns one feature map per level, channels-first, and describes itself:

- ``channels[i]``: channels of level ``i``; ``strides[i]``: its stride relative to the input
  (``[1, 2, 4, 8, 16]`` for the classic U-Net, ``[2, 4, 8, 16, 32]`` for ResNets, ``[4, 8, 16, 32]`` for Swin);
- ``levels[i]``: the modules that compute level ``i`` from level ``i - 1`` (so the first k can be frozen);
- ``arch``: a JSON-able dict from which :func:`encoder_from_arch` rebuilds the same architecture
  (stored in every encoder checkpoint manifest).

Input-size constraints: a segmenter needs spatial sizes that are multiples of ``strides[-1]``
(the total stride). Swin encoders are built for one ``img_size`` (square or ``[H, W]``) and accept only
that size; each stage's feature map (``img_size / 4, / 8, / 16, / 32``) must be divisible by the
window size (timm shrinks the window to the map when the map is smaller), e.g. img_size 224 with
window 7, 256 with window 8, 64 with window 4 (maps 16, 8, 4, 2 -> windows 4, 4, 4, 2).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from medxfer.errors import ConfigError, MedxferError
from medxfer.models.external import cached_timm_weights
from medxfer.models.inflation import inflate_network

logger = logging.getLogger(__name__)


class InputShapeError(MedxferError, ValueError):
    """An input batch has the wrong number of dimensions, channels or spatial size for the model."""


# --------------------------------------------------------------------------------------------------
# Small layer helpers shared with the decoders (2D and 3D from one code path).


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[_check_dims(spatial_dims)]


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[_check_dims(spatial_dims)]


def batch_norm_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[_check_dims(spatial_dims)]


def max_pool_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[_check_dims(spatial_dims)]


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


NORMS = ("batch", "instance")


def norm_nd(spatial_dims: int, kind: str = "batch") -> Any:
    """The normalisation layer class of a U-Net block: ``batch`` (BatchNorm) or ``instance`` (InstanceNorm with
    learnt affine parameters, nnU-Net's choice for 3D batches of 2, where batch statistics are noisy)."""
    if kind == "batch":
        return batch_norm_nd(spatial_dims)
    if kind == "instance":
        instance = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[_check_dims(spatial_dims)]
        return lambda channels: instance(channels, affine=True)
    raise ConfigError(f"unknown norm {kind!r} (known: {', '.join(NORMS)})")


def double_conv(in_channels: int, out_channels: int, spatial_dims: int, norm: str = "batch") -> nn.Sequential:
    """(3x3 conv - norm - ReLU) x 2, the U-Net building block. Convs have no bias (the norm follows)."""
    conv, norm = conv_nd(spatial_dims), norm_nd(spatial_dims, norm)
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
        conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )


def shape_text(shape: Iterable[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# --------------------------------------------------------------------------------------------------
# Interface


class Encoder(nn.Module):
    """Base class: ``forward(x) -> list[Tensor]`` (one NC... map per level) plus self-description.

    Subclasses set ``channels``, ``strides``, ``spatial_dims``, ``in_channels``, ``levels``, ``arch`` and
    ``first_conv_key`` (state-dict key of the first convolution's weight, used to adapt checkpoints
    made for another number of input channels).
    """

    channels: list[int]
    strides: list[int]
    spatial_dims: int
    in_channels: int
    arch: dict[str, Any]
    first_conv_key: str | None = None

    def __init__(self) -> None:
        super().__init__()
        # Number of leading levels frozen by ``set_frozen_levels``; they stay in eval mode (BatchNorm
        # statistics included) whatever ``train()`` is called with.
        self.frozen_levels = 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The levels applied in turn, each one's output kept (encoders whose levels are not a plain chain of
        modules override this)."""
        self.check_input(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features

    # -- description -------------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.channels)

    @property
    def total_stride(self) -> int:
        """Stride of the deepest level: a segmenter's input sizes must be multiples of it."""
        return int(self.strides[-1])

    @property
    def name(self) -> str:
        return str(self.arch.get("model_name", self.arch.get("name", type(self).__name__)))

    def level_modules(self, index: int) -> list[nn.Module]:
        """The modules of level ``index`` as a flat list, whatever container ``levels`` uses."""
        group = self.levels[index]
        if isinstance(group, nn.Module):
            return [group]
        return list(group)

    def outside_keys(self) -> frozenset[str]:
        """Keys a file of the whole source network may hold that this encoder does not use (none here)."""
        return frozenset()

    # -- input checks --------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise InputShapeError (one line) when ``x`` cannot go through this encoder."""
        expected_ndim = self.spatial_dims + 2
        layout = "(N, C, H, W)" if self.spatial_dims == 2 else "(N, C, D, H, W)"
        if x.ndim != expected_ndim:
            raise InputShapeError(
                f"the {self.name} encoder is {self.spatial_dims}D and expects a {layout} batch, "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"the {self.name} encoder expects {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )

    # True when the deepest level is instance-normalised without running statistics: InstanceNorm then needs more
    # than one voxel per channel there, so an input of exactly the total stride in every axis fails
    _deepest_instance_norm = False

    @property
    def smallest_input(self) -> tuple[int, ...]:
        """The smallest spatial size this encoder takes: the total stride in every axis, the first axis doubled
        when the deepest level needs two voxels (instance-normalised)."""
        first = self.total_stride * (2 if self._deepest_instance_norm else 1)
        return (first,) + (self.total_stride,) * (self.spatial_dims - 1)

    def check_multiple_of_stride(self, x: torch.Tensor) -> None:
        """Raise InputShapeError unless every spatial size is a multiple of the total stride (and, for an
        instance-normalised deepest level, one axis at least twice it)."""
        size = tuple(x.shape[2:])
        if self._deepest_instance_norm and all(s < 2 * self.total_stride for s in size):
            raise InputShapeError(
                f"input size {shape_text(size)} leaves one voxel at the deepest level (stride {self.total_stride}) "
                f"of the {self.name} encoder, whose InstanceNorm needs 2 or more; make one axis at least "
                f"{2 * self.total_stride} (larger patches, or pad the images)"
            )
        multiple = self.total_stride
        if any(s % multiple for s in size):
            suggestion = tuple(max(multiple, -(-s // multiple) * multiple) for s in size)
            raise InputShapeError(
                f"input size {shape_text(size)} is not a multiple of {multiple} (the total stride of the "
                f"{self.name} encoder); pad or crop it, e.g. to {shape_text(suggestion)}"
            )

    # -- freezing ------------------------------------------------------------------------------------
    def set_frozen_levels(self, levels: int) -> None:
        """Freeze the first ``levels`` levels (0 = none, ``n_levels`` = all); unfreeze the rest."""
        if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= self.n_levels:
            raise ConfigError(
                f"cannot freeze {levels!r} levels of the {self.name} encoder: it has {self.n_levels} "
                f"(use 0..{self.n_levels} or 'all')"
            )
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        if levels == self.n_levels:
            frozen_modules: list[nn.Module] = [self]
        else:
            frozen_modules = [m for i in range(levels) for m in self.level_modules(i)]
        for module in frozen_modules:
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.frozen_levels = levels
        self.train(self.training)  # re-apply eval mode to the frozen part now

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if mode and self.frozen_levels:
            # Frozen parts stay in eval mode so that BatchNorm running statistics (and dropout/drop-path)
            # do not change; Lightning calls model.train() at every epoch, which ends up here.
            if self.frozen_levels == self.n_levels:
                super().train(False)
            else:
                for i in range(self.frozen_levels):
                    for module in self.level_modules(i):
                        module.eval()
        return self

    def extra_repr(self) -> str:
        return f"channels={self.channels}, strides={self.strides}, frozen_levels={self.frozen_levels}"


# --------------------------------------------------------------------------------------------------
# Classic U-Net encoder


class UNetEncoder(Encoder):
    """Ronneberger-style encoder: double conv blocks, 2x max-pooling between levels, widths doubling.

    Level ``i`` has ``width * 2**i`` channels at stride ``2**i``; 2D or 3D.
    """

    def __init__(self, in_channels: int, width: int = 32, depth: int = 5, spatial_dims: int = 2, norm: str = "batch"):
        super().__init__()
        _check_dims(spatial_dims)
        norm_nd(spatial_dims, norm)  # an unknown norm fails before anything is built
        if width < 1 or depth < 1 or in_channels < 1:
            raise ConfigError(
                f"U-Net encoder needs in_channels, width and depth >= 1, got {in_channels}, {width}, {depth}"
            )
        self.in_channels = int(in_channels)
        self.spatial_dims = int(spatial_dims)
        self.channels = [int(width) * 2**i for i in range(depth)]
        self.strides = [2**i for i in range(depth)]
        levels = []
        previous = in_channels
        for i, channels in enumerate(self.channels):
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 0:
                parts["pool"] = max_pool_nd(spatial_dims)(kernel_size=2, stride=2)
            parts["block"] = double_conv(previous, channels, spatial_dims, norm)
            levels.append(nn.Sequential(parts))
            previous = channels
        self.levels = nn.ModuleList(levels)
        self.first_conv_key = "levels.0.block.0.weight"
        self.arch = {
            "name": "unet",
            "in_channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
            "width": int(width),
            "depth": int(depth),
        }
        if norm != "batch":  # BatchNorm encoders keep the arch of checkpoints written before norm existed
            self.arch["norm"] = norm
        self._deepest_instance_norm = norm == "instance"


# --------------------------------------------------------------------------------------------------
# timm-backed encoders

_FLATTENED_CHILD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*?)\.(\d+)\.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class TimmEncoder(Encoder):
    """Any timm model that ``features_only=True`` builds as a feature list (ResNets, Swin, ConvNeXt...).

    ``spatial_dims=3``: the 2D network inflated to 3D (``inflation.inflate_network``; ResNets and
    EfficientNet-Lite), with the same state-dict keys, so 2D weights load into it inflated.

    ``depth`` keeps only the first ``depth`` feature levels (None or more than the model has = all).
    ``model_kwargs`` go to ``timm.create_model`` (e.g. Swin's ``img_size``, ``window_size``, ``embed_dim``,
    ``depths``, ``num_heads``); they are recorded in ``arch``. ``pretrained=True`` loads timm's default
    ImageNet weights from the local hub cache (a ConfigError saying what to fetch when they are not
    there: nothing downloads at run time); it is never the default and is not recorded in ``arch``
    since a checkpoint carries its own weights.
    """

    def __init__(
        self,
        model_name: str,
        in_channels: int = 3,
        depth: int | None = None,
        pretrained: bool = False,
        spatial_dims: int = 2,
        **model_kwargs: Any,
    ):
        super().__init__()
        import timm
        from timm.models import FeatureListNet

        if not timm.is_model(model_name):
            raise ConfigError(f"unknown timm model {model_name!r} (see timm.list_models())")
        n_available, feature_kwargs = self._probe_features(model_name, model_kwargs)
        n_levels = n_available if depth is None else max(1, min(int(depth), n_available))
        if depth is not None and depth > n_available:
            logger.debug("%s has %d feature levels; depth %d uses all of them", model_name, n_available, depth)
        weights_kwargs: dict[str, Any] = {}
        if pretrained:
            weights_kwargs = {"pretrained_cfg_overlay": {"file": str(self._cached_pretrained_file(model_name))}}
        try:
            body = timm.create_model(
                model_name,
                pretrained=pretrained,
                features_only=True,
                in_chans=in_channels,
                out_indices=tuple(range(n_levels)),
                **feature_kwargs,
                **weights_kwargs,
                **model_kwargs,
            )
        except TypeError as exc:
            raise ConfigError(f"timm model {model_name!r} does not accept these options: {exc}") from None
        if not isinstance(body, FeatureListNet):
            raise ConfigError(
                f"timm model {model_name!r} is built as {type(body).__name__}; medxfer supports timm models "
                "whose features_only form is a FeatureListNet (ResNet, Swin, ConvNeXt, EfficientNet, ...)"
            )
        if _check_dims(spatial_dims) == 3:
            inflate_network(body, model_name)  # ImageNet weights (pretrained) are inflated with it
        self.body = body
        self.model_name = model_name
        self._model_kwargs = dict(model_kwargs)
        self._full_model_keys: list[str] | None = None
        self.in_channels = int(in_channels)
        self.spatial_dims = int(spatial_dims)
        self.channels = [int(c) for c in body.feature_info.channels()]
        self.strides = [int(r) for r in body.feature_info.reduction()]
        self._channels_last = str(getattr(body.output_fmt, "value", body.output_fmt)) == "NHWC"
        # Level i = the body's children from just after level i-1's output up to level i's output.
        groups: list[list[nn.Module]] = []
        current: list[nn.Module] = []
        for name, module in body.items():
            current.append(module)
            if name in body.return_layers:
                groups.append(current)
                current = []
        # A plain list (not a ModuleList) so parameters are registered once, under ``body``.
        self.levels = groups
        first_conv = timm.models.get_pretrained_cfg_value(model_name, "first_conv")
        self.first_conv_key = f"body.{first_conv}.weight" if isinstance(first_conv, str) else None
        self.img_size = self._resolve_img_size(model_kwargs)
        if "swin" in model_name:
            self._check_swin_geometry()
        self.arch = {
            "name": "timm",
            "model_name": model_name,
            "in_channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
            "depth": n_levels,
            "model_kwargs": _jsonable(dict(model_kwargs)),
        }

    @staticmethod
    def _probe_features(model_name: str, model_kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Number of feature levels, and the arguments that make timm build them as a FeatureListNet
        (EfficientNets have their own feature class unless asked for the generic one)."""
        import timm
        from timm.models import FeatureListNet

        # Built on the meta device: no memory, no init cost, only the feature description.
        feature_kwargs: dict[str, Any] = {}
        with torch.device("meta"):
            try:
                probe = timm.create_model(model_name, pretrained=False, features_only=True, **model_kwargs)
                if not isinstance(probe, FeatureListNet) and type(probe).__name__ == "EfficientNetFeatures":
                    feature_kwargs = {"feature_cfg": {"flatten_sequential": True}}
                    probe = timm.create_model(model_name, pretrained=False, features_only=True, **feature_kwargs,
                                              **model_kwargs)
            except TypeError as exc:
                raise ConfigError(f"timm model {model_name!r} does not accept these options: {exc}") from None
        return len(probe.feature_info.channels()), feature_kwargs

    @staticmethod
    def _cached_pretrained_file(model_name: str) -> Path:
        """timm's ImageNet weights from the local cache, or a one-line ConfigError (never a download)."""
        path, where = cached_timm_weights(model_name)
        if path is None:
            raise ConfigError(
                f"model.options.pretrained: timm's ImageNet weights for {model_name} are not in the local cache "
                f"and medxfer does not download at run time: fetch them once where there is internet "
                f"({where}; e.g. python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\") "
                "or import a weights file: medxfer weights import FILE --preset PRESET --out DIR"
            )
        logger.info("%s: ImageNet weights from the local cache %s", model_name, path)
        return path

    def full_model_keys(self) -> list[str]:
        """State-dict keys of the whole timm model (classification head included), built on the meta device."""
        if self._full_model_keys is None:
            import timm

            with torch.device("meta"):
                full = timm.create_model(self.model_name, pretrained=False, **self._model_kwargs)
            self._full_model_keys = list(full.state_dict())
        return self._full_model_keys

    def outside_keys(self) -> frozenset[str]:
        """Keys of the whole timm model that this feature encoder leaves out (head, final 1x1 conv,
        levels beyond ``depth``): a full-model file may carry them; they are not loaded."""
        own = set(self.state_dict())
        outside = set()
        for key in self.full_model_keys():
            names = self.map_external_key(key)
            if not any(name in own for name in names):
                outside.update([key, *names])  # as in a timm file, and as in a deeper medxfer checkpoint
        return frozenset(outside)

    def _resolve_img_size(self, model_kwargs: dict[str, Any]) -> tuple[int, int] | None:
        patch_embed = getattr(self.body, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "strict_img_size", False):
            return tuple(int(s) for s in patch_embed.img_size)  # type: ignore[return-value]
        return None

    def _check_swin_geometry(self) -> None:
        for name, module in self.body.items():
            blocks = getattr(module, "blocks", None)
            if not blocks:
                continue
            block = blocks[0]
            resolution = getattr(block, "input_resolution", None)
            window = getattr(block, "window_size", None)
            if resolution is None or window is None:
                continue
            if any(int(r) % int(w) for r, w in zip(resolution, window)):
                raise ConfigError(
                    f"{self.model_name}: img_size {shape_text(self.img_size or ())} gives a "
                    f"{shape_text(resolution)} feature map in stage {name}, not divisible by the window "
                    f"{shape_text(window)}; choose img_size and window_size so that img_size/32 is a multiple "
                    "of window_size (e.g. 224 with 7, 256 with 8) or smaller than it"
                )

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if self.img_size is not None and tuple(x.shape[2:]) != self.img_size:
            raise InputShapeError(
                f"the {self.model_name} encoder was built for img_size {shape_text(self.img_size)} and got "
                f"{shape_text(x.shape[2:])}; rebuild it with that img_size (options.img_size) or resize/crop"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        features = self.body(x)
        if self._channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return features

    def map_external_key(self, key: str) -> list[str]:
        """Names a key of the full timm/torchvision model can have in this encoder's state dict."""
        candidates = [f"body.{key}"]
        flattened = _FLATTENED_CHILD.sub(r"\1_\2.", key, count=1)
        if flattened != key:
            # features_only flattens Sequential children: Swin's ``layers.0.`` becomes ``layers_0.``.
            candidates.append(f"body.{flattened}")
        return candidates


# --------------------------------------------------------------------------------------------------
# Factories

# Encoders defined in modules of their own (``genesis``, ``monai_networks``; imported by the package), which import
# this one: family -> (create(name, in_channels, spatial_dims, width, depth, options), rebuild(arch)). The family is
# the encoder name before any ":" (``monai:SegResNet``) and the ``arch["name"]`` of its checkpoints.
REGISTERED_ENCODERS: dict[str, tuple[Callable[..., Encoder], Callable[[dict[str, Any]], Encoder]]] = {}


def register_encoder(family: str, create: Callable[..., Encoder], rebuild: Callable[[dict[str, Any]], Encoder]) -> None:
    REGISTERED_ENCODERS[family] = (create, rebuild)


def create_encoder(
    name: str,
    in_channels: int = 3,
    *,
    spatial_dims: int = 2,
    width: int = 32,
    depth: int | None = 5,
    pretrained: bool = False,
    **options: Any,
) -> Encoder:
    """Build an encoder by name: ``"unet"`` (classic, 2D/3D; uses width and depth), ``"genesis"`` (the Models
    Genesis / SuPreM 3D U-Net's, ``genesis``), ``"monai:NETWORK"`` (the encoder half of a MONAI network,
    ``monai_networks``; options are MONAI's arguments there) or a timm model name (``depth`` caps the number of
    levels; ``options`` go to timm, e.g. Swin's img_size; 3D: the 2D network inflated, for ResNets and
    EfficientNet-Lite, see ``inflation``)."""
    family = name.split(":", 1)[0]
    if family in REGISTERED_ENCODERS:
        if pretrained:
            raise ConfigError(f"the {name} encoder has no built-in weights; import them: medxfer weights import FILE "
                              "--preset PRESET --out DIR")
        return REGISTERED_ENCODERS[family][0](name, in_channels, spatial_dims, width, depth, options)
    if name == "unet":
        norm = options.pop("norm", "batch")
        if options:
            raise ConfigError(f"unknown option(s) for the unet encoder: {', '.join(sorted(options))}")
        if pretrained:
            raise ConfigError("the unet encoder has no pretrained weights; load an encoder checkpoint instead")
        return UNetEncoder(in_channels, width=width, depth=depth or 5, spatial_dims=spatial_dims, norm=norm)
    return TimmEncoder(name, in_channels=in_channels, depth=depth, pretrained=pretrained, spatial_dims=spatial_dims,
                       **options)


def encoder_from_arch(arch: dict[str, Any]) -> Encoder:
    """Rebuild an encoder (random weights) from its ``arch`` dict, e.g. read from a checkpoint manifest."""
    if not isinstance(arch, dict) or "name" not in arch:
        raise ConfigError(f"encoder architecture must be a dict with a 'name', got {arch!r}")
    kind = arch["name"]
    try:
        if kind == "unet":
            return UNetEncoder(
                int(arch["in_channels"]),
                width=int(arch["width"]),
                depth=int(arch["depth"]),
                spatial_dims=int(arch.get("spatial_dims", 2)),
                norm=str(arch.get("norm", "batch")),
            )
        if kind == "timm":
            return TimmEncoder(
                str(arch["model_name"]),
                in_channels=int(arch["in_channels"]),
                depth=arch.get("depth"),
                pretrained=False,
                spatial_dims=int(arch.get("spatial_dims", 2)),
                **dict(arch.get("model_kwargs") or {}),
            )
        if kind in REGISTERED_ENCODERS:
            return REGISTERED_ENCODERS[kind][1](arch)
    except KeyError as exc:
        raise ConfigError(f"encoder architecture {kind!r} lacks the field {exc}") from None
    known = ", ".join(["unet", "timm", *REGISTERED_ENCODERS])
    raise ConfigError(f"unknown encoder architecture {kind!r} (known: {known})")


def describe_levels(encoder: Encoder) -> list[dict[str, int]]:
    """One dict per level (index, channels, stride): what manifests and the CLI show."""
    return [
        {"level": i, "channels": int(c), "stride": int(s)}
        for i, (c, s) in enumerate(zip(encoder.channels, encoder.strides))
    ]

