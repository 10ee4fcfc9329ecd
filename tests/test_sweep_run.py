"""Sweeps end to end: records, skipping, failures and retries, process workers, SIGKILL and restart."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
import yaml

from medxfer.finetune import run_finetune, run_id_for
from medxfer.sweep.grid import expand_grid, parse_sweep
from medxfer.sweep.runner import run_sweep
from medxfer.records import read_record, run_dir, write_record

# 8 tiny runs on the embedded demo data (2 training steps each). One thread, set in the config: the same run
# ids (and float sums) sequentially, in 2 worker processes and as 1-CPU Ray tasks, on any machine.
TINY_GRID = {
    "name": "tiny",
    "base": {"data": {"name": "demo", "options": {"domain": "B"}},
             "model": {"preset": "unet", "width": 4, "depth": 3},
             "train": {"strategy": "scratch", "max_steps": 2, "batch_size": 4, "threads": 1}},
    "axes": {"train.lr": [0.001, 0.01], "train_images": [3, 5], "seed": [0, 1]},
}


def fake_run(config, out_dir):
    """A stand-in for run_finetune: a record from the config alone; fails while a marker file exists."""
    directory = run_dir(out_dir, run_id_for(config))
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "calls.log", "a") as f:
        f.write("call\n")
    if (Path(out_dir) / f"fail-seed-{config.seed}").exists():
        raise ValueError(f"boom for seed {config.seed}")
    write_record(directory, {
        "kind": "finetune", "status": "done", "run_id": run_id_for(config), "model": config.model.preset,
        "dataset": config.data.name, "strategy": config.train.strategy, "seed": config.seed,
        "metrics": {"target": {"per_image_mean": {"dice index": config.seed / 10}, "nan_counts": {}}},
    })


def no_record_run(config, out_dir):
    run_dir(out_dir, run_id_for(config)).mkdir(parents=True, exist_ok=True)


def slow_finetune(config, out_dir):
    """run_finetune after a pause, so that a SIGKILL lands in the middle of the sweep."""
    time.sleep(0.3)
    return run_finetune(config, out_dir)


def calls(out, run_id):
    return len((run_dir(out, run_id) / "calls.log").read_text().splitlines())


def test_a_failing_run_is_recorded_skipped_and_retried_on_request(tmp_path):
    grid = parse_sweep({**TINY_GRID, "axes": {"seed": [0, 1, 2]}})
    ids = {run.axes["seed"]: run.run_id for run in expand_grid(grid, tmp_path).runs}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "fail-seed-1").touch()

    first = run_sweep(grid, tmp_path, run_fn=fake_run, progress=True)
    assert first.counts() == {"done": 2, "failed": 1}
    error = read_record(run_dir(tmp_path, ids[1]) / "error.json")
    assert error["status"] == "failed" and "boom for seed 1" in error["error"]
    assert "Traceback" in error["traceback"] and "fake_run" in error["traceback"]
    assert not (run_dir(tmp_path, ids[1]) / "result.json").exists()
    assert [r.error for r in first.failed] == [error["error"]]
    table = pd.read_csv(first.results_csv)
    assert sorted(table["run id"]) == sorted([ids[0], ids[2]])  # the sweep went on after the failure

    again = run_sweep(grid, tmp_path, run_fn=fake_run)
    assert again.counts() == {"reused": 2, "skipped-failed": 1}
    assert [calls(tmp_path, ids[s]) for s in (0, 1, 2)] == [1, 1, 1]  # nothing was run again
    assert "boom for seed 1" in again.failed[0].error

    (tmp_path / "fail-seed-1").unlink()
    retried = run_sweep(grid, tmp_path, run_fn=fake_run, retry_failed=True)
    assert retried.counts() == {"done": 1, "reused": 2}
    assert calls(tmp_path, ids[1]) == 2
    assert (run_dir(tmp_path, ids[1]) / "result.json").is_file()
    assert not (run_dir(tmp_path, ids[1]) / "error.json").exists()
    assert len(pd.read_csv(retried.results_csv)) == 3
    columns, rows = retried.status_table()
    assert columns[:2] == ["status", "runs"] and ["done", 1] == rows[0][:2]


def test_a_run_function_that_writes_no_record_is_a_failure(tmp_path):
    grid = parse_sweep({**TINY_GRID, "axes": {"seed": [0]}})
    summary = run_sweep(grid, tmp_path, run_fn=no_record_run)
    assert summary.counts() == {"failed": 1}
    assert "without writing" in summary.runs[0].error
    assert (run_dir(tmp_path, summary.runs[0].run_id) / "error.json").is_file()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep, sequential in this process: the records every other backend must reproduce."""
    out = tmp_path_factory.mktemp("sequential")
    with one_torch_thread():
        summary = run_sweep(parse_sweep(TINY_GRID), out)
    return out, summary


@contextlib.contextmanager
def one_torch_thread():
    """As each of 2 workers on 2 cores (and each 1-CPU Ray task) has: the same float sums, so the same
    validation scores and best epoch, so identical records."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def records(out):
    return {r["run_id"]: r for r in map(read_record, Path(out).glob("runs/*/result.json"))}


def assert_same_records(out, expected_out):
    got, expected = records(out), records(expected_out)
    assert sorted(got) == sorted(expected) and len(got) == 8
    for run_id, record in expected.items():
        other = got[run_id]
        assert other["config"] == record["config"]
        assert other["train_case_ids"] == record["train_case_ids"]
        assert other["steps_trained"] == record["steps_trained"]
        for name, value in record["metrics"]["target"]["per_image_mean"].items():
            # thread counts may differ between backends: equal up to float reduction order
            assert other["metrics"]["target"]["per_image_mean"][name] == pytest.approx(value, rel=1e-5, nan_ok=True)


def test_the_tiny_sweep_runs_every_run_once_and_a_rerun_reuses_them(reference):
    out, summary = reference
    planned = [run.run_id for run in expand_grid(parse_sweep(TINY_GRID), out).runs]
    assert summary.counts() == {"done": 8}
    assert [run.run_id for run in summary.runs] == planned
    table = pd.read_csv(out / "results.csv")
    assert sorted(table["run id"]) == sorted(planned)
    assert set(table["n train images"]) == {3, 5}
    assert all(0.0 <= d <= 1.0 for d in table["dice index"] if not math.isnan(d))
    # each record is the run's: its own config and the training subset its seed chose
    for run_id, record in records(out).items():
        assert record["run_id"] == run_id and record["status"] == "done"
        assert len(record["train_case_ids"]) == record["config"]["data"]["train_images"]
    stamps = {i: r["finished"] for i, r in records(out).items()}
    again = run_sweep(parse_sweep(TINY_GRID), out)
    assert again.counts() == {"reused": 8}
    assert {i: r["finished"] for i, r in records(out).items()} == stamps


def test_two_worker_processes_give_the_same_records(reference, tmp_path):
    summary = run_sweep(parse_sweep(TINY_GRID), tmp_path, workers=2)
    assert summary.counts() == {"done": 8}
    assert_same_records(tmp_path, reference[0])


def _shm_out():
    """An output folder on another filesystem than the temp folder (tmpfs), where one exists: there a
    rename across filesystems is a copy, which a kill can leave torn (issue #18)."""
    shm = Path("/dev/shm")
    usable = shm.is_dir() and os.access(shm, os.W_OK)
    if not usable or os.stat(shm).st_dev == os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    return shm / f"medxfer-sweep-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.parametrize("filesystem", ["temp", pytest.param("tmpfs", marks=pytest.mark.slow)])
def test_a_sweep_killed_with_sigkill_resumes_and_records_every_run_once(reference, tmp_path, filesystem):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(TINY_GRID))
    out = tmp_path / "out" if filesystem == "temp" else _shm_out()
    try:
        _kill_and_resume(reference, grid_file, out)
    finally:
        if filesystem != "temp":
            shutil.rmtree(out, ignore_errors=True)


def _kill_and_resume(reference, grid_file, out):
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_sweep_run import slow_finetune\n"
              "from medxfer.sweep.runner import run_sweep\n"
              f"run_sweep({str(grid_file)!r}, {str(out)!r}, run_fn=slow_finetune)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("runs/*/result.json")):
            assert process.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    before = {i: r["finished"] for i, r in records(out).items()}
    assert 1 <= len(before) < 8

    with one_torch_thread():  # the killed sweep ran with OMP_NUM_THREADS=1
        summary = run_sweep(grid_file, out)
    assert summary.counts() == {"done": 8 - len(before), "reused": len(before)}
    assert list(out.rglob("*.tmp")) == []
    results = sorted(out.glob("runs/*/result.json"))
    assert len(results) == 8 and not list(out.glob("runs/*/error.json"))
    for path in results:
        json.loads(path.read_text())  # every record parses
    after = records(out)
    assert {i: after[i]["finished"] for i in before} == before  # finished runs were not redone
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 8 and table["run id"].is_unique
    assert_same_records(out, reference[0])


PRETRAIN = {"model": {"preset": "unet", "width": 4, "depth": 3}, "schedule": {"lengths": [0, 1]},
            "classification": {"n_per_class": 4, "val_per_class": 2}, "train": {"batch_size": 16}}


def test_pretraining_and_scores_are_computed_once_and_shared_by_the_runs(tmp_path):
    grid = parse_sweep({
        **TINY_GRID,
        "base": {**TINY_GRID["base"], "pretrained": {"from": "natural"}},
        # two names for one config: pretrained once, in one folder
        "pretraining": [{"name": "natural", **PRETRAIN}, {"name": "same-again", **PRETRAIN}],
        "score": {"pretraining": ["natural"],
                  "settings": {"n_images": 4, "bootstrap": 0, "metrics": ["cosine"], "margins": [0.5],
                               "pooled": [True]}},
        "axes": {"strategy": ["frozen_encoder"], "pretraining.length": [0, 1]},
    })
    summary = run_sweep(grid, tmp_path)
    assert summary.counts() == {"done": 2}
    (pretrain,) = [s for s in summary.stages if s.kind == "pretrain"]
    assert pretrain.status == "done" and pretrain.name == "natural = same-again"
    assert [p.name for p in (tmp_path / "pretrain").iterdir()] == [pretrain.folder.name]
    for run in records(tmp_path).values():
        assert Path(run["pretraining"]["checkpoint"]).parent == pretrain.folder / "checkpoints"
        assert run["pretraining"]["length"] == run["config"]["pretrained"]["length"]
    robustness = pd.read_csv(summary.robustness_csv)
    assert sorted(set(robustness["pretraining_length"])) == [0, 1]
    assert set(robustness["dataset"]) == {"demo-nuclei-B"}

    stamp = (pretrain.folder / "pretrain.json").stat().st_mtime_ns
    again = run_sweep(grid, tmp_path)
    assert again.counts() == {"reused": 2}
    assert {s.status for s in again.stages} == {"reused"}
    assert (pretrain.folder / "pretrain.json").stat().st_mtime_ns == stamp


def test_runs_of_a_failed_pretraining_are_blocked_not_failed(tmp_path):
    broken = {"name": "broken", **PRETRAIN,
              "classification": {"source": "imagenet", "root": str(tmp_path / "no-imagenet-here")}}
    grid = parse_sweep({**TINY_GRID, "base": {**TINY_GRID["base"], "pretrained": {"from": "broken"}},
                        "pretraining": [broken], "axes": {"strategy": ["full"], "pretraining.length": [1]}})
    summary = run_sweep(grid, tmp_path, run_fn=_never_called)
    assert summary.counts() == {"blocked": 1}
    (stage,) = summary.stages
    assert stage.status == "failed" and (stage.folder / "error.json").is_file()
    assert not run_dir(tmp_path, summary.runs[0].run_id).exists()  # not attempted: redone once pretraining works


def _never_called(config, out_dir):
    raise AssertionError("no run may start")


@pytest.mark.parametrize("options, expected", [
    ({"backend": "dask"}, "unknown backend 'dask'"),
    ({"address": "ray://head:10001"}, "--address is for the ray backend"),
    ({"workers": 0}, "--workers must be at least 1"),
])
def test_backend_mistakes_are_config_errors_before_anything_runs(tmp_path, options, expected):
    from medxfer.errors import ConfigError

    with pytest.raises(ConfigError, match=expected):
        run_sweep(parse_sweep(TINY_GRID), tmp_path / "out", run_fn=_never_called, **options)
    assert not (tmp_path / "out").exists()


@dataclass
class DeviceJob:
    """Writes which GPU its worker process was given (picklable: module level)."""

    run_id: str
    out_dir: str
    threads: Optional[int] = None

    def execute(self):
        from medxfer.sweep.backends import RunOutcome

        Path(self.out_dir, f"{self.run_id}.txt").write_text(f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')}")
        time.sleep(0.3)  # both workers get jobs
        return RunOutcome(self.run_id, "done", 0.3)


def test_gpus_are_handed_out_one_per_worker(monkeypatch):
    import multiprocessing

    from medxfer.sweep import backends

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 7")
    assert backends.visible_gpus() == ["2", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert backends.visible_gpus() == []  # "hide every GPU" stays so
    queue = backends.gpu_queue(multiprocessing.get_context("spawn"), 3, ["2", "7"])
    assert [queue.get(timeout=5) for _ in range(3)] == ["2", "7", "2"]  # round robin past the GPU count
    assert backends.gpu_queue(multiprocessing.get_context("spawn"), 3, []) is None


@pytest.mark.slow  # spawns two workers (~5 s here)
def test_each_local_worker_sees_only_its_own_gpu(tmp_path, monkeypatch):
    from medxfer.sweep import backends

    monkeypatch.setattr(backends, "visible_gpus", lambda: ["3", "5"])  # a fake 2-GPU machine
    outcomes = []
    backends.run_process_pool([DeviceJob(f"r{i}", str(tmp_path)) for i in range(4)], outcomes.append, workers=2)
    assert sorted(o.run_id for o in outcomes) == ["r0", "r1", "r2", "r3"]
    seen = dict(tuple(p.read_text().split()) for p in tmp_path.glob("r*.txt"))  # worker pid -> its GPU
    assert set(seen.values()) <= {"3", "5"} and len(set(seen.values())) == len(seen)


@dataclass
class ThreadsJob:
    """Writes the process and the torch thread count it ran with."""

    run_id: str
    out_dir: str
    threads: Optional[int] = None

    def execute(self):
        import torch

        from medxfer.sweep.backends import RunOutcome

        Path(self.out_dir, f"{self.run_id}.txt").write_text(f"{os.getpid()} {torch.get_num_threads()}")
        return RunOutcome(self.run_id, "done", 0.0)


def test_a_lone_job_of_a_sweep_with_workers_runs_in_a_worker_with_that_workers_thread_share(tmp_path, monkeypatch):
    """A job's thread count (and so its numbers) depends on --workers only, never on how many jobs happen to
    be queued: a sweep's only pretraining job runs like one of two."""
    from medxfer.sweep import backends

    monkeypatch.setattr(backends, "threads_per_worker", lambda workers: 3 if workers == 2 else 99)
    outcomes = []
    backends.run_jobs([ThreadsJob("only", str(tmp_path))], outcomes.append, workers=2)
    pid, threads = (tmp_path / "only.txt").read_text().split()
    assert [o.status for o in outcomes] == ["done"] and int(pid) != os.getpid() and int(threads) == 3
