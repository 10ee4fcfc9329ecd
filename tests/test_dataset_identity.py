"""A dataset is named by the user or its folder, never pooled across label sets; the report's headline
compares like with like and says how sure it is (seeds, interval, seed noise, best of k)."""

import numpy as np
import pytest

from medxfer.config import DataConfig, RunConfig, config_to_dict, dataset_name, parse_config
from medxfer.data import load_data
from medxfer.finetune import run_id_for
from medxfer.records import results_table
from medxfer.report.html import scratch_finding
from medxfer.report.tables import downstream_table, summary_table
from medxfer.sweep.grid import expand_grid, parse_sweep

BASE = {"model": {"preset": "unet", "width": 4, "depth": 3}, "train": {"max_steps": 2, "batch_size": 4}}


def record(root, strategy, seed, dice, *, classes=None, length=None, n_images=5, dataset="folders"):
    """A fine-tuning record as written before datasets were named (``dataset: folders``); ``classes`` =
    foreground class names of a multi-class task (per-class metric keys), None = binary."""
    if classes:
        metrics = {f"dice index/{c}": dice for c in classes}
        metrics.update({"mean dice index": dice})
    else:
        metrics = {"dice index": dice, "mean dice index": dice}
    return {
        "kind": "finetune", "run_id": f"{root}-{strategy}-{seed}-{len(classes or [])}", "model": "unet",
        "dataset": dataset, "strategy": strategy, "freeze_encoder": False, "seed": seed, "n_train_images": n_images,
        "config": {"data": {"name": "folders", "root": f"/data/{root}", "options": {}}},
        "pretraining": {"length": None if strategy == "scratch" else (length if length is not None else 10),
                        "scheme": None if strategy == "scratch" else "simple"},
        "metrics": {"target": {"per_image_mean": metrics, "nan_counts": {}}},
    }


def test_dataset_name_prefers_the_user_then_the_loader_then_the_folder():
    assert dataset_name("folders", "folders", "/data/nuclei_binary") == "nuclei_binary"
    assert dataset_name("folders", "folders", "/data/nuclei_binary", "my nuclei") == "my nuclei"
    assert dataset_name("demo", "demo-nuclei-B", None) == "demo-nuclei-B"  # the loader's name says more
    assert dataset_name("acdc", "acdc", None) == "acdc"  # nothing better known
    assert load_data(DataConfig(name="demo", options={"domain": "B"})).name == "demo-nuclei-B"
    assert load_data(DataConfig(name="demo", options={"domain": "B"}, label="my B")).name == "my B"


def test_a_sweep_names_its_runs_datasets_by_their_keys_without_changing_run_ids(tmp_path):
    datasets = {"nuclei-A": {"name": "demo", "options": {"domain": "A"}},
                "nuclei-B": {"name": "demo", "options": {"domain": "B"}}}
    sweep = parse_sweep({"base": BASE, "datasets": datasets, "axes": {"dataset": ["nuclei-A", "nuclei-B"]}},
                        source="grid.yaml")
    runs = expand_grid(sweep, tmp_path).runs
    assert [run.config.data.label for run in runs] == ["nuclei-A", "nuclei-B"]
    for run in runs:
        unnamed = parse_config({**config_to_dict(run.config)}, RunConfig)
        assert unnamed.data.label is None and run_id_for(unnamed) == run.run_id  # a name is no part of the id


def test_two_folders_datasets_are_two_datasets_with_their_own_seeds():
    records = [record("nuclei_binary", s, seed, 0.70 + 0.01 * seed) for s in ("scratch", "full") for seed in (0, 1)]
    records += [record("nuclei_3class", s, seed, 0.50 + 0.01 * seed, classes=["a", "b", "c"])
                for s in ("scratch", "full") for seed in (0, 1)]
    table = results_table(records)
    assert sorted(table["dataset"].unique()) == ["nuclei_3class", "nuclei_binary"]
    assert set(table["dataset layout"]) == {"folders"}
    assert dict(zip(table["dataset"], table["n classes"])) == {"nuclei_binary": 2, "nuclei_3class": 4}
    summary = summary_table(downstream_table(records))
    assert len(summary) == 4 and (summary["n seeds"] == 2).all()


def test_one_folder_with_two_label_sets_is_never_pooled():
    # The reported failure: a binary and a 3-class run of one folder merged into "2 seeds" of one set-up.
    binary = [record("nuclei", s, seed, d) for s, d in (("scratch", 0.80), ("full", 0.78)) for seed in (0, 1, 2)]
    three = [record("nuclei", s, seed, d, classes=["a", "b", "c"])
             for s, d in (("scratch", 0.40), ("full", 0.58)) for seed in (0, 1, 2)]
    for i, r in enumerate(binary + three):  # a little seed noise
        key = "dice index" if "dice index" in r["metrics"]["target"]["per_image_mean"] else "mean dice index"
        r["metrics"]["target"]["per_image_mean"][key] += 0.001 * (i % 3)
    table = downstream_table(binary + three)
    assert sorted(table["dataset"].unique()) == ["nuclei (2 classes: foreground)", "nuclei (4 classes: a, b, c)"]
    summary = summary_table(table)
    assert len(summary) == 4 and (summary["n seeds"] == 3).all()
    finding = scratch_finding(table)
    # Like with like: the binary task (first by name) alone; pretraining is 0.02 worse there, not 0.18 better.
    assert "nuclei (2 classes: foreground)" in finding and "3 seeds" in finding
    assert "falls short of training from scratch by -0.020 Dice" in finding


def test_headline_with_one_seed_says_so_first():
    records = [record("nuclei", "scratch", 0, 0.70), record("nuclei", "full", 0, 0.71, length=0)]
    finding = scratch_finding(downstream_table(records))
    assert finding.startswith("One seed only, so seed noise is unknown")
    assert "(pretraining length 0: a random, untrained encoder)" in finding and "+0.010 Dice" in finding
    assert "beats" not in finding


def test_headline_names_the_best_of_k_and_seed_noise():
    records = [record("nuclei", "scratch", seed, 0.70 + 0.01 * seed) for seed in range(4)]
    for length, gain in ((1, 0.002), (10, 0.004), (100, -0.001)):
        records += [record("nuclei", "full", seed, 0.70 + 0.01 * seed + gain + 0.003 * (-1) ** seed, length=length)
                    for seed in range(4)]
    finding = scratch_finding(downstream_table(records))
    assert finding.startswith("Best of 3 pretrained set-ups compared with scratch")
    assert "(pretraining length 10) (simple) is within seed noise of training from scratch: +0.004 Dice" in finding
    assert "4 seeds" in finding and "0 of the 3 set-ups beat scratch beyond seed noise" in finding


def test_headline_without_scratch_runs_is_none():
    assert scratch_finding(downstream_table([record("nuclei", "full", 0, 0.7)])) is None


def test_the_report_has_a_data_quality_section(tmp_path):
    from medxfer.records import write_record
    from medxfer.report import write_report

    # Every seed's Dice at length 5 equals that at length 1: one of the two is a copy.
    runs = [record("nuclei", "full", seed, 0.7 + 0.01 * seed, length=n) for n in (1, 5) for seed in (0, 1)]
    for r in runs:
        r["run_id"] += f"-{r['pretraining']['length']}"
        write_record(tmp_path / "runs" / r["run_id"], r)
    html = (write_report(tmp_path)).read_text(encoding="utf-8")
    section = html.split("<h2>Data quality</h2>")[1].split("<h2>")[0]
    assert "copied block: 1, left out: unet | nuclei | simple | fine-tuned | length 1" in section
    assert "every seed&#x27;s Dice equals those at length 5" in section


@pytest.mark.parametrize("score", [{"datasets": ["nuclei-B"]}, {}])
def test_a_sweep_scores_a_named_dataset_under_the_same_name_as_its_runs(tmp_path, score):
    from medxfer.sweep.runner import _score_jobs

    (tmp_path / "ckpt").mkdir()
    sweep = parse_sweep({"base": BASE, "datasets": {"nuclei-B": {"name": "demo", "options": {"domain": "B"}}},
                         "axes": {"dataset": ["nuclei-B"]},
                         "score": {**score, "checkpoints": [str(tmp_path / "ckpt")]}}, source="grid.yaml")
    plan = expand_grid(sweep, tmp_path)
    (job,) = _score_jobs(sweep, plan, tmp_path, set())
    assert job.config.data.label == plan.runs[0].config.data.label == "nuclei-B"


def test_analyze_says_one_seed_first():
    from medxfer.report.analyze import seeds_text
    from medxfer.report.rules import GroupCurves

    one = GroupCurves("m", "d", "s", False, "m", "d", "s", np.array([1.0, 2.0]), np.array([0.5, 0.6]),
                      np.array([[0.5], [0.6]]))
    assert seeds_text([one]).startswith("ONE seed")
    three = GroupCurves("m", "d", "s", False, "m", "d", "s", np.array([1.0, 2.0]), np.array([0.5, 0.6]),
                        np.array([[0.5, 0.5, 0.5], [0.6, np.nan, 0.6]]))
    assert seeds_text([three]) == "3 seeds per length (2 at 1 of 2)"
