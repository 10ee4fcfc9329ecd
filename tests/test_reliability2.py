"""Reliability, round two (issue #31): the 22 attacks that still lost data, hung or traced back.

Each test is named after what must hold; the comment on it gives the issue item. Full disks are a small
tmpfs (needs root; skipped elsewhere) or an injected ENOSPC.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medxfer.cli import main
from medxfer.errors import ConfigError, DiskFull
from medxfer.io import LOCK_FILE, atomic_path, atomic_torch_save, folder_lock

TINY_RUN = {"data": {"name": "demo", "options": {"domain": "A"}, "train_images": 4},
            "model": {"preset": "unet", "width": 4, "depth": 3},
            "train": {"strategy": "scratch", "max_steps": 2, "batch_size": 4}}
TINY_PRETRAIN = {"model": {"preset": "unet", "width": 4, "depth": 3}, "schedule": {"lengths": [0, 1, 2]},
                 "classification": {"n_per_class": 4, "val_per_class": 2}, "train": {"batch_size": 16}}


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (mounting needs root; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# --- items 11 and 16: a full disk while saving model.pt, a checkpoint or the record ---------------------


def test_a_full_disk_in_torch_save_is_one_line_naming_the_file(small_disk):
    """Item 11: torch.save raised "RuntimeError ... unexpected pos" (its ENOSPC only the context)."""
    from medxfer.training.resume import AtomicCheckpointIO

    target = small_disk / "model.pt"
    with pytest.raises(DiskFull, match=r"model\.pt: no space left on the device"):
        atomic_torch_save({"w": torch.zeros(200_000)}, target)
    with pytest.raises(DiskFull, match=r"last\.ckpt: no space left on the device"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(200_000)}}, small_disk / "last.ckpt")
    assert list(small_disk.iterdir()) == []  # no temp file, no torn target


def test_pretraining_on_a_full_disk_exits_2_with_one_line(small_disk, tmp_path, capsys):
    """Item 11 through the CLI: pretraining checkpoints on a 256 KiB disk."""
    config = write_yaml(tmp_path / "pretrain.yaml", {**TINY_PRETRAIN, "model": {**TINY_PRETRAIN["model"],
                                                                                 "width": 16}})
    assert main(["pretrain", str(config), "--out", str(small_disk / "out")]) == 2
    line = one_error_line(capsys)
    assert "no space left on the device" in line and str(small_disk) in line
    assert not list(small_disk.rglob("*.tmp"))


@pytest.mark.slow
def test_a_full_disk_at_the_record_names_it_and_leaves_no_model_without_record(tmp_path, monkeypatch, capsys):
    """Item 16: "error: No space left on device" named no file, and model.pt stayed without its record."""
    import medxfer.records

    real = medxfer.records.atomic_write_json

    def full_at_record(path, obj):
        if Path(path).name != "result.json":
            return real(path, obj)
        with atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medxfer.records, "atomic_write_json", full_at_record)
    config = write_yaml(tmp_path / "run.yaml", TINY_RUN)
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "result.json: no space left on the device" in line
    out = tmp_path / "out"
    assert not list(out.rglob("model.*")) and not list(out.rglob("result.json")) and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(medxfer.records, "atomic_write_json", real)
    assert main(["finetune", str(config), "--out", str(out)]) == 0
    assert len(list(out.rglob("model.pt"))) == 1 and len(list(out.rglob("result.json"))) == 1


# --- item 12: a deeply nested YAML; item 13: data check's bad options ------------------------------------


def test_a_deeply_nested_yaml_config_is_one_line(tmp_path, capsys):
    """Item 12: 100,000 nested "[" raised RecursionError."""
    config = tmp_path / "deep.yaml"
    config.write_text("[" * 100_000)
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "deep.yaml: YAML nested too deeply" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, problem", [
    (["demo", "-o", "n_classes=[[["], "--option n_classes: line 1"),
    (["nosuch"], "data check: name: Input should be"),
    (["demo", "--dims", "4"], "data check: spatial_dims: Input should be 2 or 3"),
])
def test_data_check_bad_options_are_one_line(args, problem, capsys):
    """Item 13: each of these ended in a traceback."""
    assert main(["data", "check", *args]) == 2
    assert problem in one_error_line(capsys)


# --- item 21: a folder in use is refused before the heavy imports; item 22: --out / ----------------------


def test_a_locked_folder_is_refused_before_torch_is_imported(tmp_path):
    """Item 21: the second process paid the whole start-up (torch, Lightning) before the lock refused it."""
    out = tmp_path / "out"
    script = ("import sys; from medxfer.cli import main; "
              f"code = main(['finetune', 'missing.yaml', '--out', {str(out)!r}]); "
              "print(code, 'torch' in sys.modules)")
    with folder_lock(out, "output folder"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "in use by another medxfer process" in done.stderr and str(out) in done.stderr


@pytest.mark.parametrize("where", ["/", "~"])
def test_the_root_and_home_folders_are_refused_as_output(where, tmp_path, capsys):
    """Item 22: `--out /` was accepted and filled the root folder."""
    out = os.path.expanduser(where)
    assert main(["finetune", str(tmp_path / "missing.yaml"), "--out", out]) == 2
    assert f"{out}: refusing the" in one_error_line(capsys)
    assert not Path(out, LOCK_FILE).exists()
    # forced: the folder passes, and the command goes on to its next check (here: the missing config)
    assert main(["--allow-any-out", "finetune", str(tmp_path / "missing.yaml"), "--out", out]) == 2
    assert "missing.yaml: config file not found" in one_error_line(capsys)
