"""Grid files: expansion counts, include/exclude, aliases, stable ids, invalid combinations, dry runs."""

import textwrap

import pytest

from medxfer.config import PretrainConfig, RunConfig
from medxfer.errors import ConfigError
from medxfer.finetune import run_id_for
from medxfer.pretraining import config_identity
from medxfer.sweep.grid import AXIS_ALIASES, expand_grid, load_sweep, parse_sweep
from medxfer.sweep.runner import run_sweep

BASE = {"model": {"preset": "unet", "width": 4, "depth": 3}, "train": {"max_steps": 2, "batch_size": 4}}
DATASETS = {"nuclei-A": {"name": "demo", "options": {"domain": "A"}},
            "nuclei-B": {"name": "demo", "options": {"domain": "B"}}}


def grid(**extra):
    return parse_sweep({"base": BASE, "datasets": DATASETS, **extra}, source="grid.yaml")


def test_axes_are_crossed_minus_excluded_plus_included(tmp_path):
    sweep = grid(
        axes={"dataset": ["nuclei-A", "nuclei-B"], "strategy": ["scratch", "full"],
              "train_images": [3, 5, 7], "seed": [0, 1]},
        # a list in a rule means "any of": drops A x {3, 5} for both strategies and seeds (8 runs)
        exclude=[{"dataset": "nuclei-A", "train_images": [3, 5]}],
        # crossed with the axes it does not name (strategy, seed): 4 runs
        include=[{"dataset": "nuclei-A", "train_images": 20, "train.lr": 0.01}],
    )
    plan = expand_grid(sweep, tmp_path)
    assert not plan.invalid and plan.duplicates == 0
    assert len(plan.runs) == 2 * 2 * 3 * 2 - 8 + 4
    axes = [run.axes for run in plan.runs]
    assert not any(a["dataset"] == "nuclei-A" and a["train_images"] in (3, 5) for a in axes)
    included = [run for run in plan.runs if run.axes["train_images"] == 20]
    assert {(r.axes["strategy"], r.axes["seed"]) for r in included} == {
        ("scratch", 0), ("scratch", 1), ("full", 0), ("full", 1)}
    assert all(r.config.train.lr == 0.01 and r.config.data.options == {"domain": "A"} for r in included)
    assert len({run.run_id for run in plan.runs}) == len(plan.runs)
    # deterministic: the same grid expands to the same runs in the same order
    assert [r.run_id for r in expand_grid(sweep, tmp_path).runs] == [r.run_id for r in plan.runs]


def test_aliases_set_the_documented_config_fields(tmp_path):
    assert AXIS_ALIASES["model"] == "model.preset" and AXIS_ALIASES["dataset"] == "data"
    pretraining = [{"name": "natural", "model": {"preset": "unet", "width": 4, "depth": 3},
                    "schedule": {"lengths": [0, 1]}}]
    sweep = grid(
        pretraining=pretraining,
        base={**BASE, "pretrained": {"from": "natural"}},
        axes={"model": ["attention_unet"], "strategy": ["frozen_encoder"], "train_images": [4], "seed": [3],
              "pretraining.length": [1], "dataset": [{"name": "demo", "options": {"domain": "B"}}],
              "train.lr": [0.05], "data.augment": [False]},
    )
    (run,) = expand_grid(sweep, tmp_path).runs
    c = run.config
    assert (c.model.preset, c.train.strategy, c.data.train_images, c.seed) == ("attention_unet", "frozen_encoder", 4, 3)
    assert (c.pretrained.length, c.data.options, c.train.lr, c.data.augment) == (1, {"domain": "B"}, 0.05, False)
    assert c.model.width == 4  # the base is kept where no axis sets a value
    # `from` names a pretraining entry: the checkpoints of its output folder DIR/pretrain/<config hash>
    expected = tmp_path.resolve() / "pretrain" / config_identity(PretrainConfig(**pretraining[0])) / "checkpoints"
    assert c.pretrained.checkpoint == expected


def test_specific_axes_win_over_whole_dataset_mappings_whatever_their_order(tmp_path):
    data = {"name": "demo", "options": {"domain": "B"}, "train_images": 9}
    for axes in ({"train_images": [2], "dataset": [data]}, {"dataset": [data], "train_images": [2]}):
        (run,) = expand_grid(grid(axes=axes), tmp_path).runs
        assert run.config.data.train_images == 2 and run.config.data.options == {"domain": "B"}


GRID_A = """\
name: order-a
base:
  model: {preset: unet, width: 4, depth: 3}
  train: {max_steps: 2, batch_size: 4, lr: 0.002}
  data: {name: demo, options: {domain: B}}
axes:
  strategy: [scratch, full]
  train_images: [3, 5]
  seed: [0, 1]
"""
GRID_B = """\
axes:
  seed: [0, 1]
  train_images: [3, 5]
  strategy: [scratch, full]
base:
  data: {options: {domain: B}, name: demo}
  train: {lr: 0.002, batch_size: 4, max_steps: 2}
  model: {depth: 3, width: 4, preset: unet}
name: order-b
"""


def test_run_ids_do_not_depend_on_key_order_and_are_the_run_id_of_the_config(tmp_path):
    (tmp_path / "a.yaml").write_text(GRID_A)
    (tmp_path / "b.yaml").write_text(GRID_B)
    runs_a = expand_grid(load_sweep(tmp_path / "a.yaml"), tmp_path).runs
    runs_b = expand_grid(load_sweep(tmp_path / "b.yaml"), tmp_path).runs
    assert len(runs_a) == len(runs_b) == 8
    assert {r.run_id for r in runs_a} == {r.run_id for r in runs_b}
    by_id = {r.run_id: r.axes for r in runs_b}
    for run in runs_a:
        assert by_id[run.run_id] == run.axes  # the same combination lands on the same id
    # the id is finetune's run id of the fully written-out config
    written = RunConfig.model_validate({
        "seed": 1, "model": {"preset": "unet", "width": 4, "depth": 3},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 0.002, "strategy": "full"},
        "data": {"name": "demo", "options": {"domain": "B"}, "train_images": 5}})
    assert run_id_for(written) in by_id


def test_invalid_combinations_are_reported_with_the_combination(tmp_path):
    sweep = grid(base={**BASE, "data": DATASETS["nuclei-B"]},
                 axes={"strategy": ["full", "frozen_encoder"], "seed": [0, 1]})
    plan = expand_grid(sweep, tmp_path)
    assert len(plan.runs) == 2 and len(plan.invalid) == 2
    combination, message = plan.invalid[0]
    assert combination == {"strategy": "frozen_encoder", "seed": 0}
    assert "grid.yaml" in message and "strategy=frozen_encoder, seed=0" in message
    assert "needs pretrained.checkpoint" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"strategy=frozen_encoder, seed=0.*1 more invalid"):
        run_sweep(sweep, tmp_path / "out", run_fn=_never_called)
    assert not (tmp_path / "out").exists()  # nothing runs before the grid is valid
    summary = run_sweep(sweep, tmp_path / "out", dry_run=True)
    assert [r.status for r in summary.runs].count("invalid") == 2


def _never_called(config, out_dir):
    raise AssertionError("no run may start")


@pytest.mark.parametrize("extra, expected", [
    ({"axes": {"strategy": ["full"], "train.lerning_rate": [1]}}, "axes.train.lerning_rate: unknown key 'lerning_rate'"),
    ({"axes": {"stratgy": ["full"]}}, "unknown axis or key 'stratgy'"),
    ({"axes": {"strategy": ["full"], "train.strategy": ["scratch"]}}, "both set train.strategy"),
    ({"axes": {"seed": [0]}, "exclude": [{"strategy": "full"}]}, "exclude[0].strategy: not an axis"),
    ({"axes": {"dataset": ["nuclei-C"]}}, "unknown dataset 'nuclei-C'"),
    ({"axes": {"seed": 3}}, "axes.seed"),
    ({"axes": {"seed": []}}, "no values"),
    ({"base": {"pretrained": {"from": "nope"}}, "axes": {"seed": [0]}}, "unknown pretraining 'nope'"),
])
def test_grid_mistakes_are_one_line_config_errors(tmp_path, extra, expected):
    with pytest.raises(ConfigError) as info:
        plan = expand_grid(grid(**extra), tmp_path)
        if plan.invalid:
            raise ConfigError(plan.invalid[0][1])
    assert expected in str(info.value) and "grid.yaml" in str(info.value)


def test_grid_file_paths_are_relative_to_the_grid_file(tmp_path):
    folder = tmp_path / "grids"
    folder.mkdir()
    (folder / "run.yaml").write_text("model: {preset: unet, width: 4, depth: 3}\ndata: {name: demo}\n")
    (folder / "grid.yaml").write_text(textwrap.dedent("""\
        base: run.yaml
        axes:
          strategy: [full]
          pretrained.checkpoint: [weights/a.pt]
    """))
    (run,) = expand_grid(load_sweep(folder / "grid.yaml"), tmp_path).runs
    assert run.config.pretrained.checkpoint == (folder / "weights" / "a.pt").resolve()
    assert run.config.model.width == 4


def test_dry_run_lists_ids_and_axis_values_and_writes_nothing(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID_A)
    summary = run_sweep(tmp_path / "grid.yaml", tmp_path / "out", dry_run=True)
    assert summary.dry_run and len(summary.runs) == 8
    assert {r.status for r in summary.runs} == {"pending"}
    columns, rows = summary.runs_table()
    assert columns[:4] == ["run id", "strategy", "train_images", "seed"]
    assert rows[0][1:4] == ["scratch", "3", "0"]
    assert not (tmp_path / "out").exists()


def test_the_default_sweep_path_does_not_import_ray():
    import subprocess
    import sys

    code = ("import sys; import medxfer.sweep.runner, medxfer.sweep.backends, medxfer.cli; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
