"""A run's identity: what it computes, never what it is called (issue 26, item 13)."""

from medxfer.config import RunConfig, parse_config
from medxfer.finetune import run_id_for
from medxfer.sweep.grid import expand_grid, parse_sweep

BASE = {"data": {"name": "demo", "train_images": 4}, "model": {"preset": "unet", "width": 4, "depth": 3},
        "train": {"strategy": "scratch", "max_steps": 2}}


def test_the_name_is_no_part_of_the_run_id_but_every_setting_is():
    named = parse_config({**BASE, "name": "my finetune"}, RunConfig)
    other = parse_config({**BASE, "name": "sweep-x"}, RunConfig)
    assert run_id_for(named) == run_id_for(other)
    assert run_id_for(parse_config({**BASE, "seed": 1}, RunConfig)) != run_id_for(named)


def test_a_sweep_run_and_the_same_finetune_share_one_id(tmp_path):
    sweep = parse_sweep({"name": "grid", "base": {**BASE, "name": "from-the-grid"}, "axes": {"seed": [0]}},
                        source="grid.yaml")
    (run,) = expand_grid(sweep, tmp_path).runs
    assert run.config.name == "from-the-grid"
    assert run.run_id == run_id_for(parse_config({**BASE, "name": "a finetune"}, RunConfig))
