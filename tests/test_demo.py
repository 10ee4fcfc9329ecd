"""`medxfer demo --quick`: the real study in miniature, every output file, the headline, and a resumable rerun."""

import json
import re

import pandas as pd
import pytest
from PIL import Image

from medxfer.cli import main
from medxfer.data import colin27
from medxfer.data.imagenet import FASHION_MNIST_ROOT
from medxfer.records import REFERENCE_COLUMNS, SOURCE_BEFORE

FIGURES = ["dice_vs_pretraining_length", "transferability_vs_pretraining_length", "score_vs_dice",
           "dice_vs_n_images", "source_vs_target", "overlays"]
ROBUSTNESS_COLUMNS = ["dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                      "pretraining_length", "robustness"]
# quick: T1 {scratch, ImageNet fine-tuned, ImageNet frozen} x {5, 20} slices + ladder lengths {2, 4} x 5 slices,
# T2-like {scratch, T1 model fine-tuned} x 5 slices; one seed
N_RUNS = 3 * 2 + 2 + 2

pytestmark = [pytest.mark.timeout(900), pytest.mark.skipif(
    not (colin27.TEMPLATES / colin27.IMAGE_FILE).is_file()
    or not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs the Debian packages mricron-data and dataset-fashion-mnist (make test installs them as root)")]
# (the timeout: --quick takes about 1.5 min of CPU; on a busy shared machine its wall time is several times that)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_writes_every_output(demo_out):
    results = pd.read_csv(demo_out / "results.csv")
    assert list(results.columns[: len(REFERENCE_COLUMNS)]) == REFERENCE_COLUMNS
    records = [json.loads(p.read_text()) for p in (demo_out / "runs").glob("*/result.json")]
    assert len(records) == N_RUNS
    assert {r["dataset"] for r in records} == {"colin27-t1", "colin27-t2like"}
    assert {r["strategy"] for r in records} == {"scratch", "full", "frozen_encoder"}
    schemes = {(r["pretraining"] or {}).get("scheme") for r in records}
    assert schemes == {None, "imagenet", "simple", "segmentation:colin27-t1"}
    assert {r["n_train_images"] for r in records if r["dataset"] == "colin27-t1"} == {5, 20}
    imagenet = [r for r in records if (r["pretraining"] or {}).get("scheme") == "imagenet"]
    assert all(r["model"] == "efficientnet_lite0_unet" for r in records)
    assert all(r["pretraining"]["checkpoint"].endswith("encoder.pt") for r in imagenet)
    assert results["mean dice index"].between(0, 1).all()
    # the T2-like runs are tested on both domains, and the source model's own score sits beside them
    assert set(results["test set"]) == {"target", "source", SOURCE_BEFORE}
    transferred = results[results["test set"] == "source"]
    baseline = results[results["test set"] == SOURCE_BEFORE]
    # only a run that starts from the whole source model (head included) has a baseline of its own
    assert len(baseline) >= 1 and set(baseline["run id"]) <= set(transferred["run id"])
    assert baseline["mean dice index"].between(0, 1).all()
    transfer = [r for r in records if (r["pretraining"] or {}).get("scheme") == "segmentation:colin27-t1"]
    assert transfer and all(r["forgetting_baseline"]["computed"] for r in transfer)
    # the source model of the transfer is not one of the study's runs
    assert len(list((demo_out / "source" / "runs").glob("*/result.json"))) == 1

    robustness = pd.read_csv(demo_out / "robustness.csv")
    assert list(robustness.columns[:9]) == ROBUSTNESS_COLUMNS
    assert sorted(robustness["pretraining_length"].unique()) == [0, 2, 4]
    assert robustness["robustness"].between(0, 1).all()
    pretrain = next((demo_out / "pretrain").glob("*"))
    manifests = [json.loads(p.read_text()) for p in (pretrain / "checkpoints").glob("*.json")]
    assert sorted(m["length"] for m in manifests) == [0, 2, 4]
    assert all(0 <= m["val_accuracy"] <= 1 for m in manifests)
    recommendation = json.loads(next((demo_out / "scores").glob("*/recommendation.json")).read_text())
    assert recommendation["length"] in (0, 2, 4)
    assert (demo_out / "analysis" / "analysis_summary.csv").is_file()

    html = (demo_out / "report" / "report.html").read_text()
    assert "The study's answer" in html and "ImageNet, fine-tuned vs scratch with 5 training slices" in html
    assert html.index("The study's answer") < html.index("Dice per configuration")
    for name in FIGURES:
        png = demo_out / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(png) as image:
            assert image.size[0] > 100 and image.size[1] > 100
        assert f"id='{name}'" in html and f"{name}.png" in html, name
    assert len(re.findall(r"data:image/png;base64,", html)) >= len(FIGURES)
    answer = pd.read_csv(demo_out / "report" / "study_answer.csv")
    assert answer["question"].tolist()[:2] == ["ImageNet, fine-tuned vs scratch", "ImageNet, frozen encoder vs scratch"]


def test_second_demo_reuses_finished_work_and_prints_the_answers(demo_out, capsys, monkeypatch):
    from medxfer.sweep import backends

    def no_worker(*args, **kwargs):
        raise AssertionError("a rerun of a finished demo started a worker process")

    monkeypatch.setattr(backends, "worker_pool", no_worker)  # nothing is left to run: no process to start
    before = {p: p.read_text() for p in (demo_out / "runs").glob("*/result.json")}
    assert main(["demo", "--quick", "--out", str(demo_out)]) == 0
    out = capsys.readouterr().out
    after = {p: p.read_text() for p in (demo_out / "runs").glob("*/result.json")}
    assert after == before  # nothing retrained, nothing duplicated
    assert "report:" in out and "the study's answer" in out and "pretraining-length ladder" in out
    flat = " ".join(out.split())  # rich wraps long lines
    headline = re.search(r"finding: ImageNet, fine-tuned vs scratch with 5 training slices: Dice ([\d.]+) vs "
                         r"([\d.]+), difference ([+-][\d.]+) \(1 seed: no interval\)", flat)
    assert headline, flat
    imagenet, scratch, difference = (float(v) for v in headline.groups())
    assert 0 <= imagenet <= 1 and 0 <= scratch <= 1
    assert difference == pytest.approx(imagenet - scratch, abs=0.0015)
    stop = re.search(r"would have stopped pretraining at (\d+) steps and chosen the checkpoint at (\d+) steps", flat)
    ran_on = re.search(r"never fired, so pretraining would have run to the last checkpoint \((\d+) steps\); it chose "
                       r"the checkpoint at (\d+) steps", flat)
    found = stop or ran_on
    assert found and int(found.group(2)) <= int(found.group(1)) <= 4
    assert not ran_on or int(ran_on.group(1)) == 4
    assert re.search(r"T1 model fine-tuned on the T2-like domain with 5 slices vs scratch there: Dice [\d.]+ vs", flat)


def test_the_written_grid_is_the_study_that_ran(demo_out):
    from medxfer.sweep.runner import run_sweep

    summary = run_sweep(demo_out / "demo_grid.yaml", demo_out, dry_run=True)
    assert len(summary.runs) == N_RUNS and {run.status for run in summary.runs} == {"done"}


def test_a_full_demo_run_stopped_on_its_plateau_is_one_the_convergence_rule_calls_converged():
    """The demo's plateau stop (patience plateau_steps, min_delta the convergence tolerance, cap max_steps) and
    the report's convergence rule agree: on any validation curve, a run the plateau stopped is not flagged."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from medxfer.demo import _train
    from medxfer.training.convergence import convergence
    from medxfer.training.curves import TrainingCurves

    train = _train(quick=False)
    cap, every = train["max_steps"], train["val_every_n_steps"]
    rng = np.random.default_rng(0)
    stopped = 0
    for _ in range(200):
        rate, noise = rng.uniform(0.002, 0.05), rng.uniform(0.0, 0.03)
        curves = TrainingCurves("val_dice", train["plateau_steps"], train["plateau_min_delta"])
        trainer = SimpleNamespace(sanity_checking=False, should_stop=False, global_step=0, callback_metrics={})
        for step in range(every, cap + 1, every):
            value = 0.8 * (1 - np.exp(-rate * step)) + rng.normal(0, noise)
            trainer.global_step, trainer.callback_metrics = step, {"val_dice": torch.tensor(value)}
            curves.on_validation_end(trainer, None)
            if trainer.should_stop:
                break
        if curves.stopped_on_plateau is not None:
            stopped += 1
            assert convergence(curves.val)["converged"] is True, curves.val
    assert stopped > 50  # the property was checked on many stopped runs
