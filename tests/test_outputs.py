"""Output paths: a file where a folder belongs or a read-only place is one line and exit 2 in every
command (#18.11); results follow the umask (#18.15); collect never creates a mistyped folder (#18.14)."""

import errno
import os
import stat

import pytest

from medxfer.cli import main
from medxfer.io import atomic_torch_save, atomic_write_json


def _one_line_error(capsys, *expected):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _commands(tmp_path, out):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_steps: 1\n")
    return {
        "demo": ["demo", "--out", out],
        "finetune": ["finetune", str(config), "--out", out],
        "pretrain": ["pretrain", str(config), "--out", out],
        "analyze": ["analyze", "--downstream", "a.csv", "--robustness", "b.csv", "--out", out],
        "sweep": ["sweep", str(config), "--out", out],
        "predict": ["predict", str(tmp_path), str(tmp_path), "--out", out],
        "score": ["score", str(config), "--out", out],
    }


@pytest.mark.parametrize("command", ["demo", "finetune", "pretrain", "analyze", "sweep", "predict", "score"])
def test_output_folder_that_is_a_file_is_one_line_exit_2(tmp_path, capsys, command):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    args = _commands(tmp_path, str(taken))[command]
    if command == "score":  # the score config is read first (its `out` is the default output folder)
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "run.yaml").write_text(f"checkpoints: {tmp_path / 'ckpt'}\n")
    assert main(args) == 2
    _one_line_error(capsys, "taken.txt")
    assert taken.read_text() == "not a folder"
    # a folder below a file: the same one line
    assert main(_commands(tmp_path, str(taken / "sub"))["demo"]) == 2
    _one_line_error(capsys, "taken.txt")


def test_collect_and_report_refuse_a_file_or_missing_folder(tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    for command in ("collect", "report"):
        assert main([command, str(taken)]) == 2
        _one_line_error(capsys, "taken.txt")
        assert main([command, str(tmp_path / "nowhere")]) == 2
        _one_line_error(capsys, "nowhere", "not found")
        assert not (tmp_path / "nowhere").exists()


def test_a_refused_write_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """A read-only filesystem (EROFS) refuses even root; simulated where the atomic writer creates its file."""
    (tmp_path / "runs").mkdir()

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))

    monkeypatch.setattr("medxfer.io.tempfile.mkstemp", read_only)
    assert main(["collect", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path), os.strerror(errno.EROFS))
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["demo", "--out", str(locked / "out")]) == 2
        _one_line_error(capsys, "not writable")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_results_follow_the_umask(tmp_path, umask):
    import torch

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "record.json", {"a": 1})
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "model.pt")
        (tmp_path / "runs").mkdir()
        assert main(["collect", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    for name in ("record.json", "model.pt", "results.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
