"""Progress without a terminal: plain, throttled lines (one mechanism for demo, sweep, report, training)."""

from __future__ import annotations

import io
import logging

import pytest

from medxfer.progress import LOGGER_NAME, ProgressLog, plain_progress_off, plain_progress_to


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def captured():
    stream = io.StringIO()
    assert plain_progress_to(stream)
    yield stream
    plain_progress_off()


def test_lines_are_throttled_but_first_and_last_always_print(captured):
    clock = FakeClock()
    lines = ProgressLog("sweep runs", 4, every_s=10, clock=clock)
    lines.step("finished")  # first: prints
    clock.now = 3
    lines.step("finished")  # within 10 s: quiet
    clock.now = 14
    lines.step("finished")  # 11 s later: prints, with what is left
    clock.now = 15
    lines.step("finished")  # the last: prints
    out = captured.getvalue().splitlines()
    assert len(out) == 3
    assert "sweep runs: 1/4 finished" in out[0]
    assert "sweep runs: 3/4 finished (14 s, about 5 s left)" in out[1]
    assert "sweep runs: 4/4 finished (15 s)" in out[2]


def test_a_terminal_gets_no_lines_and_a_second_call_replaces_the_handler():
    terminal = Terminal()
    assert not plain_progress_to(terminal)
    ProgressLog("x", 1).step()
    assert terminal.getvalue() == ""
    first, second = io.StringIO(), io.StringIO()
    plain_progress_to(first)
    plain_progress_to(second)
    ProgressLog("report", 2).note("drawing")
    plain_progress_off()
    ProgressLog("report", 2).note("after off")
    assert first.getvalue() == "" and second.getvalue().count("report: drawing") == 1
    assert "after off" not in second.getvalue()
    assert not any(type(h).__name__ == "_PlainHandler" for h in logging.getLogger(LOGGER_NAME).handlers)


def test_report_command_prints_progress_when_stdout_is_not_a_terminal(tmp_path, capsys):
    from medxfer.cli import main
    from medxfer.records import write_record
    from test_report import make_record

    for seed in (0, 1):
        for strategy, length in (("scratch", 0), ("full", 1)):
            record = make_record(strategy, length, 4, seed)
            write_record(tmp_path / "runs" / record["run_id"], record)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out  # capsys's stdout is not a terminal, as a log file is not
    assert "report: 4 run record(s); drawing 8 figures" in out
    assert "report: 8/8 figures" in out


def test_training_callback_prints_steps_and_loss(captured):
    from types import SimpleNamespace

    from medxfer.progress import training_progress_callback

    callback = training_progress_callback("run abc", 3, every_s=0)
    for step in (1, 2, 3):
        callback.on_train_batch_end(SimpleNamespace(global_step=step), None, {"loss": 0.25 * step}, None, step)
    text = captured.getvalue()
    assert "run abc: 1/3 steps, loss 0.2500" in text and "run abc: 3/3 steps, loss 0.7500" in text


@pytest.mark.slow
def test_finetune_prints_training_steps_without_a_bar(tmp_path):
    from medxfer.config import RunConfig, parse_config
    from medxfer.finetune import run_finetune

    stream = io.StringIO()
    plain_progress_to(stream)
    try:
        config = parse_config({"data": {"name": "demo", "train_images": 4},
                               "model": {"preset": "unet", "width": 4, "depth": 3},
                               "train": {"strategy": "scratch", "max_steps": 2, "batch_size": 2}}, RunConfig)
        run = run_finetune(config, tmp_path, progress=False)
    finally:
        plain_progress_off()
    text = stream.getvalue()
    assert f"run {run.run_id}: 1/2 steps, loss" in text and f"run {run.run_id}: 2/2 steps" in text
