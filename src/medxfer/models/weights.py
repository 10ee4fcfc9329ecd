"""Encoder weights: save/load the encoder alone, import timm/torchvision state dicts, checkpoint folders and
freezing (parameter counts: ``parameters``).

An encoder checkpoint is two files side by side, both written atomically (the ``.pt`` first, so a
manifest never points at a half-written state dict):

- ``NAME.pt``: ``torch.save`` of the encoder's plain state dict;
- ``NAME.json``: the manifest: ``format``, ``arch`` (rebuilds the encoder), ``channels``, ``strides``,
  ``spatial_dims``, ``in_channels``, ``length`` (pretraining length), ``source``, ``n_parameters``,
  ``created``, plus any free-form fields the caller adds (validation accuracy, scheme, ...).

A pretraining run writes one checkpoint per length into a folder (``encoder_len0005.pt`` + ``.json``);
``list_checkpoints`` reads such a folder. Files are always read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from medxfer.errors import CheckpointError, ConfigError
from medxfer.io import atomic_torch_save, atomic_write_json
from medxfer.models.encoders import Encoder, encoder_from_arch
from medxfer.models.external import efficientnet_pytorch_to_timm, is_efficientnet_pytorch_layout, stage_sizes
from medxfer.models.inflation import inflate_kernel
from medxfer.models.parameters import count_parameters

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "medxfer.encoder"
MANIFEST_VERSION = 1
_RESERVED_FIELDS = frozenset(
    {"format", "format_version", "state_dict", "arch", "channels", "strides", "spatial_dims", "in_channels",
     "length", "source", "n_parameters", "created"}
)
# Containers other tools wrap a state dict in (Lightning/timm train scripts: "state_dict", many repos: "model").
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "state_dict_ema", "net", "network")
# Prefixes added by DistributedDataParallel / DataParallel and torch.compile.
_RUNTIME_PREFIXES = ("module.", "_orig_mod.")
# Where an encoder can sit inside a bigger model's state dict (ours: Segmenter/Classifier/Lightning task).
_OWNER_PREFIXES = ("", "encoder.", "model.encoder.", "net.encoder.", "backbone.", "model.", "net.")
# Classification heads (and Swin's final norm) of timm/torchvision models: not part of a feature encoder.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "norm.", "fc_norm.", "pre_logits.", "global_pool.", "last_linear.")
# Buffers an architecture computes itself: a file may lack them (the model's own values are kept).
_DERIVED_BUFFERS = ("num_batches_tracked", "relative_position_index")


# --------------------------------------------------------------------------------------------------
# Helpers


def get_encoder(model: nn.Module) -> Encoder:
    """The encoder of a segmenter, classifier, Lightning task... (the outermost ``Encoder`` inside)."""
    if isinstance(model, Encoder):
        return model
    if isinstance(model, nn.Module):
        for module in model.modules():
            if isinstance(module, Encoder):
                return module
    raise ConfigError(f"{type(model).__name__} has no medxfer encoder")


def manifest_path(path: str | os.PathLike) -> Path:
    """The JSON manifest beside a checkpoint file."""
    return Path(path).with_suffix(".json")


def checkpoint_filename(length: int) -> str:
    """File name of the checkpoint for one pretraining length inside a checkpoint folder."""
    return f"encoder_len{int(length):04d}.pt"


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Saving


def save_encoder(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    length: int | None = None,
    source: str | None = None,
    **extra: Any,
) -> Path:
    """Save the encoder of ``model`` to ``path`` (``.pt``) and its manifest beside it (``.json``).

    ``extra`` fields (e.g. ``val_accuracy=0.81, scheme="simple"``) go into the manifest as they are;
    they must be JSON-able and must not reuse a reserved field name. Returns the ``.pt`` path.
    """
    encoder = get_encoder(model)
    path = Path(path)
    if path.suffix == ".json":
        raise ConfigError(f"{path}: give the .pt path of the checkpoint; the manifest is written beside it")
    clashing = sorted(set(extra) & _RESERVED_FIELDS)
    if clashing:
        raise ConfigError(f"save_encoder: extra field(s) {', '.join(clashing)} clash with manifest fields")
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "state_dict": path.name,
        "arch": encoder.arch,
        "channels": list(encoder.channels),
        "strides": list(encoder.strides),
        "spatial_dims": encoder.spatial_dims,
        "in_channels": encoder.in_channels,
        "length": None if length is None else int(length),
        "source": source,
        "n_parameters": count_parameters(encoder),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    json.dumps(manifest)  # fail before writing anything if an extra field is not JSON-able
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    atomic_torch_save(state, path)
    atomic_write_json(manifest_path(path), manifest)
    logger.info("saved %s encoder (length=%s) to %s", encoder.name, length, path)
    return path


# --------------------------------------------------------------------------------------------------
# Reading


def _read_manifest_file(path: str | os.PathLike, expected_format: str, what: str) -> dict[str, Any]:
    json_path = manifest_path(path)
    if not json_path.is_file():
        raise CheckpointError(f"{json_path}: {what} manifest not found")
    try:
        manifest = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: unreadable {what} manifest ({_first_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise CheckpointError(f"{json_path}: not a medxfer {what} manifest (no format {expected_format!r})")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an encoder checkpoint (``.pt`` or ``.json`` path). CheckpointError if missing or invalid."""
    return _read_manifest_file(path, MANIFEST_FORMAT, "encoder")


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, Mapping) or _is_tensor_mapping(obj):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    if not obj:
        raise CheckpointError(f"{source}: holds an empty state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: not a state dict: {len(not_tensors)} entr(ies) are not tensors ({_few(not_tensors)})"
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _RUNTIME_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict file safely (``weights_only=True``, or a ``.safetensors`` file), unwrapping
    ``state_dict``/``model`` containers and ``module.`` prefixes. Anything else (corrupt file, pickled object, text) is a
    CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":  # the format of timm's hub files
            return _unwrap(load_safetensors(path, device="cpu"), str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)})") from None
    state = _unwrap(obj, str(path))
    for key, tensor in state.items():  # NaN weights would train or predict garbage without a word
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: weights contain NaN or infinite values ({key}); "
                                  "refusing to train or predict with them")
    return state


# --------------------------------------------------------------------------------------------------
# Loading into an encoder


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Weights of a first conv made for another number of input channels (e.g. RGB -> grayscale).

    1 channel: sum over the original channels (a gray image copied to RGB gives the same response);
    otherwise cycle the original channels and rescale so a constant image keeps its response.
    """
    original = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / original)
    tiled = weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return tiled * (original / in_channels)


def _arch_differences(saved: Any, current: dict[str, Any]) -> str:
    if not isinstance(saved, dict):
        return ""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k} {saved.get(k)!r} vs {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    return ("; architecture (checkpoint vs model): " + ", ".join(diffs[:4])) if diffs else ""


def _in_timm_layout(state: Mapping[str, torch.Tensor], encoder: Encoder, source: str) -> Mapping[str, torch.Tensor]:
    """The state dict renamed to timm's keys when it comes from another implementation of the encoder's
    network (efficientnet-pytorch / efficientnet-lite-pytorch files); otherwise as it is."""
    if not is_efficientnet_pytorch_layout(state):
        return state
    full_model_keys = getattr(encoder, "full_model_keys", None)
    sizes = stage_sizes(full_model_keys()) if full_model_keys else []
    if not sizes:
        raise CheckpointError(f"{source}: an EfficientNet file (efficientnet-pytorch keys: _conv_stem, _blocks...) "
                              f"does not fit the {encoder.name} encoder; use an efficientnet_lite preset")
    return efficientnet_pytorch_to_timm(state, sizes, source)


def import_state_dict(
    target: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    adapt_input_channels: bool = True,
    saved_arch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``state_dict`` into the encoder of ``target``, accepting our own encoder checkpoints,
    segmenter/classifier/Lightning state dicts (``encoder.`` inside) and timm/torchvision models of the
    same architecture (their classification head, e.g. ``fc.*``, and anything else outside the feature
    encoder is dropped), also in efficientnet-pytorch's key layout. Missing/unexpected keys or wrong shapes
    raise CheckpointError naming a few keys and the counts.

    2D kernels loaded into a 3D encoder are inflated (``inflation.inflate_kernel``). Returns what was
    done: ``loaded`` (tensors), ``dropped`` (keys outside the encoder), ``input_channels`` (``[file,
    encoder]`` channels of the first convolution) and ``inflated`` (2D kernels made 3D)."""
    encoder = get_encoder(target)
    expected = encoder.state_dict()
    map_external = getattr(encoder, "map_external_key", None)
    state_dict = _in_timm_layout(state_dict, encoder, source)
    outside = encoder.outside_keys()
    # whole-network files (MONAI, Models Genesis) hold a decoder and heads under these prefixes: not loaded
    outside_prefixes = _HEAD_PREFIXES + tuple(getattr(encoder, "outside_prefixes", tuple)())
    # the convolutions that read the input (a residual branch reads it too): adapted to the input channels
    input_keys = tuple(getattr(encoder, "input_conv_keys", None) or (encoder.first_conv_key,))

    def resolve(key: str) -> str | None:
        for candidate in [key, *(map_external(key) if map_external else [])]:
            if candidate in expected:
                return candidate
        return None

    best: tuple[int, str, dict[str, str]] | None = None
    for prefix in _OWNER_PREFIXES:
        mapping = {}
        for key in state_dict:
            if key.startswith(prefix):
                resolved = resolve(key[len(prefix):])
                if resolved is not None:
                    mapping[key] = resolved
        if best is None or len(mapping) > best[0]:
            best = (len(mapping), prefix, mapping)
    assert best is not None
    _, prefix, mapping = best

    unexpected, dropped = [], []
    for key in state_dict:
        if key in mapping:
            continue
        if prefix and not key.startswith(prefix):
            continue  # the rest of a bigger model (decoder, head): not the encoder's business
        inner = key[len(prefix):]
        (dropped if inner.startswith(outside_prefixes) or inner in outside else unexpected).append(key)
    provided = set(mapping.values())
    # BatchNorm's step counter is absent from some older torchvision files and never matters here; nor does a
    # Swin window's relative position index (a buffer computed from the window size, absent from older files).
    missing = [k for k in expected if k not in provided and not k.endswith(_DERIVED_BUFFERS)]
    # parts a file may leave out whole (e.g. SwinUNETR's conv blocks in the Swin-only self-supervised weights)
    at_init = []
    for part in getattr(encoder, "optional_prefixes", tuple)():
        keys = [k for k in expected if k.startswith(part)]
        if keys and not any(k in provided for k in keys):
            at_init += keys
    if at_init and len(at_init) < len(expected):
        missing = [k for k in missing if k not in set(at_init)]
        logger.warning("%s: holds no weights for %d tensor(s) of the %s encoder (%s); they keep their random "
                       "initialisation", source, len(at_init), encoder.name, _few(at_init))
    else:
        at_init = []
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        raise CheckpointError(
            f"{source}: does not fit the {encoder.name} encoder: {', '.join(parts)}"
            + _arch_differences(saved_arch, encoder.arch)
        )

    loaded = dict(expected)
    mismatched = []
    input_channels = None
    inflated = 0
    for key, target_key in mapping.items():
        tensor = state_dict[key]
        wanted = expected[target_key].shape
        if tensor.ndim == 4 and len(wanted) == 5 and tensor.shape[2:] == wanted[3:]:
            tensor = inflate_kernel(tensor, int(wanted[2]))  # a 2D kernel into a 3D encoder (I3D)
            inflated += 1
        if target_key == encoder.first_conv_key and tensor.ndim >= 2:
            input_channels = [int(tensor.shape[1]), int(wanted[1])]
        if tensor.shape != wanted:
            same_but_inputs = (
                tensor.ndim == len(wanted)
                and tensor.ndim >= 3
                and tensor.shape[0] == wanted[0]
                and tensor.shape[2:] == wanted[2:]
            )
            if adapt_input_channels and target_key in input_keys and same_but_inputs:
                logger.info(
                    "%s: adapting %s from %d to %d input channels", source, target_key, tensor.shape[1], wanted[1]
                )
                tensor = _adapt_input_conv(tensor, int(wanted[1]))
            else:
                mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(wanted)}")  # the file's name of it
                continue
        loaded[target_key] = tensor
    if mismatched:
        raise CheckpointError(
            f"{source}: does not fit the {encoder.name} encoder: {len(mismatched)} key(s) with other shapes "
            f"(checkpoint vs model: {_few(mismatched)})" + _arch_differences(saved_arch, encoder.arch)
        )
    if dropped:
        logger.info("%s: dropped %d key(s) the feature encoder does not use (classification head, levels "
                    "beyond its depth): %s", source, len(dropped), _few(dropped))
    encoder.load_state_dict(loaded, strict=True)
    if inflated:
        logger.info("%s: inflated %d 2D kernel(s) to 3D", source, inflated)
    return {"loaded": len(mapping), "dropped": len(dropped), "input_channels": input_channels, "inflated": inflated,
            "at_init": len(at_init)}


def load_encoder_weights(
    target: nn.Module, path: str | os.PathLike, *, adapt_input_channels: bool = True
) -> dict[str, Any]:
    """Load an encoder checkpoint, or a timm/torchvision/other state dict file, into ``target``'s encoder
    (``target``: an Encoder, Segmenter, Classifier or anything containing one).

    Returns the checkpoint's manifest, or ``{}`` for a file without one (an imported state dict).
    """
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    manifest: dict[str, Any] = {}
    if manifest_path(path).is_file():
        # An encoder checkpoint, or a whole model (e.g. a fine-tuned run's model.pt) to take the encoder from.
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            manifest = read_model_manifest(path)
    state = read_state_dict(path)
    import_state_dict(
        target,
        state,
        source=str(path),
        adapt_input_channels=adapt_input_channels,
        saved_arch=manifest.get("arch"),
    )
    return manifest


def encoder_from_checkpoint(path: str | os.PathLike) -> Encoder:
    """Rebuild the encoder described by a checkpoint's manifest and load its weights."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    manifest = read_manifest(path)
    try:
        encoder = encoder_from_arch(manifest.get("arch"))
    except ConfigError as exc:
        raise CheckpointError(f"{manifest_path(path)}: cannot rebuild the encoder: {exc}") from None
    import_state_dict(encoder, read_state_dict(path), source=str(path), saved_arch=manifest.get("arch"))
    return encoder


# --------------------------------------------------------------------------------------------------
# Checkpoint folders


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int | None, Path, dict[str, Any]]]:
    """``(length, path, manifest)`` for every encoder checkpoint in ``folder``, by pretraining length.

    A ``.pt`` without a manifest is skipped (with a warning); two files with the same length, or a
    manifest without an integer ``length``, are a CheckpointError, except in a folder of one checkpoint
    (``medxfer weights import`` writes one without a pretraining length): its length is None.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    checkpoints = []
    for path in sorted(folder.glob("*.pt")):
        if not manifest_path(path).is_file():
            logger.warning("%s: no manifest beside it; skipped", path)
            continue
        checkpoints.append((path, read_manifest(path)))
    if len(checkpoints) == 1 and checkpoints[0][1].get("length") is None:
        path, manifest = checkpoints[0]
        return [(None, path, manifest)]
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path, manifest in checkpoints:
        length = manifest.get("length")
        if isinstance(length, bool) or not isinstance(length, int):
            raise CheckpointError(f"{manifest_path(path)}: no integer pretraining 'length' in the manifest")
        if length in found:
            raise CheckpointError(f"{folder}: two checkpoints for length {length}: {found[length][0].name}, {path.name}")
        found[length] = (path, manifest)
    return [(length, path, manifest) for length, (path, manifest) in sorted(found.items())]


def resolve_checkpoint(path: str | os.PathLike, length: int | None = None) -> Path:
    """A checkpoint file as is, or the checkpoint of ``length`` inside a checkpoint folder (a folder of
    one checkpoint without a length, as ``medxfer weights import`` writes, needs none)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint not found")
    available = list_checkpoints(path)
    if len(available) == 1 and available[0][0] is None:
        return available[0][1]
    lengths = ", ".join(str(n) for n, _, _ in available) or "none"
    if length is None:
        raise CheckpointError(f"{path}: is a checkpoint folder; choose a pretraining length (available: {lengths})")
    for n, file, _ in available:
        if n == length:
            return file
    raise CheckpointError(f"{path}: no checkpoint for length {length} (available: {lengths})")


# --------------------------------------------------------------------------------------------------
# Freezing


def freeze_encoder(model: nn.Module, levels: int | Literal["all"]) -> Encoder:
    """Freeze the whole encoder (``"all"``), its first ``levels`` levels, or nothing (0) and unfreeze
    the rest of it. Frozen parts get ``requires_grad=False`` and stay in eval mode (BatchNorm running
    statistics unchanged) even when ``model.train()`` is called later, e.g. by Lightning."""
    encoder = get_encoder(model)
    if levels == "all":
        levels = encoder.n_levels
    encoder.set_frozen_levels(levels)  # type: ignore[arg-type]
    logger.debug("froze %d/%d levels of the %s encoder", encoder.frozen_levels, encoder.n_levels, encoder.name)
    return encoder


# --------------------------------------------------------------------------------------------------
# Whole models (a fine-tuned or segmentation-pretrained segmenter: encoder + decoder + head)

MODEL_FORMAT = "medxfer.model"
AUX_HEADS = "aux_heads."  # a Segmenter's deep-supervision heads (training only)


def save_model_weights(model: nn.Module, path: str | os.PathLike, *, manifest: dict[str, Any]) -> Path:
    """Save a whole segmenter's state dict (``.pt``) and a manifest beside it (``.json``).

    ``manifest["model"]`` must be the resolved ``ModelConfig`` as a dict, so the model can be rebuilt.
    The manifest also carries the encoder's ``arch``, so ``load_encoder_weights`` can take just the encoder.
    """
    if "model" not in manifest:
        raise ConfigError("save_model_weights: the manifest needs the resolved model config under 'model'")
    path = Path(path)
    encoder = get_encoder(model)
    spec = getattr(model, "spec", None) or {}
    if isinstance(manifest["model"], dict) and "upsample" in spec and "upsample" not in manifest["model"]:
        # the decoder is always named: a manifest without it is read as the older transposed-conv decoder
        manifest = {**manifest, "model": {**manifest["model"], "upsample": spec["upsample"]}}
    full = {
        "format": MODEL_FORMAT,
        "format_version": MANIFEST_VERSION,
        "state_dict": path.name,
        "arch": encoder.arch,
        "n_parameters": count_parameters(model),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **manifest,
    }
    json.dumps(full)
    atomic_torch_save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
    atomic_write_json(manifest_path(path), full)
    return path


def read_model_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a whole-model checkpoint. CheckpointError if missing or invalid."""
    return _read_manifest_file(path, MODEL_FORMAT, "model")


def load_model_weights(model: nn.Module, path: str | os.PathLike, *, head: bool = True) -> dict[str, Any]:
    """Load a whole-model checkpoint into ``model``; with ``head=False`` everything but the 1x1 head
    (encoder + decoder, for a downstream task with other classes). Returns the manifest ({} if none).
    A MONAI preset also takes a checkpoint of the whole MONAI network (``monai_networks.from_monai_layout``)."""
    path = Path(path)
    manifest = read_model_manifest(path) if manifest_path(path).is_file() else {}
    state = read_state_dict(path)
    expected = model.state_dict()
    from_other = []
    network = getattr(get_encoder(model), "network", None)
    if network is not None:  # a MONAI preset: a MONAI checkpoint or bundle of the whole network loads too
        from medxfer.models.monai_networks import from_monai_layout

        converted = from_monai_layout(state, list(expected), network)
        if converted is not None:
            state, from_other = converted
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith(("head.", AUX_HEADS))}
        expected = {k: v for k, v in expected.items() if not k.startswith(("head.", AUX_HEADS))}
    elif any(k.startswith(AUX_HEADS) for k in state) != any(k.startswith(AUX_HEADS) for k in expected):
        # deep supervision's heads only train: a model with them takes weights without, and the other way round
        state = {k: v for k, v in state.items() if not k.startswith(AUX_HEADS)}
        expected = {k: v for k, v in expected.items() if not k.startswith(AUX_HEADS)}
    missing = [k for k in expected if k not in state]
    unexpected = from_other + [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{len(x)} {what} ({_few(x)})" for x, what in
                 ((missing, "missing key(s)"), (unexpected, "unexpected key(s)"), (mismatched, "key(s) with other shapes"))
                 if x]
        decoder = any(".up." in k for k in missing + unexpected)  # transposed conv vs 1x1 conv + interpolation
        hint = (" (the decoders upsample differently: set model.upsample to the checkpoint's, 'transposed' for "
                "checkpoints written before that key existed)") if decoder else ""
        raise CheckpointError(f"{path}: does not fit this model: {', '.join(parts)}{hint}")
    model.load_state_dict(state, strict=False)  # every key was checked above; left out: heads not loaded
    return manifest

