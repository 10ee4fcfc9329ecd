"""`medxfer demo --study 3d`: the offline 3D sparse-label study (data, grid, sweep, report, answer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from medxfer import study3d
from medxfer.cli import main
from medxfer.sweep.grid import expand_grid, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path("/usr/share/mricron/templates")
needs_mricron = pytest.mark.skipif(not (TEMPLATES / "aal.nii.gz").is_file(), reason="mricron-data not installed")


def test_the_config_file_is_the_grid_the_code_builds():
    """configs/study3d/sweep.yaml is written from study_grid (python -m medxfer.study3d), never edited apart."""
    assert (ROOT / study3d.CONFIG_FILE).read_text(encoding="utf-8") == study3d.config_file_text(), (
        "configs/study3d/sweep.yaml differs from medxfer.study3d.study_grid: run python -m medxfer.study3d")


@pytest.mark.parametrize("quick", [False, True])
def test_the_grid_holds_every_arm_size_seed_and_the_second_domain(tmp_path, quick):
    s = study3d.settings(quick)
    sweep = parse_sweep(study3d.study_grid(quick, str(tmp_path / "data")), "study3d")
    plan = expand_grid(sweep, tmp_path / "out")
    assert not plan.invalid and plan.duplicates == 0
    target = [r for r in plan.runs if r.config.data.root.name == "target"]
    seeds: dict[tuple[str, int], set[int]] = {}
    for run in target:
        seeds.setdefault((run.config.train.strategy, run.config.data.train_images), set()).add(run.config.seed)
        if run.config.train.strategy == "scratch":
            assert run.config.pretrained.checkpoint is None
        else:  # the sparse-label pretraining's encoder + decoder, a new head for the new classes
            assert run.config.pretrained.load == "encoder_decoder"
            assert run.config.pretrained.length == s["pretraining_steps"]
            assert Path(run.config.pretrained.checkpoint).parent.parent.name  # DIR/pretrain/<hash>/checkpoints
    sizes = s["sizes"]
    assert set(seeds) == {(arm, n) for arm in ("scratch", "full", "frozen_encoder", "gradual") for n in sizes}
    for (arm, _), found in seeds.items():
        assert found == set(s["seeds"] if arm in ("scratch", "full") else s["arm_seeds"])
    second = [r for r in plan.runs if r.config.data.root.name == "source_t2like"]
    assert {r.config.seed for r in second} == set(s["second_seeds"])
    for run in second:  # the whole base model, tested on the sparse source test split too (forgetting)
        assert run.config.pretrained.load == "full" and run.config.evaluation.source_test.root.name == "source"
    source = sweep.pretraining[0]
    assert source.train.loss == "partial_dice_ce" and source.data.root.name == "source"
    if not quick:
        assert sizes == [2, 4, 8] and len(s["seeds"]) >= 3  # a 95% interval for transfer vs scratch at every size


def test_cli_refuses_an_unknown_study_in_one_line(tmp_path, capsys):
    assert main(["demo", "--study", "4d", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --study: expected 2d or 3d, got '4d'"


def test_cli_runs_the_3d_study_and_prints_its_answer(tmp_path, capsys, monkeypatch):
    """The wiring: --study 3d --quick reaches run_study3d and prints the answer table and the findings."""
    calls = []

    def fake(out, quick=False, progress=False, workers=None):
        calls.append((Path(out), quick, workers))
        answer = pd.DataFrame([{"question": "full fine-tuning vs scratch", "training volumes": 2, "seeds": 3,
                                "Dice scratch": 0.1, "Dice": 0.3, "difference [95% CI]": "+0.200 [+0.100, +0.300]",
                                "verdict": "better than scratch"}])
        return {"answer_table": answer, "headline": ["Forgetting: the base model's own Dice ..."],
                "counts": {"done": 3}, "grid": Path(out) / study3d.GRID_FILE, "results_csv": Path(out) / "results.csv",
                "report": Path(out) / "report" / "report.html"}

    monkeypatch.setattr(study3d, "run_study3d", fake)
    out = tmp_path / "study"
    assert main(["demo", "--study", "3d", "--quick", "--workers", "1", "--out", str(out)]) == 0
    assert calls == [(out, True, 1)]
    printed = " ".join(capsys.readouterr().out.split())
    assert "the study's answer" in printed and "better than scratch" in printed
    assert "finding: Forgetting: the base model's own Dice" in printed and "runs: 3 done" in printed


@needs_mricron
@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 2 min of CPU; on a busy shared machine its wall time is many times that
def test_the_quick_study_runs_every_stage_and_a_rerun_reuses_it(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["demo", "--study", "3d", "--quick", "--out", str(out)]) == 0
    first = " ".join(capsys.readouterr().out.split())
    s = study3d.settings(True)
    for task, n in s["subjects"].items():  # the data, built by the deterministic generator
        assert len(list((out / "data" / task / "imagesTr").glob("*.nii.gz"))) == n
        assert (out / "data" / task / "stand_in.json").is_file()
    assert "annotated_classes" in json.loads((out / "data" / "source" / "dataset.json").read_text())
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    n_target = 2 * len(s["sizes"]) * len(s["seeds"]) + 2 * len(s["sizes"]) * len(s["arm_seeds"])
    assert len(records) == n_target + len(s["second_seeds"])
    assert {r["strategy"] for r in records} == {"scratch", "full", "frozen_encoder", "gradual"}
    assert {r["n_train_images"] for r in records if r["dataset"] == study3d.TARGET} == set(s["sizes"])
    second = [r for r in records if r["dataset"] == study3d.SECOND]
    assert second and all(r["forgetting_baseline"]["computed"] for r in second)
    assert all(r["metrics"]["source"]["annotation"]["partially_annotated_images"] == r["metrics"]["source"]["n_images"]
               for r in second)  # scored on the sparse source test split, each case on what it annotates
    pretrain = json.loads(next((out / "pretrain").glob("*/pretrain.json")).read_text())
    assert pretrain["loss"] == "partial_dice_ce" and pretrain["steps_trained"] == s["pretraining_steps"]

    answer = pd.read_csv(out / "report" / "study_answer.csv")
    arms = {"full fine-tuning vs scratch", "frozen encoder vs scratch", "gradual unfreeze vs scratch"}
    assert set(answer["question"]) >= arms
    assert set(answer[answer["question"].isin(arms)]["training volumes"]) == set(s["sizes"])
    assert answer["question"].str.startswith("forgetting").any()
    html = (out / "report" / "report.html").read_text()
    assert "The study's answer" in html and "Forgetting: the base model" in html
    assert re.search(r"finding: Sparse-label pretraining -> hippocampus \+ amygdala with 2 volumes, full fine-tuning "
                     r"vs scratch: Dice [\d.]+ vs [\d.]+, difference [+-][\d.]+ \(1 seed: no interval\)", first), first
    assert re.search(r"finding: Forgetting: the base model's own Dice on the sparse T1 source test set is [\d.]+", first)

    before = {p: p.read_text() for p in (out / "runs").glob("*/result.json")}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "data").glob("*/stand_in.json")}
    assert main(["demo", "--study", "3d", "--quick", "--out", str(out)]) == 0
    assert {p: p.read_text() for p in (out / "runs").glob("*/result.json")} == before  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (out / "data").glob("*/stand_in.json")} == stamps  # nor rewritten
    assert "runs: " + str(len(before)) + " reused" in " ".join(capsys.readouterr().out.split())
