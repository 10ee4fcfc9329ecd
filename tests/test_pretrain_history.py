"""Pretraining keeps its loss curve and training time across resumes, and prints progress off a terminal."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from medxfer.config import PretrainConfig, parse_config
from medxfer.pretraining import run_pretraining
from medxfer.progress import plain_progress_off, plain_progress_to


def _config() -> PretrainConfig:
    return parse_config({
        "model": {"preset": "unet", "width": 4, "depth": 3},
        "classification": {"n_per_class": 4, "val_per_class": 2, "image_size": 16, "input_size": 16},
        "schedule": {"unit": "step", "lengths": [2, 4, 6]},
        "train": {"batch_size": 16, "resume_every_n_steps": 1, "log_every_n_steps": 2},
    }, PretrainConfig)


def test_progress_loss_curve_and_train_time_across_a_resume(tmp_path, caplog):
    def interrupt(length, encoder, manifest):
        if length == 4:
            raise RuntimeError("simulated interrupt")

    stream = io.StringIO()
    assert plain_progress_to(stream)  # as the CLI does when stdout is a file or a pipe
    try:
        with caplog.at_level(logging.INFO, logger="medxfer.pretraining.history"):
            with pytest.raises(RuntimeError, match="simulated interrupt"):
                run_pretraining(_config(), tmp_path, hooks=[interrupt], progress=False)
    finally:
        plain_progress_off()
    lines = stream.getvalue().splitlines()
    assert lines and all(line.split(" ", 1)[1].startswith("pretraining pretrain: ") for line in lines)
    assert any("/6 steps, loss" in line for line in lines)
    assert any("pretraining step 2: loss" in message for message in caplog.messages)

    saved = torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=True)["callbacks"]["TrainingHistory"]
    assert saved["invocations"] == 1 and saved["train_s"] > 0 and saved["curve"][0]["step"] == 2
    record = run_pretraining(_config(), tmp_path).record
    timings = record["timings"]
    assert timings["invocations"] == 2
    # both invocations: the first one's time (from its resume checkpoint) plus at most this one's
    assert saved["train_s"] < timings["train_s"] <= saved["train_s"] + timings["train_s_this_invocation"]
    assert [point["step"] for point in record["train_loss_curve"]] == [2, 4, 6]
    assert all(point["loss"] > 0 for point in record["train_loss_curve"])
