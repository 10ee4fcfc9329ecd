"""`medxfer demo --quick`: the whole study in miniature, every output file, and a resumable second run."""

import json
import re

import pandas as pd
import pytest
from PIL import Image

from medxfer.cli import main
from medxfer.records import REFERENCE_COLUMNS

FIGURES = ["dice_vs_pretraining_length", "transferability_vs_pretraining_length", "score_vs_dice",
           "dice_vs_n_images", "source_vs_target", "overlays"]
ROBUSTNESS_COLUMNS = ["dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                      "pretraining_length", "robustness"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_writes_every_output(demo_out, capsys):
    results = pd.read_csv(demo_out / "results.csv")
    assert list(results.columns[: len(REFERENCE_COLUMNS)]) == REFERENCE_COLUMNS
    # quick: 2 lengths x 2 strategies x 2 sizes + scratch x 2 sizes + source->target x 2 sizes + source run
    records = [json.loads(p.read_text()) for p in (demo_out / "runs").glob("*/result.json")]
    assert len(records) == 8 + 2 + 2 + 1
    assert {r["strategy"] for r in records} == {"scratch", "full", "frozen_encoder"}
    assert {r["n_train_images"] for r in records if r["dataset"] == "nuclei-B"} == {5, 20}  # the grid's name for it
    assert results["dice index"].between(0, 1).all()
    assert set(results["test set"]) == {"target", "source"}

    robustness = pd.read_csv(demo_out / "robustness.csv")
    assert list(robustness.columns[:9]) == ROBUSTNESS_COLUMNS
    assert sorted(robustness["pretraining_length"].unique()) == [0, 2]
    pretrain = next((demo_out / "pretrain").glob("*"))
    manifests = [json.loads(p.read_text()) for p in (pretrain / "checkpoints").glob("*.json")]
    assert sorted(m["length"] for m in manifests) == [0, 2]
    assert all("robustness" in m for m in manifests)  # the online callback scored each checkpoint
    recommendation = json.loads(next((demo_out / "scores").glob("*/recommendation.json")).read_text())
    assert recommendation["length"] in (0, 2)
    assert (demo_out / "analysis" / "analysis_summary.csv").is_file()

    html = (demo_out / "report" / "report.html").read_text()
    for name in FIGURES:
        png = demo_out / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(png) as image:
            assert image.size[0] > 100 and image.size[1] > 100
        assert f"id='{name}'" in html and f"{name}.png" in html, name
    assert len(re.findall(r"data:image/png;base64,", html)) >= len(FIGURES)


def test_second_demo_reuses_finished_work(demo_out, capsys):
    before = {p: p.read_text() for p in (demo_out / "runs").glob("*/result.json")}
    assert main(["demo", "--quick", "--out", str(demo_out)]) == 0
    out = capsys.readouterr().out
    assert "finding:" in out and "report:" in out
    after = {p: p.read_text() for p in (demo_out / "runs").glob("*/result.json")}
    assert after == before  # nothing retrained, nothing duplicated


def test_the_written_grid_is_the_study_that_ran(demo_out):
    from medxfer.sweep.runner import run_sweep

    summary = run_sweep(demo_out / "demo_grid.yaml", demo_out, dry_run=True)
    assert len(summary.runs) == 12 and {run.status for run in summary.runs} == {"done"}
