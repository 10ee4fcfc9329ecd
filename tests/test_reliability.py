"""Faults: torn checkpoints, divergence, concurrent processes, a full disk, Ctrl-C, kill -9 and orphans.

Issue #18. The kill tests start a subprocess and send it a signal; those that train for real or spawn
worker processes (each imports torch and Lightning) are marked slow.
"""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml

from medxfer.cli import main
from medxfer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.errors import DiskFull, FolderInUse, TrainingDiverged
from medxfer.finetune import run_finetune, run_id_for
from medxfer.io import LOCK_FILE, folder_lock
from medxfer.records import read_record, run_dir, write_record
from medxfer.sweep.grid import expand_grid, parse_sweep
from medxfer.sweep.runner import run_sweep
from medxfer.training.resume import AtomicCheckpointIO, fit, usable_resume_checkpoint
from medxfer.training.tasks import first_non_finite

TESTS = Path(__file__).parent
GRID = {
    "name": "faults",
    "base": {"data": {"name": "demo", "options": {"domain": "B"}},
             "model": {"preset": "unet", "width": 4, "depth": 3},
             "train": {"strategy": "scratch", "max_steps": 2, "batch_size": 4}},
    "axes": {"seed": [0, 1, 2, 3]},
}


def other_filesystems(tmp_path):
    """``tmp_path`` and, where there is one, a folder on another filesystem (tmpfs /dev/shm): the README's
    promises must hold where a rename across filesystems would be a copy."""
    folders = [tmp_path]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        folders.append(shm / f"medxfer-test-{os.getpid()}-{time.monotonic_ns()}")
    return folders


@pytest.fixture
def shm_dir(tmp_path):
    """An output folder on another filesystem than the temp folder (skipped where there is none)."""
    folders = other_filesystems(tmp_path)
    if len(folders) == 1:
        pytest.skip("no second filesystem (/dev/shm) here")
    folder = folders[1]
    yield folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def fake_run(config, out_dir):
    """A stand-in for run_finetune: a record from the config alone; behaviour chosen by marker files."""
    directory = run_dir(out_dir, run_id_for(config))
    directory.mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "calls.log", "a") as f:
        f.write(f"{config.seed}\n")
    if (Path(out_dir) / f"interrupt-seed-{config.seed}").exists():
        raise KeyboardInterrupt
    if (Path(out_dir) / f"disk-full-seed-{config.seed}").exists():
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.pt"))
    write_record(directory, {
        "kind": "finetune", "status": "done", "run_id": run_id_for(config), "model": config.model.preset,
        "dataset": config.data.name, "strategy": config.train.strategy, "seed": config.seed,
        "metrics": {"target": {"per_image_mean": {"dice index": 0.5}, "nan_counts": {}}},
    })


def sleepy_run(config, out_dir):
    """Writes its worker's pid, then sleeps far longer than any test waits (a run in progress)."""
    directory = run_dir(out_dir, run_id_for(config))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "worker.pid").write_text(str(os.getpid()))
    time.sleep(120)


def calls(out):
    path = Path(out) / "calls.log"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def tiny_config(**train) -> RunConfig:
    # one thread in the config: the same run id here and in a child process started with OMP_NUM_THREADS=1
    return RunConfig(data=DataConfig(name="demo", options={"domain": "A"}, train_images=4),
                     model=ModelConfig(preset="unet", width=4, depth=3),
                     train=TrainConfig(**{"strategy": "scratch", "max_steps": 2, "batch_size": 4, "threads": 1,
                                          **train}))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_for(condition, timeout_s: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process is None or process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def python(script: str, **kwargs) -> subprocess.Popen:
    """``script`` in a fresh interpreter, Ctrl-C handled as in a terminal (a test runner started as a
    background job ignores SIGINT, and its children would inherit that)."""
    script = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + textwrap.dedent(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# --- 1. resume checkpoints: written atomically, an unreadable one set aside -----------------------------


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lightning_checkpoint(path: Path) -> None:
    module = _Tiny()
    AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict(), "global_step": 3}, path)


def test_checkpoints_are_written_beside_their_target_and_replaced_atomically(tmp_path, monkeypatch):
    import medxfer.io

    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(medxfer.io.os, "replace", spy)
    for folder in other_filesystems(tmp_path):
        target = folder / "checkpoints" / "last.ckpt"
        _lightning_checkpoint(target)
        _lightning_checkpoint(target)  # over an existing one
        assert renames[-1][1] == target and renames[-1][0].parent == target.parent  # never across filesystems
        assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temp file left
        assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 3
        if folder != tmp_path:
            import shutil

            shutil.rmtree(folder)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_an_unreadable_resume_checkpoint_is_set_aside_with_a_warning(tmp_path, caplog, damage):
    path = tmp_path / "last.ckpt"
    _lightning_checkpoint(path)
    assert usable_resume_checkpoint(path) == path  # a good one is used as is
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}[damage]
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING):
        assert usable_resume_checkpoint(path) is None
    (moved,) = tmp_path.glob("last.ckpt.corrupt-*")
    assert not path.exists() and moved.read_bytes() == damaged  # kept for inspection, never read again
    assert "last.ckpt" in caplog.text and "set aside" in caplog.text and moved.name in caplog.text
    assert usable_resume_checkpoint(path) is None  # nothing left to resume from: a fresh start


def test_a_run_with_a_truncated_resume_checkpoint_restarts_and_finishes(shm_dir, caplog):
    config = tiny_config(max_steps=3)
    checkpoints = run_dir(shm_dir, run_id_for(config)) / "checkpoints"
    _lightning_checkpoint(checkpoints / "last.ckpt")
    data = (checkpoints / "last.ckpt").read_bytes()
    (checkpoints / "last.ckpt").write_bytes(data[:100])  # what a kill during a cross-filesystem copy left
    with caplog.at_level(logging.WARNING):
        run = run_finetune(config, shm_dir)
    assert run.record["status"] == "done" and run.record["steps_trained"] == 3  # the whole schedule, from 0
    assert "set aside" in caplog.text
    assert not checkpoints.exists()  # a finished run keeps its record and model only


# --- 3. divergence ----------------------------------------------------------------------------------------


def test_non_finite_weights_and_batchnorm_statistics_are_found_by_name():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    model.register_buffer("attention_mask", torch.tensor([0.0, float("-inf")]))  # infinite on purpose
    assert first_non_finite(model) is None
    model[1].running_var[1] = float("inf")
    assert first_non_finite(model) == "1.running_var"
    model[0].weight.data[0, 0, 0, 0] = float("nan")
    assert first_non_finite(model) == "0.weight"


def test_the_first_step_with_a_non_finite_loss_is_reported():
    from medxfer.training.tasks import TrainingTask

    class NaNAtStep3(TrainingTask):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.model(batch[0]).pow(2).mean()
            if self.trainer.global_step == 2:  # the third step
                loss = loss * float("nan")
            self.check_loss(loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(max_steps=8, log_every_n_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)
    with pytest.raises(TrainingDiverged, match="diverged at step 3: the loss is NaN"):
        fit(trainer, NaNAtStep3(), loader)
    assert trainer.global_step == 5  # found at the next check, not after the whole run


def test_a_diverging_run_fails_with_its_step_and_is_never_recorded_done(tmp_path):
    config = tiny_config(optimizer="sgd", lr=1e6, max_steps=15)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+") as raised:
        run_finetune(config, tmp_path)
    directory = run_dir(tmp_path, run_id_for(config))
    assert run_id_for(config) in str(raised.value) and "train.lr" in str(raised.value)
    error = read_record(directory / "error.json")
    assert error["status"] == "failed" and "diverged at step" in error["error"]
    assert not (directory / "result.json").exists() and not (directory / "model.pt").exists()
    assert not (directory / "checkpoints").exists()  # a retry starts afresh


# --- 4. one process per output folder ---------------------------------------------------------------------


def test_a_locked_folder_is_refused_in_one_line_naming_the_holder(tmp_path):
    for folder in other_filesystems(tmp_path):
        out = folder / "out"
        holder = python(f"""
            import sys, time
            from medxfer.io import folder_lock
            with folder_lock({str(out)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(FolderInUse, match=f"pid {holder.pid} ") as refused:
                with folder_lock(out):
                    pass
            assert "\n" not in str(refused.value) and str(out) in str(refused.value)
        finally:
            holder.kill()
            holder.wait()
        with folder_lock(out):  # a killed holder's lock is gone with it
            assert (out / LOCK_FILE).is_file()
        assert not (out / LOCK_FILE).exists()  # no lock file left behind
        if folder != tmp_path:
            import shutil

            shutil.rmtree(folder)


def test_a_second_sweep_on_a_folder_in_use_exits_2_with_one_line(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "out"
    with folder_lock(out):
        with pytest.raises(FolderInUse):
            run_sweep(grid, out, run_fn=fake_run)
        assert main(["sweep", str(grid), "--out", str(out)]) == 2
        assert main(["finetune", str(TESTS.parent / "configs" / "finetune_demo.yaml"), "--out", str(out)]) == 2
    assert calls(out) == []  # nothing ran
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and all(line.startswith("error:") and "in use" in line for line in err.splitlines())
    assert "Traceback" not in err


def test_a_run_in_progress_elsewhere_is_not_recorded_as_failed(tmp_path):
    grid = parse_sweep({**GRID, "axes": {"seed": [0]}})
    (run,) = expand_grid(grid, tmp_path).runs
    with folder_lock(run_dir(tmp_path, run.run_id), "run"):  # e.g. a `medxfer finetune` of the same config
        summary = run_sweep(grid, tmp_path)
    assert summary.counts() == {"failed": 1} and "in use" in summary.runs[0].error
    assert not (run_dir(tmp_path, run.run_id) / "error.json").exists()  # the next sweep simply runs it


# --- 5. a full disk -----------------------------------------------------------------------------------------


def test_a_full_disk_stops_the_sweep_records_the_run_and_keeps_the_rest(tmp_path):
    grid = parse_sweep(GRID)
    ids = {run.axes["seed"]: run.run_id for run in expand_grid(grid, tmp_path).runs}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "disk-full-seed-1").touch()
    with pytest.raises(DiskFull, match="no space left") as raised:
        run_sweep(grid, tmp_path, run_fn=fake_run)
    assert "\n" not in str(raised.value) and ids[1] in str(raised.value)
    assert calls(tmp_path) == [0, 1]  # no run started after the disk filled up
    error = read_record(run_dir(tmp_path, ids[1]) / "error.json")
    assert error["status"] == "failed" and "No space left" in error["error"]
    assert list(pd.read_csv(tmp_path / "results.csv")["run id"]) == [ids[0]]  # tables refreshed


def test_a_full_disk_that_refuses_even_error_json_is_one_warning(tmp_path, monkeypatch, caplog):
    import medxfer.sweep.backends as backends

    def no_space(directory, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / ".error.json.x.tmp"))

    monkeypatch.setattr(backends, "write_error", no_space)
    grid = parse_sweep({**GRID, "axes": {"seed": [0]}})
    (tmp_path / "disk-full-seed-0").touch()
    with caplog.at_level(logging.WARNING), pytest.raises(DiskFull, match="not recorded"):
        run_sweep(grid, tmp_path, run_fn=fake_run)
    assert "could not write" in caplog.text and "error.json" in caplog.text


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    import medxfer.sweep.backends as backends

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "axes": {"seed": [0]}}))
    monkeypatch.setattr(backends, "default_run_fn", fake_run)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "disk-full-seed-0").touch()
    assert main(["sweep", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left") and "Traceback" not in err


# --- 6-8. Ctrl-C and kill -9 --------------------------------------------------------------------------------


def test_an_interrupted_fit_raises_keyboard_interrupt_and_restores_ctrl_c():
    class CtrlC(L.Callback):
        def on_train_batch_end(self, *args):
            raise KeyboardInterrupt

    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[CtrlC()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # Lightning itself would exit(1)
        fit(trainer, _Tiny(), loader)
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning set it to "ignore"


def test_ctrl_c_in_a_sequential_sweep_stops_it_and_refreshes_the_table(tmp_path):
    grid = parse_sweep(GRID)
    ids = {run.axes["seed"]: run.run_id for run in expand_grid(grid, tmp_path).runs}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "interrupt-seed-1").touch()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, tmp_path, run_fn=fake_run)
    assert calls(tmp_path) == [0, 1]  # the queued runs were not started
    assert list(pd.read_csv(tmp_path / "results.csv")["run id"]) == [ids[0]]
    assert not (run_dir(tmp_path, ids[1]) / "error.json").exists()  # interrupted is not failed
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / "interrupt-seed-1").unlink()
    again = run_sweep(grid, tmp_path, run_fn=fake_run)
    assert again.counts() == {"done": 3, "reused": 1}


def test_ctrl_c_on_the_sweep_command_says_interrupted_and_exits_130(tmp_path, monkeypatch, capsys):
    import medxfer.sweep.backends as backends

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    monkeypatch.setattr(backends, "default_run_fn", fake_run)
    out = tmp_path / "out"
    out.mkdir()
    (out / "interrupt-seed-2").touch()
    assert main(["sweep", str(grid), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert calls(out) == [0, 1, 2] and len(pd.read_csv(out / "results.csv")) == 2


def _sweep_script(out: Path, workers: int) -> str:
    grid = {**GRID, "axes": {"seed": [0, 1, 2, 3, 4, 5]}}
    return f"""
        import sys
        from medxfer.sweep.runner import run_sweep
        from test_reliability import sleepy_run
        try:
            run_sweep({grid!r}, {str(out)!r}, workers={workers}, run_fn=sleepy_run)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    """


def _worker_pids(out: Path) -> list[int]:
    return [int(p.read_text()) for p in out.glob("runs/*/worker.pid") if p.read_text()]


@pytest.mark.slow
def test_ctrl_c_on_a_sweep_with_workers_stops_queued_runs_and_the_workers(tmp_path, shm_dir):
    out = shm_dir
    process = python(_sweep_script(out, workers=2), start_new_session=True)
    try:
        wait_for(lambda: len(_worker_pids(out)) == 2, 120, "both workers to start a run", process)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        started = time.monotonic()
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and err.strip().endswith("interrupted")
    assert time.monotonic() - started < 15  # not after the queued runs
    pids = _worker_pids(out)
    assert len(pids) == 2  # no queued run started
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the workers to end")
    assert (out / "results.csv").is_file() and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_kill_9_of_a_sweep_takes_its_workers_with_it(tmp_path, shm_dir):
    out = shm_dir
    process = python(_sweep_script(out, workers=2))
    try:
        wait_for(lambda: len(_worker_pids(out)) == 2, 120, "both workers to start a run", process)
        process.kill()
        process.wait(timeout=10)
        pids = _worker_pids(out)
        wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the orphaned workers to end")
    finally:
        for pid in _worker_pids(out):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    # the folder is free again, and a new sweep redoes the runs that were in progress
    with folder_lock(out):
        pass


@pytest.mark.slow
def test_ctrl_c_on_finetune_says_interrupted_exits_130_and_resumes(tmp_path, shm_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "demo", "options": {"domain": "A"}, "train_images": 4},
        "model": {"preset": "unet", "width": 4, "depth": 3},
        "train": {"strategy": "scratch", "max_epochs": 10000, "batch_size": 4, "checkpoint_every_s": 0.5},
    }))
    out = shm_dir
    process = python(f"""
        import sys
        from medxfer.cli import main
        sys.exit(main(["finetune", {str(config)!r}, "--out", {str(out)!r}]))
    """, start_new_session=True)
    try:
        wait_for(lambda: list(out.glob("runs/*/checkpoints/last.ckpt")), 120, "a resume checkpoint", process)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    (checkpoint,) = out.glob("runs/*/checkpoints/last.ckpt")
    assert usable_resume_checkpoint(checkpoint) == checkpoint  # intact, on another filesystem than $TMPDIR
    assert (out / "results.csv").is_file() and not list(out.rglob("*.tmp"))


# --- 16. litter and noise ---------------------------------------------------------------------------------


def test_a_finished_run_left_with_its_resume_checkpoint_is_tidied_when_reused(tmp_path):
    grid = parse_sweep({**GRID, "axes": {"seed": [0]}})
    run_sweep(grid, tmp_path, run_fn=fake_run)
    (run,) = expand_grid(grid, tmp_path).runs
    checkpoints = run_dir(tmp_path, run.run_id) / "checkpoints"
    _lightning_checkpoint(checkpoints / "last.ckpt")  # killed between the record and the clean-up
    assert run_sweep(grid, tmp_path, run_fn=fake_run).counts() == {"reused": 1}
    assert not checkpoints.exists()


@pytest.mark.slow
def test_a_cli_sweep_prints_no_lightning_banners_or_eval_mode_warnings(tmp_path):
    from medxfer.models import build_segmenter, save_encoder

    encoder = tmp_path / "encoder_len0001.pt"  # a frozen encoder: Lightning warns of modules in eval mode
    save_encoder(build_segmenter(ModelConfig(preset="unet", width=4, depth=3, in_channels=1, n_classes=2)),
                 encoder, length=1, source="test")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "base": {
        **GRID["base"], "pretrained": {"checkpoint": str(encoder)},
        "train": {**GRID["base"]["train"], "strategy": "frozen_encoder"}}, "axes": {"seed": [0, 1]}}))
    process = python(f"""
        import sys
        from medxfer.cli import main
        sys.exit(main(["sweep", {str(grid)!r}, "--out", {str(tmp_path / 'out')!r}, "--workers", "2"]))
    """)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    for noise in ("GPU available", "TPU available", "LOCAL_RANK", "eval mode", "Trainer.fit"):
        assert noise not in err and noise not in out


# --- 9. damaged records are skipped, named, and the rest goes on -------------------------------------------

DAMAGED = {"truncated": '{"kind": "finetune", "status": "do', "empty": "", "a list": "[1, 2]"}


def _damaged_folder(out: Path) -> dict[str, Path]:
    grid = parse_sweep({**GRID, "axes": {"seed": [0, 1, 2, 3]}})
    run_sweep(grid, out, run_fn=fake_run)
    ids = [run.run_id for run in expand_grid(grid, out).runs]
    damaged = {}
    for run_id, (name, text) in zip(ids[1:], DAMAGED.items()):
        damaged[name] = run_dir(out, run_id) / "result.json"
        damaged[name].write_text(text)
    return damaged


def test_collect_and_report_skip_damaged_records_and_name_them(tmp_path, capsys, caplog):
    damaged = _damaged_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["collect", str(tmp_path)]) == 0
        assert len(pd.read_csv(tmp_path / "results.csv")) == 1  # the one good record
        assert main(["report", str(tmp_path)]) == 0
    for path in damaged.values():
        assert str(path) in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_collect_skips_a_damaged_score_table_and_names_it(tmp_path, caplog):
    from medxfer.records import collect_robustness

    for name, text in {"good": "checkpoint,score\na,0.5\n", "damaged": 'checkpoint,score\n"a,0.5\nb,1,2,3\n'}.items():
        (tmp_path / "scores" / name).mkdir(parents=True)
        (tmp_path / "scores" / name / "robustness.csv").write_text(text)
    with caplog.at_level(logging.WARNING):
        table = pd.read_csv(collect_robustness(tmp_path))
    assert list(table["checkpoint"]) == ["a"] and str(tmp_path / "scores" / "damaged") in caplog.text


def test_a_sweep_redoes_runs_whose_record_is_damaged(tmp_path, caplog):
    damaged = _damaged_folder(tmp_path)
    grid = parse_sweep({**GRID, "axes": {"seed": [0, 1, 2, 3]}})
    with caplog.at_level(logging.WARNING):
        summary = run_sweep(grid, tmp_path, run_fn=fake_run)
    assert summary.counts() == {"done": 3, "reused": 1}
    assert len(pd.read_csv(tmp_path / "results.csv")) == 4
    for path in damaged.values():
        assert isinstance(json.loads(path.read_text()), dict)


def test_finetune_sets_a_damaged_record_aside_and_redoes_the_run(tmp_path, caplog):
    config = tiny_config(max_steps=1)
    directory = run_dir(tmp_path, run_id_for(config))
    directory.mkdir(parents=True)
    (directory / "result.json").write_text('{"status": "done", "metr')
    with caplog.at_level(logging.WARNING):
        run = run_finetune(config, tmp_path)
    assert run.record["status"] == "done" and read_record(directory / "result.json")["run_id"] == run.run_id
    (moved,) = directory.glob("result.json.corrupt-*")
    assert moved.name in caplog.text


# --- pretraining: the same guarantees ------------------------------------------------------------------

PRETRAIN = {"model": {"preset": "unet", "width": 4, "depth": 3}, "schedule": {"lengths": [0, 1, 2]},
            "classification": {"n_per_class": 4, "val_per_class": 2}, "train": {"batch_size": 16}}


def _pretrain_config(**train):
    from medxfer.config import PretrainConfig, parse_config

    return parse_config({**PRETRAIN, "train": {**PRETRAIN["train"], **train}}, PretrainConfig, source="test")


def test_diverged_pretraining_stops_and_saves_no_diverged_checkpoint(tmp_path):
    from medxfer.pretraining import read_checkpoints, run_pretraining

    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+") as raised:
        run_pretraining(_pretrain_config(lr=1e8), tmp_path)
    assert str(tmp_path) in str(raised.value)
    assert not (tmp_path / "pretrain.json").exists()  # never recorded as done
    saved = read_checkpoints(tmp_path)
    assert saved  # length 0 at least, saved before the first step
    for checkpoint in saved:  # those saved before it diverged are finite
        state = torch.load(checkpoint.path, weights_only=True)  # the encoder state dict
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_pretraining_takes_its_folder_lock_and_recovers_from_damage(tmp_path, caplog):
    from medxfer.pretraining import run_pretraining

    config = _pretrain_config()
    with folder_lock(tmp_path):
        with pytest.raises(FolderInUse):
            run_pretraining(config, tmp_path)
    first = run_pretraining(config, tmp_path)
    assert first.lengths == [0, 1, 2] and not list(tmp_path.rglob("*.tmp"))
    assert not (tmp_path / "lightning").exists() and not (tmp_path / LOCK_FILE).exists()
    # what kills and outside damage leave: a torn resume file, temp files, a damaged record
    _lightning_checkpoint(tmp_path / "lightning" / "last.ckpt")
    (tmp_path / "lightning" / "last.ckpt").write_bytes(b"PK\x03\x04torn")
    (tmp_path / "checkpoints" / ".encoder_len0001.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "pretrain.json").write_text("")
    with caplog.at_level(logging.WARNING):
        again = run_pretraining(config, tmp_path)
    assert again.lengths == [0, 1, 2] and again.record["status"] == "done"
    assert "pretrain.json" in caplog.text and "last.ckpt" in caplog.text
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "lightning").exists()
    # checkpoints are never rewritten: the record lists the same files
    assert [c["path"] for c in again.record["checkpoints"]] == [c["path"] for c in first.record["checkpoints"]]


# --- the issue's own repros on another filesystem ----------------------------------------------------------


@pytest.mark.slow
def test_kill_9_while_checkpointing_on_another_filesystem_leaves_a_resumable_run(shm_dir):
    """Issue #18 item 1: output on a tmpfs, resume checkpoints as often as possible, kill -9 while they are
    written; the rerun resumes and finishes (before: a torn last.ckpt that every rerun failed on)."""
    config = tiny_config(max_steps=15, checkpoint_every_s=0.01)
    process = python(f"""
        from medxfer.config import RunConfig
        from medxfer.finetune import run_finetune
        run_finetune(RunConfig.model_validate({config.model_dump(mode="json")!r}), {str(shm_dir)!r})
    """)
    checkpoints = run_dir(shm_dir, run_id_for(config)) / "checkpoints"
    try:
        wait_for(lambda: (checkpoints / "last.ckpt").is_file(), 120, "a resume checkpoint", process)
        time.sleep(0.3)  # a few more checkpoints; the kill lands during or between writes
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert usable_resume_checkpoint(checkpoints / "last.ckpt") == checkpoints / "last.ckpt"  # never torn
    step = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    run = run_finetune(config, shm_dir)
    assert run.record["steps_trained"] == 15 and 0 < step < 15
    assert not checkpoints.exists() and not list(shm_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_a_full_disk_during_a_cli_sweep_is_one_line_and_resumable(tmp_path, small_disk):
    """Issue #18 item 5 on a real full filesystem: a 256 KiB tmpfs (tests/conftest.py; needs root)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "base": {**GRID["base"], "train": {
        **GRID["base"]["train"], "max_steps": 3, "checkpoint_every_s": 0.01}}}))
    process = python(f"""
        import sys
        from medxfer.cli import main
        sys.exit(main(["sweep", {str(grid)!r}, "--out", {str(small_disk / 'out')!r}]))
    """)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error: no space left") and "Traceback" not in err
    assert len(list(small_disk.glob("out/runs/*/error.json"))) == 1  # the failing run is recorded
    assert not list(small_disk.rglob("*.tmp"))


def disk_full_or_sleepy(config, out_dir):
    """Seed 0: a full disk once another run is in progress; other seeds: long runs (their pid written first)."""
    if config.seed == 0:
        wait_for(lambda: _worker_pids(Path(out_dir)), 120, "another run to start")
        raise OSError(errno.ENOSPC, "No space left on device")
    sleepy_run(config, out_dir)


@pytest.mark.slow
@pytest.mark.ray
def test_a_stopping_ray_sweep_cancels_its_queued_and_running_tasks(tmp_path):
    ray = pytest.importorskip("ray")
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        grid = parse_sweep({**GRID, "axes": {"seed": [1, 0, 2, 3]}})
        started = time.monotonic()
        with pytest.raises(DiskFull):
            run_sweep(grid, tmp_path, backend="ray", run_fn=disk_full_or_sleepy)
        assert time.monotonic() - started < 100  # not after the 120 s runs
        pids = _worker_pids(tmp_path)
        assert pids  # a run was in progress when the sweep stopped
        wait_for(lambda: not any(alive(pid) for pid in pids), 30, "the cancelled Ray tasks to end")
    finally:
        ray.shutdown()
