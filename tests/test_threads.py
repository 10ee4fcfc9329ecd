"""Threads (issue 25, item 6): the count from the affinity mask, shared among sweep workers, an explicit
setting wins; the count is recorded and is part of the run id; OpenMP's idle threads wait passively."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from medxfer import threads as th
from medxfer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.errors import ConfigError
from medxfer.finetune import run_finetune, run_id_for, with_resolved_threads
from medxfer.records import iter_records, read_record, results_table
from medxfer.sweep.backends import default_run_threads, threads_per_worker
from medxfer.sweep.grid import expand_grid, parse_sweep
from medxfer.sweep.runner import run_sweep


@pytest.fixture
def eight_cpus(monkeypatch):
    """An affinity mask of 8 CPUs, no OMP_NUM_THREADS of the user's; the thread variables are restored after."""
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for var in (*th.THREAD_VARS, th.USER_VALUE_VAR):
        monkeypatch.setenv(var, "x")  # registered, so monkeypatch restores what was there
        monkeypatch.delenv(var)
    yield


def test_the_thread_count_comes_from_the_affinity_mask_shared_among_workers(eight_cpus):
    assert th.affinity_cpus() == 8
    assert th.resolve_threads() == 8
    assert th.resolve_threads(workers=2) == 4
    assert th.resolve_threads(workers=3) == 2
    assert th.resolve_threads(workers=16) == 1  # never 0
    assert threads_per_worker(2) == 4
    assert default_run_threads("local", workers=4) == 2
    assert default_run_threads("ray", workers=1, cpus=3.0) == 3  # a Ray task: its reserved CPUs
    assert th.threads_source() == "affinity"


def test_an_explicit_setting_wins(eight_cpus, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert th.resolve_threads(workers=2) == 3 and th.threads_source() == "OMP_NUM_THREADS"
    assert th.resolve_threads(5) == 5 and th.threads_source(5) == "config"
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='many'"):
        th.resolve_threads()


def test_what_medxfer_writes_into_the_environment_is_never_taken_for_the_users(eight_cpus):
    import torch

    before = torch.get_num_threads()
    try:
        th.apply_threads(1)  # as a sweep worker does
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        assert th.resolve_threads() == 8  # still the affinity mask: the user set nothing
    finally:
        torch.set_num_threads(before)


TINY = dict(data=DataConfig(name="demo", options={"domain": "A"}, train_images=4),
            model=ModelConfig(preset="unet", width=4, depth=3))


def tiny(**train) -> RunConfig:
    return RunConfig(**TINY, train=TrainConfig(strategy="scratch", batch_size=4, **train))


def test_the_run_id_says_the_thread_count_and_stays_stable_in_one_process(eight_cpus):
    import torch

    one, two = run_id_for(tiny(threads=1)), run_id_for(tiny(threads=2))
    assert one != two
    default = run_id_for(tiny())
    assert default == run_id_for(tiny(threads=8))  # unset = what the run resolves it to
    assert with_resolved_threads(tiny()).train.threads == 8
    before = torch.get_num_threads()
    try:
        th.apply_threads(2)  # medxfer's own OMP_NUM_THREADS must not move later ids
        assert run_id_for(tiny()) == default and run_id_for(tiny(threads=1)) == one
    finally:
        torch.set_num_threads(before)


def test_a_sweep_plans_each_workers_share_and_a_resumed_sweep_finds_its_runs(eight_cpus, tmp_path):
    from test_sweep_run import fake_run

    grid = parse_sweep({"name": "t", "base": {**{k: v.model_dump() for k, v in TINY.items()},
                                              "train": {"strategy": "scratch", "max_steps": 1}},
                        "axes": {"seed": [0, 1]}})
    assert {r.config.train.threads for r in expand_grid(grid, tmp_path).runs} == {8}
    assert {r.config.train.threads for r in expand_grid(grid, tmp_path, threads=2).runs} == {2}
    first = run_sweep(grid, tmp_path, workers=4, run_fn=fake_run)  # workers > 1: 1 run per process
    assert first.counts() == {"done": 2}
    planned = {r.run_id for r in expand_grid(grid, tmp_path, threads=2).runs}
    assert {r.run_id for r in first.runs} == planned  # 8 CPUs / 4 workers
    assert {read_record(p)["run_id"] for p in tmp_path.glob("runs/*/result.json")} == planned
    import torch

    before = torch.get_num_threads()
    try:
        th.apply_threads(2)  # what a sweep worker leaves in os.environ
        again = run_sweep(grid, tmp_path, workers=4, run_fn=fake_run)
    finally:
        torch.set_num_threads(before)
    assert again.counts() == {"reused": 2}
    other = run_sweep(grid, tmp_path, workers=1, run_fn=fake_run, dry_run=True)  # 8 threads: other runs
    assert {r.status for r in other.runs} == {"pending"}


def test_the_record_and_the_table_hold_the_thread_count_and_torch_gets_its_own_back(tmp_path):
    import torch

    before = torch.get_num_threads()
    result = run_finetune(tiny(max_steps=2, threads=1), tmp_path)
    assert torch.get_num_threads() == before
    record = result.record
    assert record["threads"]["intra_op"] == 1 and record["threads"]["source"] == "config"
    assert record["threads"]["omp_wait_policy"] == th.wait_policy()
    assert record["config"]["train"]["threads"] == 1
    assert list(results_table(iter_records(tmp_path))["threads"]) == [1]


def test_openmp_waits_passively_unless_the_user_chose_a_policy():
    env = {k: v for k, v in os.environ.items() if k != th.WAIT_POLICY_VAR}
    script = "import medxfer, os; from medxfer.threads import wait_policy; print(os.environ['OMP_WAIT_POLICY'], wait_policy())"
    got = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["PASSIVE", "PASSIVE"]
    got = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_WAIT_POLICY": "active"},
                         capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["active", "ACTIVE"]
    # torch loaded first: OpenMP has read the variable already, medxfer changes nothing and says so
    script = "import torch, medxfer, os; from medxfer.threads import wait_policy; print(os.environ.get('OMP_WAIT_POLICY'), wait_policy())"
    got = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["None", "default"]


@pytest.mark.slow
def test_one_and_two_threads_agree_within_the_documented_tolerance(tmp_path):
    config = RunConfig(data=DataConfig(name="demo", options={"domain": "A"}, train_images=8),
                       model=ModelConfig(preset="unet", width=8, depth=3),
                       train=TrainConfig(strategy="scratch", batch_size=4, lr=1e-2, max_steps=40))
    one = run_finetune(config.model_copy(update={"train": config.train.model_copy(update={"threads": 1})}),
                       tmp_path)
    two = run_finetune(config.model_copy(update={"train": config.train.model_copy(update={"threads": 2})}),
                       tmp_path)
    assert one.run_id != two.run_id
    dice = [r.record["headline"]["value"] for r in (one, two)]
    assert abs(dice[0] - dice[1]) <= th.THREAD_COUNT_DICE_TOLERANCE, dice


def test_a_score_records_its_torch_threads_and_who_set_them(tmp_path, eight_cpus, monkeypatch):
    """`medxfer score` and the sweep's scoring stage (in a worker) write the thread record of fine-tunes
    (threads.threads_record) beside their config in score_config.json: torch's count as scoring found it."""
    import json

    import torch

    from medxfer.sweep.backends import execute_job
    from medxfer.sweep.runner import ScoreJob
    from medxfer.transferability.scoring import load_score_config, run_score
    from test_reliability2 import SCORE_YAML, _score_setup

    _score_setup(tmp_path, lengths=(0, 1))
    (tmp_path / "score.yaml").write_text(SCORE_YAML)
    config = load_score_config(tmp_path / "score.yaml")

    def threads_of(folder):
        return json.loads((folder / "score_config.json").read_text())["threads"]

    with th.torch_threads(torch.get_num_threads()):  # the worker below sets this process's count: restored
        with th.torch_threads(2):
            run_score(config, tmp_path / "default")
        assert threads_of(tmp_path / "default") == th.threads_record(2, "torch default")
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        with th.torch_threads(3):
            run_score(config, tmp_path / "user")
        assert threads_of(tmp_path / "user") == th.threads_record(3, "OMP_NUM_THREADS")
        # a sweep worker's share (medxfer writes OMP_NUM_THREADS; eight_cpus restores the variables after)
        outcome = execute_job(ScoreJob("checkpoints x demo", config, str(tmp_path / "worker"), threads=1))
        assert outcome.status == "done", outcome
        assert threads_of(tmp_path / "worker") == th.threads_record(1, "sweep worker")
