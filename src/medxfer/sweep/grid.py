"""Grid files: a base run config plus axes to cross -> planned runs with stable ids.

A grid file (see docs/sweeps.md) has a ``base`` RunConfig, ``axes`` whose names are dotted
RunConfig paths or short aliases, ``include``/``exclude`` rules, named ``datasets``, and optional
``pretraining``/``score`` sections for the work that runs share. Expansion is deterministic (axes are crossed
in file order) and each run's id is :func:`medxfer.finetune.run_id_for` of its resolved config, so the
order of keys in the file never changes an id.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, Field, PrivateAttr, field_validator

from medxfer.config import (PretrainConfig, PretrainedConfig, RunConfig, StrictModel, parse_config, read_yaml,
                            resolve_paths)
from medxfer.errors import ConfigError

log = logging.getLogger(__name__)

# Short axis names -> dotted RunConfig paths (documented in docs/sweeps.md).
AXIS_ALIASES: dict[str, str] = {
    "model": "model.preset",
    "strategy": "train.strategy",
    "train_images": "data.train_images",
    "seed": "seed",
    "dataset": "data",
    "pretraining": "pretrained.from",
    "pretraining.length": "pretrained.length",
}
# ``pretrained.from`` names an entry of the grid's ``pretraining`` section; it is replaced by that
# entry's checkpoint folder (``DIR/pretrain/<hash>/checkpoints``) before the run config is validated and hashed.
FROM_KEY = "from"
PRETRAIN_DIR = "pretrain"
PATH_KEYS = ("root", "checkpoint")


class ResourcesConfig(StrictModel):
    """What one run asks of the Ray scheduler (the local backend derives threads from ``--workers``)."""

    cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each run.")
    gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each run (fractions share one).")


class ScoreSection(StrictModel):
    """Transferability scoring, once per (checkpoint folder, dataset); see ``medxfer.config.ScoreConfig``."""

    datasets: list[Union[str, dict[str, Any]]] = Field(default_factory=list, description=(
        "Names of entries of the grid's `datasets` section, or data mappings; empty = every dataset the runs "
        "of the grid use."))
    pretraining: list[str] = Field(default_factory=list, description=(
        "Pretraining entries whose checkpoint folders are scored (names); empty = all of them."))
    checkpoints: list[Path] = Field(default_factory=list, description="Other checkpoint folders to score as well.")
    settings: dict[str, Any] = Field(default_factory=dict, description=(
        "Every other score-config key (seed, n_images, metrics, margins, bootstrap, baselines, ...)."))


class SweepConfig(StrictModel):
    """A grid file. ``base`` and values are partial RunConfigs; see docs/sweeps.md for the rules."""

    name: str = Field("sweep", description="Names OUT/sweeps/<name>.json, the planned runs with their axis values.")
    base: dict[str, Any] = Field(default_factory=dict, description=(
        "A partial run config every run starts from, or the path of a run config."))
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "Named data sections, for the `dataset` axis."))
    axes: dict[str, list[Any]] = Field(default_factory=dict, description=(
        "Axis name (a dotted run-config path or an alias) -> its values; crossed in file order."))
    exclude: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Drop crossed combinations that match every key of one rule (a list value means any of these)."))
    include: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Extra runs: the keys given are fixed, the axes not named are crossed."))
    pretraining: list[PretrainConfig] = Field(default_factory=list, description=(
        "Pretraining runs, run first, once; runs refer to them by `name` (`pretrained: {from: NAME}`)."))
    score: Optional[ScoreSection] = Field(None, description=(
        "Transferability scores, once per (checkpoint folder, dataset); null = none."))
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per run, for the Ray scheduler.")

    _source: str = PrivateAttr("<grid>")

    @field_validator("axes")
    @classmethod
    def _axes_have_values(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in axes.items():
            if not values:
                raise ValueError(f"axis {name!r} has no values")
        return axes

    @property
    def source(self) -> str:
        return self._source


@dataclass
class PlannedRun:
    """One run of the grid: its id, its validated config, and the axis values that made it."""

    run_id: str
    config: RunConfig
    axes: dict[str, Any]

    def label(self) -> str:
        return format_axes(self.axes)


@dataclass
class GridPlan:
    runs: list[PlannedRun]
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (axis values, one-line error)
    duplicates: int = 0  # combinations whose resolved config equals an earlier one (run once)


def canonical_path(name: str) -> str:
    """The dotted RunConfig path an axis name stands for (aliases resolved)."""
    return AXIS_ALIASES.get(name, name)


def format_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def format_axes(axes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in axes.items()) or "(base)"


def _submodel(annotation: Any) -> Optional[type]:
    """The pydantic model a field holds (``Optional[DataConfig]`` -> DataConfig), or None."""
    candidates = (annotation, *typing.get_args(annotation))
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _check_path(path: str, source: str, where: str) -> None:
    """A typo in an axis name is reported once, naming the axis, instead of once per combination."""
    model: Optional[type] = RunConfig
    for depth, key in enumerate(path.split(".")):
        if model is None:  # inside a free-form mapping (``options``): any key is allowed
            return
        if model is PretrainedConfig and key == FROM_KEY:
            return
        if key not in model.model_fields:
            if depth == 0:
                known = ", ".join(sorted(set(AXIS_ALIASES) | set(RunConfig.model_fields)))
                raise ConfigError(f"{source}: {where}: unknown axis or key {path!r} (aliases and sections: {known})")
            raise ConfigError(f"{source}: {where}: unknown key {key!r} in {path!r}")
        model = _submodel(model.model_fields[key].annotation)


def _resolve_value_paths(path: str, value: Any, base_dir: Path) -> Any:
    """Relative ``root``/``checkpoint`` values are relative to the grid file, as in run configs."""
    leaf = path.split(".")[-1]
    if leaf in PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value):
        return str((base_dir / value).resolve())
    return resolve_paths(value, base_dir)


def _resolve_entry_paths(entry: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    return {k: _resolve_value_paths(canonical_path(k), v, base_dir) for k, v in entry.items()}


def parse_sweep(data: Any, source: str = "<grid>", base_dir: Optional[Path] = None) -> SweepConfig:
    """Validate a grid mapping; relative paths become relative to ``base_dir`` (default: the cwd)."""
    base_dir = Path(base_dir or Path.cwd()).resolve()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    if isinstance(data.get("base"), str):  # base: path/to/run_config.yaml
        base_file = Path(data["base"])
        base_file = base_file if base_file.is_absolute() else base_dir / base_file
        data["base"] = resolve_paths(read_yaml(base_file) or {}, base_file.parent.resolve())
    for key in ("base", "datasets", "pretraining", "score"):
        if key in data:
            data[key] = resolve_paths(data[key], base_dir)
    score = data.get("score")
    if isinstance(score, dict) and isinstance(score.get("checkpoints"), list):
        score["checkpoints"] = [_resolve_value_paths("checkpoint", p, base_dir) for p in score["checkpoints"]]
    if isinstance(data.get("axes"), dict):
        data["axes"] = {name: [_resolve_value_paths(canonical_path(name), v, base_dir) for v in values]
                        if isinstance(values, list) else values for name, values in data["axes"].items()}
    for key in ("include", "exclude"):
        if isinstance(data.get(key), list):
            data[key] = [_resolve_entry_paths(e, base_dir) if isinstance(e, dict) else e for e in data[key]]
    sweep = parse_config(data, SweepConfig, source=source)
    sweep._source = source
    _check_grid(sweep)
    return sweep


def load_sweep(path: str | os.PathLike) -> SweepConfig:
    """Read and validate a grid file (paths in it are relative to its folder)."""
    path = Path(path)
    return parse_sweep(read_yaml(path), source=str(path), base_dir=path.parent)


def _check_grid(sweep: SweepConfig) -> None:
    src = sweep.source
    seen: dict[str, str] = {}
    for name in sweep.axes:
        path = canonical_path(name)
        _check_path(path, src, f"axes.{name}")
        if path in seen:
            raise ConfigError(f"{src}: axes: {name!r} and {seen[path]!r} both set {path}")
        seen[path] = name
    axis_paths = set(seen)
    for i, rule in enumerate(sweep.exclude):
        for key in rule:
            if canonical_path(key) not in axis_paths:
                raise ConfigError(f"{src}: exclude[{i}].{key}: not an axis of this grid")
    for i, entry in enumerate(sweep.include):
        for key in entry:
            _check_path(canonical_path(key), src, f"include[{i}].{key}")
    names = pretraining_names(sweep)
    if len(set(names)) != len(names):
        raise ConfigError(f"{src}: pretraining: names must be unique, got {names}")
    if sweep.score is not None:
        for name in sweep.score.pretraining:
            if name not in names:
                raise ConfigError(f"{src}: score.pretraining: unknown pretraining {name!r}")
        for value in sweep.score.datasets:
            if isinstance(value, str) and value not in sweep.datasets:
                raise ConfigError(f"{src}: score.datasets: unknown dataset {value!r} (not in `datasets`)")


def _set_path(target: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path; a mapping merges into the mapping already there (key by key, recursively)."""
    keys = path.split(".")
    node = target
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    last = keys[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = _deep_merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _matches(rule_value: Any, value: Any) -> bool:
    # A list in a rule means "any of these", unless the axis value itself is that list.
    if rule_value == value:
        return True
    return isinstance(rule_value, list) and any(v == value for v in rule_value)


def _excluded(combination: dict[str, Any], rules: list[dict[str, Any]]) -> bool:
    by_path = {canonical_path(k): v for k, v in combination.items()}
    return any(all(_matches(v, by_path[canonical_path(k)]) for k, v in rule.items()) for rule in rules)


def pretraining_names(sweep: SweepConfig) -> list[str]:
    return [entry.name for entry in sweep.pretraining]


def pretraining_folder(out_dir: str | Path, entry: PretrainConfig) -> Path:
    """``DIR/pretrain/<hash>``: one pretraining entry's output folder (absolute). The hash is
    :func:`medxfer.pretraining.config_identity` (everything that changes the checkpoints; not the name)."""
    from medxfer.pretraining.recipes import config_identity  # imported only by grids with a pretraining section

    return (Path(out_dir) / PRETRAIN_DIR / config_identity(entry)).resolve()


def pretraining_checkpoints(out_dir: str | Path, entry: PretrainConfig) -> Path:
    """The checkpoint folder inside a pretraining output folder: what ``pretrained.from`` resolves to."""
    from medxfer.pretraining.checkpoints import CHECKPOINT_DIR

    return pretraining_folder(out_dir, entry) / CHECKPOINT_DIR


def resolve_dataset(sweep: SweepConfig, value: Any, where: str) -> dict[str, Any]:
    """A ``dataset`` value: a data mapping, or the name of an entry of the grid's ``datasets``."""
    if isinstance(value, str):
        if value not in sweep.datasets:
            known = ", ".join(sweep.datasets) or "none defined"
            raise ConfigError(f"{sweep.source}: {where}: unknown dataset {value!r} (datasets: {known})")
        return {"label": value, **copy.deepcopy(sweep.datasets[value])}  # named by its key unless it says
    if isinstance(value, dict):
        return copy.deepcopy(value)
    raise ConfigError(f"{sweep.source}: {where}: a dataset is a mapping or a name from `datasets`, got {value!r}")


def resolve_run_dict(sweep: SweepConfig, assignments: dict[str, Any], out_dir: str | Path,
                     folders: Optional[dict[str, Path]] = None) -> dict[str, Any]:
    """Base + assignments (name -> value) -> a RunConfig mapping, with datasets and ``from`` resolved.

    General paths are applied before specific ones (``data`` before ``data.train_images``), so a
    ``dataset`` value never overrides a ``train_images`` axis whatever the order of the axes.
    """
    run = copy.deepcopy(sweep.base)
    items = [(canonical_path(k), k, v) for k, v in assignments.items()]
    for path, name, value in sorted(items, key=lambda item: item[0].count(".")):
        if path == "data":
            value = resolve_dataset(sweep, value, name)
        _set_path(run, path, value)
    pretrained = run.get("pretrained")
    if isinstance(pretrained, dict) and FROM_KEY in pretrained:
        name = pretrained.pop(FROM_KEY)
        if name is not None:
            if folders is None:
                folders = {e.name: pretraining_checkpoints(out_dir, e) for e in sweep.pretraining}
            if name not in folders:
                known = ", ".join(folders) or "none defined"
                raise ConfigError(f"{sweep.source}: pretrained.from: unknown pretraining {name!r} "
                                  f"(pretraining: {known})")
            if pretrained.get("checkpoint") is not None:
                raise ConfigError(f"{sweep.source}: pretrained: set either `from` or `checkpoint`, not both")
            pretrained["checkpoint"] = str(folders[name])
    return run


def expand_grid(sweep: SweepConfig, out_dir: str | Path, threads: Optional[int] = None) -> GridPlan:
    """Every run of the grid, in a deterministic order: the crossed axes (file order, minus ``exclude``),
    then each ``include`` entry crossed with the axes it does not name. Runs whose resolved configs are
    equal are kept once; combinations that do not validate are returned in ``invalid``.

    ``threads``: the intra-op thread count of runs that leave ``train.threads`` unset (the sweep's share
    per worker, :func:`medxfer.sweep.runner.default_run_threads`); None = as one ``finetune`` resolves it.
    Every planned config carries its count, which is part of its run id."""
    from medxfer.finetune import run_id_for, with_resolved_threads  # the one definition of a run id

    _check_grid(sweep)  # also for a SweepConfig built in code rather than parsed
    folders = {e.name: pretraining_checkpoints(out_dir, e) for e in sweep.pretraining}
    names = list(sweep.axes)
    combinations: list[dict[str, Any]] = []
    for values in itertools.product(*(sweep.axes[n] for n in names)):
        combination = dict(zip(names, values))
        if not _excluded(combination, sweep.exclude):
            combinations.append(combination)
    for entry in sweep.include:
        fixed = {canonical_path(k) for k in entry}
        free = [n for n in names if canonical_path(n) not in fixed]
        by_path = {canonical_path(k): k for k in entry}
        for values in itertools.product(*(sweep.axes[n] for n in free)):
            chosen = dict(zip(free, values))
            # axis order first (as in the crossed runs), then the entry's other keys
            combination = {n: chosen[n] if n in chosen else entry[by_path[canonical_path(n)]] for n in names}
            combination = {by_path.get(canonical_path(n), n): v for n, v in combination.items()}
            combination.update({k: v for k, v in entry.items() if k not in combination})
            combinations.append(combination)

    plan = GridPlan(runs=[])
    seen: set[str] = set()
    for combination in combinations:
        label = format_axes(combination)
        try:
            run = resolve_run_dict(sweep, combination, out_dir, folders)
            config = parse_config(run, RunConfig, source=f"{sweep.source} (run {label})")
            if config.train.threads is None:
                config = with_resolved_threads(config) if threads is None else config.model_copy(
                    update={"train": config.train.model_copy(update={"threads": threads})})
        except ConfigError as exc:
            message = str(exc)
            if label not in message:
                message = f"run {label}: {message}"
            plan.invalid.append((combination, message))
            continue
        run_id = run_id_for(config)
        if run_id in seen:
            plan.duplicates += 1
            log.debug("run %s (%s) repeats an earlier combination; run once", run_id, label)
            continue
        seen.add(run_id)
        plan.runs.append(PlannedRun(run_id, config, combination))
    return plan


def grid_yaml(grid: dict[str, Any], flat_lists_inline: bool = False, **dump_options: Any) -> str:
    """A grid as plain YAML for a person to read and ``medxfer sweep`` to run: repeated sections written out in
    full (no anchors), keys in their order; ``flat_lists_inline`` puts lists of scalars on one line
    (``[32, 32, 32]``)."""
    import yaml

    class PlainDumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    if flat_lists_inline:
        def represent_list(dumper: yaml.SafeDumper, data: list) -> Any:
            flat = all(not isinstance(item, (dict, list)) for item in data)
            return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

        PlainDumper.add_representer(list, represent_list)
    return yaml.dump(grid, Dumper=PlainDumper, sort_keys=False, **dump_options)
