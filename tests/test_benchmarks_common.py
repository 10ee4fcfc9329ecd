"""The shared helpers of the benchmark harness (benchmarks/common.py): what every benchmark's tail writes and prints."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402


def test_benchmark_tails_write_the_notes_and_print_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = [common.row("one side", "bare", 1.0, 2.0, "s", 2.0)]
    # run_all's benchmarks: rows back, notes indented; no load taken before the run = the load as written
    assert common.write_and_print("called", rows, ["note 1"], {"sides": {}}) is rows
    called = json.loads((tmp_path / "called.json").read_text())
    assert called["notes"] == ["note 1"] and called["sides"] == {} and len(called["load_average"]) == 3
    assert capsys.readouterr().out == "   note 1\n"
    # a benchmark that is its own command: exit status 0, notes and the file written printed
    assert common.write_and_exit("command", rows, ["note 2"], {"load_average": [1.0, 2.0, 3.0]}) == 0
    command = json.loads((tmp_path / "command.json").read_text())
    assert command["notes"] == ["note 2"] and command["load_average"] == [1.0, 2.0, 3.0]
    assert command["rows"] == called["rows"]
    assert capsys.readouterr().out == f"note 2\nwrote {tmp_path / 'command.json'}\n"
