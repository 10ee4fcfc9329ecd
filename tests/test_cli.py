import subprocess
import sys

import pytest

from medxfer.cli import main

COMMANDS = [name for name in ("demo", "finetune", "collect", "models", "pretrain", "score", "analyze",
                              "sweep", "report", "predict")]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_data_check_has_help(capsys):
    assert main(["data", "check", "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_config_error_is_one_line_on_stderr_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lerning_rate: 1\n")
    assert main(["finetune", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bad.yaml" in err and "train.lerning_rate" in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    from medxfer.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "finetune", str(bad)])


def test_usage_error_exits_non_zero(capsys):
    assert main(["finetune"]) != 0
    assert main(["no-such-command"]) != 0


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: 3\n")
    proc = subprocess.run([sys.executable, "-m", "medxfer.cli", "finetune", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "bad.yaml" in proc.stderr


def test_data_check_prints_counts_and_fails_cleanly(tmp_path, capsys):
    assert main(["data", "check", "demo", "-o", "domain=A"]) == 0
    out = capsys.readouterr().out
    assert "train: 20 cases" in out and "test: 8 cases" in out
    assert main(["data", "check", "acdc", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and err.count("\n") == 1


def test_models_lists_presets_with_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for preset in ("unet", "attention_unet", "resnet50_attention_unet", "swin_unet", "unet3d"):
        assert preset in out
    assert " M " in out
