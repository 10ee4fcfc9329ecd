import textwrap

import pytest

from medxfer.config import RunConfig, load_config, parse_config
from medxfer.errors import ConfigError


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_config_loads_and_resolves_relative_paths(tmp_path):
    path = write(tmp_path, """
        seed: 3
        data: {name: folders, root: data/set, train_images: 5}
        train: {strategy: frozen_encoder, lr: 0.01}
        pretrained: {checkpoint: ckpts}
    """)
    config = load_config(path)
    assert config.seed == 3
    assert config.data.train_images == 5 and isinstance(config.data.train_images, int)
    assert config.data.root == (tmp_path / "data" / "set").resolve()
    assert config.pretrained.checkpoint == (tmp_path / "ckpts").resolve()
    assert config.train.lr == 0.01


def test_unknown_key_names_file_and_key_path(tmp_path):
    path = write(tmp_path, "train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "train.lerning_rate" in message and "unknown key" in message
    assert "\n" not in message


def test_wrong_type_names_file_and_key_path(tmp_path):
    path = write(tmp_path, "train:\n  max_epochs: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "train.max_epochs" in str(err.value)


def test_wrong_literal_value_is_reported(tmp_path):
    path = write(tmp_path, "data:\n  normalization: sometimes\n")
    with pytest.raises(ConfigError, match=r"data\.normalization"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(err.value)


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "train: {lr: 0.1\nseed: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_strategy_that_needs_weights_without_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="pretrained.checkpoint"):
        parse_config({"train": {"strategy": "frozen_encoder"}}, RunConfig, "x.yaml")


def test_non_mapping_root_is_refused(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_every_shipped_config_validates():
    from pathlib import Path

    from medxfer.config import PretrainConfig
    from medxfer.sweep.grid import load_sweep
    from medxfer.transferability.scoring import load_score_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(configs / "finetune_demo.yaml").data.train_images == 5
    assert load_config(configs / "pretrain_demo.yaml", PretrainConfig).schedule.lengths[0] == 0
    assert load_score_config(configs / "score_demo.yaml").stop.rule in ("argmin", "patience")
    assert load_sweep(configs / "sweep_demo.yaml").axes
