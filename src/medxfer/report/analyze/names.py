"""Name mapping: the published tables' spellings and medxfer's own -> canonical encoder, dataset and
scheme keys, so a model joins the scores of its encoder; a YAML file (:class:`medxfer.config.NameMapConfig`)
adds or overrides entries."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from medxfer.config import NameMapConfig, parse_config, read_yaml


# Published reference tables' spellings (and medxfer's) -> canonical keys. Keys are compared after
# :func:`normalize_name`, so case, spaces, hyphens and underscores do not matter.
DEFAULT_ENCODER_NAMES = {
    "ResNet50 Attention U-Net": "resnet50", "resnet50": "resnet50",
    "Swin U-Net": "swin", "swin_transformer": "swin",
    "basic U-Net": "unet", "u-net_encoder": "unet",
    # medxfer model presets and encoder names
    "unet": "unet", "attention_unet": "unet", "unet3d": "unet", "attention_unet3d": "unet",
    "swin_unet": "swin",
}
DEFAULT_DATASET_NAMES = {"COVIDQUDataset": "covidqu", "COVID-QU": "covidqu"}
DEFAULT_SCHEME_NAMES = {"advanced_training": "advanced", "simple_training": "simple"}


def normalize_name(name: Any) -> str:
    """Lower case, letters and digits only: ``"COVID-QU"`` -> ``"covidqu"``. Missing -> ``""``."""
    if name is None or (isinstance(name, float) and math.isnan(name)):
        return ""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def _lookup(name: Any, *tables: Mapping[str, str]) -> Optional[str]:
    raw = "" if name is None else str(name)
    norm = normalize_name(name)
    for table in tables:
        if raw in table:
            return normalize_name(table[raw])
        for key, value in table.items():
            if normalize_name(key) == norm:
                return normalize_name(value)
    return None


def encoder_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    """Canonical encoder of a model or encoder name (``"ResNet50 Attention U-Net"``,
    ``"resnet50_attention_unet"`` and ``"resnet50"`` all -> ``"resnet50"``)."""
    found = _lookup(name, (names.encoder if names else {}), DEFAULT_ENCODER_NAMES)
    if found is not None:
        return found
    norm = normalize_name(name)
    resnet = re.match(r"(resnet\d+)", norm)
    if resnet:
        return resnet.group(1)
    if norm.startswith("swin"):
        return "swin"
    return norm


def _key_without_suffix(name: Any, mapping: Mapping[str, str], defaults: Mapping[str, str], suffix: str) -> str:
    """The mapped key of ``name``, else its normalised form without a trailing ``suffix``."""
    found = _lookup(name, mapping, defaults)
    if found is not None:
        return found
    norm = normalize_name(name)
    return norm[: -len(suffix)] if norm.endswith(suffix) and len(norm) > len(suffix) else norm


def dataset_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    return _key_without_suffix(name, names.dataset if names else {}, DEFAULT_DATASET_NAMES, "dataset")


def scheme_key(name: Any, names: Optional[NameMapConfig] = None) -> str:
    return _key_without_suffix(name, names.scheme if names else {}, DEFAULT_SCHEME_NAMES, "training")


def load_names(source: NameMapConfig | Mapping[str, Any] | str | Path | None) -> NameMapConfig:
    """A name mapping from a YAML file (keys ``encoder``, ``dataset``, ``scheme``), a dict, or None."""
    if source is None:
        return NameMapConfig()
    if isinstance(source, NameMapConfig):
        return source
    if isinstance(source, (str, Path)):
        return parse_config(read_yaml(source), NameMapConfig, source=str(source))
    return parse_config(dict(source), NameMapConfig, source="<names>")
