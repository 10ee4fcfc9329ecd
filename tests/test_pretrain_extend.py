"""A finished pretraining ladder takes later lengths; `pretrained: {load: full}` continues a segmentation
pretraining with its whole model and optimizer state."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from medxfer.config import PretrainConfig, parse_config
from medxfer.errors import ConfigError
from medxfer.models.weights import read_state_dict
from medxfer.pretraining import run_pretraining


def _ladder(lengths) -> PretrainConfig:
    return parse_config({
        "model": {"preset": "unet", "width": 4, "depth": 3},
        "classification": {"n_per_class": 4, "val_per_class": 2, "image_size": 16, "input_size": 16},
        "schedule": {"unit": "step", "lengths": lengths},
        "train": {"batch_size": 16, "log_every_n_steps": 1},
    }, PretrainConfig)


def test_a_finished_ladder_takes_later_lengths(tmp_path):
    first = run_pretraining(_ladder([0, 2]), tmp_path)
    assert (tmp_path / "final_state.ckpt").is_file() and first.record["final_state"] == "final_state.ckpt"
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    for bad, problem in (([0, 1, 2, 4], r"adds \[1\] inside the schedule"), ([2, 4], r"leaves out \[0\]")):
        with pytest.raises(ConfigError, match=problem):
            run_pretraining(_ladder(bad), tmp_path)
    extended = run_pretraining(_ladder([0, 2, 4]), tmp_path)
    assert extended.lengths == [0, 2, 4]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir() if p.name in kept} == kept
    record = extended.record
    assert record["steps_trained"] == 4 and record["timings"]["invocations"] == 2
    assert record["extensions"] == [{"lengths": [0, 2], "record": "pretrain_len0002.json"}]
    assert json.loads((tmp_path / "pretrain_len0002.json").read_text())["steps_trained"] == 2
    assert [p["step"] for p in record["train_loss_curve"]] == [1, 2, 3, 4]  # the first invocation's points kept
    assert extended.checkpoints[-1].manifest["step"] == 4
    again = run_pretraining(_ladder([0, 2, 4]), tmp_path)  # done: reused as is
    assert again.record["finished"] == record["finished"]


def test_an_unfinished_run_is_not_extended(tmp_path):
    def interrupt(length, encoder, manifest):
        if length == 2:
            raise RuntimeError("simulated interrupt")

    with pytest.raises(RuntimeError):
        run_pretraining(_ladder([0, 2, 3]), tmp_path, hooks=[interrupt])
    with pytest.raises(ConfigError, match=r"is not finished; finish it with its own config"):
        run_pretraining(_ladder([0, 2, 3, 5]), tmp_path)


def _segmentation(out_lengths, pretrained=None) -> PretrainConfig:
    return parse_config({
        "task": "segmentation", "model": {"preset": "unet", "width": 4, "depth": 3},
        "data": {"name": "demo", "options": {"domain": "A"}, "train_images": 4},
        "schedule": {"unit": "step", "lengths": out_lengths},
        "train": {"batch_size": 2, "optimizer": "adam", "lr": 0.01},
        **({"pretrained": pretrained} if pretrained else {}),
    }, PretrainConfig)


@pytest.mark.slow  # three pretraining runs (about 10 s on an idle machine)
def test_pretrained_full_continues_whole_model_and_optimizer(tmp_path, caplog):
    source = tmp_path / "source"
    run_pretraining(_segmentation([0, 2]), source)
    seen = {}

    class Peek(L.Callback):  # the optimizer as the first step finds it
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                seen["state"] = {k: v["exp_avg"].clone() for k, v in trainer.optimizers[0].state_dict()["state"].items()}

    continued = run_pretraining(_segmentation([0, 1], {"checkpoint": str(source), "length": 2, "load": "full"}),
                                tmp_path / "continued", callbacks=[Peek()])
    saved = torch.load(source / "final_state.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert seen["state"].keys() == saved.keys()
    assert all(torch.equal(seen["state"][k], saved[k]["exp_avg"]) for k in saved)
    started = continued.record["started_from"]
    assert started["load"] == "full" and started["optimizer_state"].endswith("final_state.ckpt")
    # its length 0 is the source's whole model at length 2, decoder and head included
    a = read_state_dict(source / "models" / "model_len0002.pt")
    b = read_state_dict(tmp_path / "continued" / "models" / "model_len0000.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("decoder.") for k in a)
    # a length the source run did not end at has no optimizer state: a fresh optimizer, said so
    fresh = run_pretraining(_segmentation([0, 1], {"checkpoint": str(source), "length": 0, "load": "full"}),
                            tmp_path / "fresh")
    assert fresh.record["started_from"]["optimizer_state"] is None
    assert any("fresh optimizer" in message for message in caplog.messages)


def test_full_load_needs_segmentation():
    with pytest.raises(ConfigError, match="pretrained.load: full continues a segmentation pretraining"):
        parse_config({"pretrained": {"checkpoint": "x", "load": "full"}}, PretrainConfig)
