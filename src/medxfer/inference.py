"""A trained segmenter and the run's own preprocessing, shared by ``medxfer predict`` and the report's
overlay grid: ``load_trained_model``, ``preprocessing_from_record``, ``probabilities``, ``label_map``.

Preprocessing comes from the run's ``result.json`` (its resolved config), else from the ``data`` entry of
the model manifest, else from the defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from skimage.transform import resize as sk_resize

from medxfer.config import ModelConfig, parse_config
from medxfer.data.base import Case
from medxfer.data.folders import resize_case_arrays
from medxfer.errors import CheckpointError, ConfigError, MedxferError
from medxfer.evaluation.evaluate import predict_probabilities
from medxfer.models import build_segmenter
from medxfer.models.segmenter import saved_model_spec
from medxfer.models.weights import load_model_weights, manifest_path, read_model_manifest, read_state_dict

SPACING_TOLERANCE = 0.1  # relative: an input spacing this far outside the training range is a mismatch
MODEL_FILE = "model.pt"
DEFAULT_SETTINGS: dict[str, Any] = {
    "normalization": "zscore", "percentiles": (0.5, 99.5), "patch_size": None, "resize": None,
    "threshold": 0.5, "overlap": 0.25, "sw_batch_size": 4, "spatial_dims": None, "plan": None,
}


def _model_file(path: Path) -> Path:
    if path.is_dir():
        path = path / MODEL_FILE
    elif path.suffix == ".json":
        path = path.with_suffix(".pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found (give a run folder or its model.pt)")
    return path


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def _first_conv_in_channels(state: dict[str, torch.Tensor]) -> Optional[int]:
    for key, tensor in state.items():  # state-dict order follows module order: the encoder's stem comes first
        if key.startswith("encoder.") and tensor.ndim in (4, 5):
            return int(tensor.shape[1])
    return None


def load_trained_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned segmenter from ``model.pt`` (a run folder or the file) and load its weights.

    The architecture comes from the manifest beside it (``model.json``, written by
    ``medxfer.models.weights.save_model_weights``), else from the run's ``result.json`` config with the
    channel / class counts read off the weights. Returns ``(model in eval mode, info)``, info holding
    ``manifest`` ({} if none), ``record`` (result.json or None) and ``model_path``.
    """
    model_path = _model_file(Path(path))
    manifest = read_model_manifest(model_path) if manifest_path(model_path).is_file() else {}
    record = _read_json(model_path.parent / "result.json")
    spec = manifest.get("model") if isinstance(manifest.get("model"), dict) else None
    if spec is None and record is not None:
        spec = dict((record.get("config") or {}).get("model") or {}) or None
        if spec is not None and (spec.get("n_classes") is None or spec.get("in_channels") is None):
            state = read_state_dict(model_path)
            if spec.get("n_classes") is None and isinstance(state.get("head.weight"), torch.Tensor):
                spec["n_classes"] = int(state["head.weight"].shape[0])
            if spec.get("in_channels") is None:
                spec["in_channels"] = _first_conv_in_channels(state)
    if spec is None:
        raise CheckpointError(f"{model_path}: no model.json manifest or result.json beside it says which "
                              "architecture the weights belong to")
    source = manifest_path(model_path) if manifest.get("model") is spec else model_path.parent / "result.json"
    spec = saved_model_spec(spec)
    try:  # the same bounds as a config file's model section (a width of 200000 is a corrupt manifest)
        spec = parse_config(spec, ModelConfig, source=str(source)).model_dump(mode="json")
    except ConfigError as exc:
        raise CheckpointError(f"{exc} (the architecture of {model_path.name})") from None
    try:
        model = build_segmenter(spec)
    except MedxferError as exc:
        raise CheckpointError(f"{model_path}: cannot rebuild the model: {exc}") from None
    load_model_weights(model, model_path)
    model.eval()
    return model, {"manifest": manifest, "record": record, "model_path": str(model_path)}


def preprocessing_from_record(record: Optional[dict[str, Any]], manifest: Optional[dict[str, Any]] = None
                              ) -> dict[str, Any]:
    """The inference settings of a run: its config's data/evaluation sections (result.json), else the
    manifest's ``data`` entry (threshold and sliding-window settings then keep their defaults), else the
    defaults."""
    settings = dict(DEFAULT_SETTINGS)
    config = (record or {}).get("config") or {}
    if config:
        data, evaluation = config.get("data") or {}, config.get("evaluation") or {}
        settings.update({
            "normalization": data.get("normalization", settings["normalization"]),
            "percentiles": tuple(data.get("percentile_clip", settings["percentiles"])),
            "patch_size": data.get("patch_size"), "resize": data.get("resize"),
            "spatial_dims": data.get("spatial_dims"),
            "threshold": evaluation.get("threshold", settings["threshold"]),
            "overlap": evaluation.get("sw_overlap", settings["overlap"]),
            "sw_batch_size": evaluation.get("sw_batch_size", settings["sw_batch_size"]),
        })
        settings["source"] = "result.json"
    elif isinstance((manifest or {}).get("data"), dict):  # finetune stores the resolved DataConfig
        data = manifest["data"]
        settings.update({
            "normalization": data.get("normalization", settings["normalization"]),
            "percentiles": tuple(data.get("percentile_clip", settings["percentiles"])),
            "patch_size": data.get("patch_size"), "resize": data.get("resize"),
            "spatial_dims": data.get("spatial_dims"),
        })
        settings["source"] = "model manifest"
    else:
        settings["source"] = "defaults"
    # a run on preprocessed data (data.preprocess): inputs are resampled and normalised by its plan
    settings["plan"] = (record or {}).get("preprocess_plan") or (manifest or {}).get("preprocess_plan")
    return settings


def probabilities(model: torch.nn.Module, image: np.ndarray, settings: dict[str, Any],
                  spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Softmax ``(n_classes, *S)`` of one ``(C, *S)`` image at its own size, preprocessed per ``settings``
    (resized to the training size and back when the run resized its images; with a preprocessing plan,
    resampled from ``spacing`` (mm, None = the plan's) to the plan's spacing, normalised by the plan, and
    the probabilities resampled back to the input's grid)."""
    spatial = tuple(image.shape[1:])
    resize = settings.get("resize")
    normalization = settings["normalization"]
    plan = settings.get("plan")
    if plan is not None:
        from medxfer.data.preprocess import preprocess_case

        spacing = plan["target_spacing"] if spacing is None else spacing
        image, _ = preprocess_case(image, None, spacing, plan)
        normalization = "none"
    elif resize is not None and tuple(resize) != spatial:
        image, _, _ = resize_case_arrays(image, None, resize, None)
    encoder = model.encoder
    probs = predict_probabilities(
        model, Case(image=image, label=None, case_id="input"), normalization=normalization,
        percentiles=tuple(settings["percentiles"]), in_channels=encoder.in_channels,
        patch_size=settings.get("patch_size"), size_multiple=int(max(encoder.strides)),
        overlap=settings["overlap"], sw_batch_size=settings["sw_batch_size"],
    )
    if plan is not None and probs.shape[1:] != spatial:
        from medxfer.data.preprocess import resample_to_input

        probs = resample_to_input(probs, spatial, spacing)
    elif probs.shape[1:] != spatial:
        probs = np.stack([sk_resize(p, spatial, order=1, preserve_range=True) for p in probs]).astype(np.float32)
    return probs


def label_map(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices: binary foreground where ``p > threshold`` (strict, as the metrics), else argmax."""
    if probs.shape[0] == 2:
        return (probs[1] > threshold).astype(np.int64)
    return probs.argmax(0).astype(np.int64)


def spacing_of_run(record: Optional[dict[str, Any]], manifest: Optional[dict[str, Any]] = None
                   ) -> Optional[dict[str, list[float]]]:
    """The training spacing a run recorded (result.json, else the model manifest); None for runs on data
    without spacing, or written before it was recorded."""
    for source in (record or {}, manifest or {}):
        spacing = source.get("train_spacing")
        if isinstance(spacing, dict) and spacing.get("median"):
            return spacing
    return None


def spacing_mismatch(spacing: Sequence[float], trained: dict[str, list[float]]) -> bool:
    """Whether an input spacing lies outside the training range (widened by ``SPACING_TOLERANCE``) on
    any axis. A 2D run's in-plane spacing is compared with the last two axes of a volume's."""
    lo, hi = trained["min"], trained["max"]
    values = list(spacing)[-len(lo):]
    return any(v < a * (1 - SPACING_TOLERANCE) or v > b * (1 + SPACING_TOLERANCE)
               for v, a, b in zip(values, lo, hi))
