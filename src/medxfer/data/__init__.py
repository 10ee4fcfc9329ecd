"""Dataset loaders. Every loader returns a :class:`SegmentationData` of :class:`Case` objects."""

from __future__ import annotations

import importlib
from typing import Callable

from medxfer.config import dataset_name
from medxfer.data.base import IGNORE_INDEX, Case, SegmentationData, select_subset, split_train_val

# name -> "module:function"; imported lazily so that reading one layout never imports the others.
LOADERS: dict[str, str] = {
    "demo": "medxfer.data.demo:load_demo_config",
    "colin27": "medxfer.data.colin27:load_colin27_config",
    "acdc": "medxfer.data.acdc:load_acdc",
    "covidqu": "medxfer.data.covidqu:load_covidqu",
    "idrid": "medxfer.data.idrid:load_idrid",
    "folders": "medxfer.data.folders:load_folders",
    "msd": "medxfer.data.msd:load_msd",
}


# Layouts whose options choose among several mask sets on disk: name -> "module:function" giving the option
# sets that read them all (what ``medxfer data check`` validates besides the configured ones).
MASK_VARIANTS: dict[str, str] = {
    "acdc": "medxfer.data.acdc:mask_variants",
    "covidqu": "medxfer.data.covidqu:mask_variants",
    "idrid": "medxfer.data.idrid:mask_variants",
}


def mask_variants(config) -> list[dict]:
    """Option sets under which the loader of ``config`` reads every mask set on disk ([] for layouts that
    always read all of them: folders, msd, demo)."""
    if config.name not in MASK_VARIANTS:
        return []
    module, func = MASK_VARIANTS[config.name].split(":")
    return getattr(importlib.import_module(module), func)(config)


def get_loader(name: str) -> Callable:
    from medxfer.errors import DataError

    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOADERS))}")
    module, func = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), func)


def load_data(config) -> SegmentationData:
    """Load the dataset a :class:`medxfer.config.DataConfig` names (all splits, no subsetting)."""
    if getattr(config, "preprocess", None) is not None:
        from medxfer.data.preprocess import load_preprocessed

        data = load_preprocessed(config)
    else:
        data = get_loader(config.name)(config)
    data.name = dataset_name(config.name, data.name, config.root, config.label)
    if config.resize is not None:  # for every layout: loaders that resize while reading leave nothing to do
        size = tuple(config.resize)
        for split in ("train", "val", "test"):
            setattr(data, split, [_resized(case, size) for case in getattr(data, split)])
    return data


def _resized(case: Case, size: tuple[int, ...]) -> Case:
    import dataclasses

    from medxfer.data.folders import resize_case_arrays

    if case.spatial_shape == size:
        return case
    image, label, spacing = resize_case_arrays(case.image, case.label, size, case.spacing)
    return dataclasses.replace(case, image=image, label=label, spacing=spacing)  # a new case: loaders may cache


__all__ = ["Case", "SegmentationData", "IGNORE_INDEX", "select_subset", "split_train_val", "load_data", "LOADERS",
           "mask_variants"]
