"""Convergence is visible in every run: the record holds the curves and the flag, the report draws and names
them, and training stops on a validation plateau with max_steps as the cap."""

import math

import pandas as pd
import pytest

from medxfer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.finetune import run_finetune
from medxfer.records import record_rows
from medxfer.report.plots import SkipFigure, plot_learning_curves
from medxfer.report.tables import convergence_count, convergence_note
from medxfer.training.convergence import CONVERGENCE_TOLERANCE, convergence
from medxfer.training.curves import TrainingCurves


def curve(values, every=10):
    return [[every * (i + 1), v] for i, v in enumerate(values)]


def test_the_rule_flags_a_curve_still_rising_in_its_last_quarter():
    rising = convergence(curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]))
    assert rising["converged"] is False and rising["late_best"] == 0.8 and rising["early_best"] == 0.6
    assert "still rising" in rising["reason"]
    flat = convergence(curve([0.1, 0.5, 0.6, 0.6, 0.6, 0.6, 0.605, 0.6]))
    assert flat["converged"] is True  # a late rise within the tolerance is noise
    falling_late = convergence(curve([0.1, 0.5, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5]))
    assert falling_late["converged"] is True
    # the boundary: a rise of exactly the tolerance is converged, a little more is not
    assert convergence(curve([0.5] * 6 + [0.5 + CONVERGENCE_TOLERANCE] * 2))["converged"] is True
    assert convergence(curve([0.5] * 6 + [0.5 + 2 * CONVERGENCE_TOLERANCE] * 2))["converged"] is False
    # too few validations in the last quarter, or none at all: undecided, and it says why
    assert convergence(curve([0.1, 0.2, 0.3, 0.9]))["converged"] is None
    assert "no validation curve" in convergence([])["reason"]
    assert convergence(curve([0.1, float("nan"), 0.2] + [0.3] * 5))["converged"] is True  # NaN points skipped


def test_curves_survive_a_resume():
    saved = TrainingCurves(plateau_steps=5)
    saved.train_loss, saved.val, saved.best, saved.best_step = [[1, 0.9]], [[2, 0.4]], 0.4, 2
    restored = TrainingCurves(plateau_steps=5)
    restored.load_state_dict(saved.state_dict())
    assert restored.record("m")["curves"] == {"train_loss": [[1, 0.9]], "val": [[2, 0.4]], "val_metric": "m"}
    assert (restored.best, restored.best_step) == (0.4, 2)


def test_training_stops_on_a_validation_plateau_and_records_its_curves(tmp_path):
    # lr so small that validation never improves: the plateau (2 steps) stops training long before max_steps
    config = RunConfig(data=DataConfig(name="demo", options={"domain": "A"}, train_images=2),
                       model=ModelConfig(preset="unet", width=4, depth=3),
                       train=TrainConfig(strategy="scratch", max_steps=40, batch_size=2, lr=1e-12, scheduler="none",
                                         val_every_n_steps=1, plateau_steps=2, log_every_n_steps=1))
    record = run_finetune(config, tmp_path).record
    assert record["steps_trained"] == 3
    assert record["convergence"]["stopped_on_plateau_at"] == 3
    assert [step for step, _ in record["curves"]["train_loss"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in record["curves"]["train_loss"])
    assert [step for step, _ in record["curves"]["val"]] == [1, 2, 3]
    assert record["curves"]["val"][0][1] == pytest.approx(record["best_val_dice"])
    assert record["curves"]["val_metric"] == "pooled dice index (validation)"
    assert record["convergence"]["converged"] is None  # 3 validations: too few to tell
    assert record["headline"]["converged"] is None
    assert "converged" in record_rows(record)[0]


def fake_record(run_id, seed, values, converged):
    return {"run_id": run_id, "seed": seed, "dataset": "colin", "strategy": "scratch", "n_train_images": 5,
            "pretraining": {}, "curves": {"train_loss": curve([1.0, 0.8, 0.6]), "val": curve(values),
                                          "val_metric": "pooled dice index (validation)"},
            "convergence": {"converged": converged},
            "metrics": {"target": {"per_image_mean": {"dice index": 0.5}, "nan_counts": {}}}}


def test_the_report_draws_the_curves_and_names_runs_that_did_not_converge():
    records = [fake_record("aaa", 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], False),
               fake_record("bbb", 1, [0.5] * 8, True)]
    figure, detail = plot_learning_curves(records)
    assert detail == ""
    (panel,) = [ax for ax in figure.axes if ax.get_title()]
    assert panel.get_title() == "colin, scratch, 5 images; 1 of 2 runs not converged"
    assert len(panel.get_lines()) == 3  # two validation curves and the cross that ends the unconverged one
    table = pd.DataFrame([row for r in records for row in record_rows(r)])
    note = convergence_note(table)
    assert note.startswith("Not converged: 1 of 2 run(s) (dataset colin) still") and note.endswith(": aaa.")
    assert convergence_note(table[table["run id"] == "bbb"]) is None
    with pytest.raises(SkipFigure, match="learning curves"):
        plot_learning_curves([{"run_id": "old", "metrics": {}}])


RISING, FLAT = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.5] * 8


def test_the_report_states_one_not_converged_count_and_its_scope(tmp_path):
    """The demo's headline counts the runs of its target dataset, the report every run of the folder: the
    report shows one count, saying which runs it counts among; a run counts once, whatever its test sets."""
    import html

    from medxfer.records import write_record
    from medxfer.report import write_report

    second = fake_record("ccc", 0, RISING, False)
    second["dataset"] = "colin-t2"
    second["metrics"]["source"] = second["metrics"]["target"]  # two test sets, still one run
    records = [fake_record("aaa", 0, RISING, False), fake_record("bbb", 1, FLAT, True), second,
               fake_record("ddd", 2, FLAT, None)]  # undecided: counted, not flagged
    table = pd.DataFrame([row for r in records for row in record_rows(r)])
    assert convergence_count(table) == (["aaa", "ccc"], 4, "all datasets: colin, colin-t2")
    target_only = convergence_note(table[table["dataset"] == "colin"])  # what the demo's headline says
    assert target_only.startswith("Not converged: 1 of 3 run(s) (dataset colin) still improved")
    for record in records:
        write_record(tmp_path / "runs" / record["run_id"], record)
    page = html.unescape(write_report(tmp_path, headline=["The study's answer.", target_only])
                         .read_text(encoding="utf-8"))
    assert page.count("Not converged:") == 1
    assert "Not converged: 2 of 4 run(s) (all datasets: colin, colin-t2) still improved" in page
    assert "The study's answer." in page
