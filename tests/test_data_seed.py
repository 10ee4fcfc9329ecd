"""`data_seed` chooses the training subset apart from `seed` (initialisation, batch order)."""

from __future__ import annotations

import pytest

import medxfer.finetune
from medxfer.config import DataConfig, ModelConfig, PretrainConfig, RunConfig, TrainConfig
from medxfer.data import load_data, select_subset
from medxfer.finetune import run_finetune, run_id_for
from medxfer.pretraining.recipes import config_identity


def _config(seed: int, data_seed=None) -> RunConfig:
    return RunConfig(seed=seed, data_seed=data_seed, model=ModelConfig(preset="unet", width=4, depth=3),
                     data=DataConfig(name="demo", options={"domain": "A"}, train_images=3, val_fraction=0.0),
                     train=TrainConfig(strategy="scratch", max_steps=1, batch_size=3))


class _Chosen(Exception):
    pass


def test_finetune_draws_the_subset_with_data_seed(tmp_path, monkeypatch):
    def record_seed(cases, n, seed, mode="random"):
        raise _Chosen(seed)

    monkeypatch.setattr(medxfer.finetune, "select_subset", record_seed)
    for config, expected in ((_config(0, data_seed=7), 7), (_config(2), 2)):
        with pytest.raises(_Chosen) as chosen:
            run_finetune(config, tmp_path)
        assert chosen.value.args == (expected,)


@pytest.mark.slow
def test_same_volumes_different_initialisation(tmp_path):
    a = run_finetune(_config(0, data_seed=7), tmp_path).record
    b = run_finetune(_config(1, data_seed=7), tmp_path).record
    pool = load_data(_config(0).data).train
    assert a["train_case_ids"] == b["train_case_ids"] == [c.case_id for c in select_subset(pool, 3, 7)]
    assert a["train_case_ids"] != [c.case_id for c in select_subset(pool, 3, 0)]  # seed 0 alone picks others
    assert (a["seed"], a["data_seed"], b["seed"], b["data_seed"]) == (0, 7, 1, 7)
    assert a["run_id"] != b["run_id"]


def test_unset_data_seed_keeps_ids_and_follows_seed():
    config = _config(3)
    assert config.subset_seed == 3 and _config(3, data_seed=4).subset_seed == 4
    assert run_id_for(config) != run_id_for(_config(3, data_seed=3))  # set explicitly: a key of its own
    pre = PretrainConfig()
    assert config_identity(pre) == config_identity(PretrainConfig(data_seed=None))
    assert config_identity(pre) != config_identity(PretrainConfig(data_seed=1))
