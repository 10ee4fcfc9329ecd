"""Tiny runs of the benchmark harness (benchmarks/), so that `make bench` does not rot between runs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402


def test_metric_benchmark_agrees_with_medpy_on_tiny_masks():
    pytest.importorskip("medpy")
    import bench_metrics

    inputs = bench_metrics.make_inputs((48, 48), 3)
    assert all(gt.any() and (prob > 0.5).any() for prob, gt in inputs)
    result = bench_metrics.compare(inputs, repeat=1)
    assert result["agree"], result["max_abs_diff"]
    assert result["n_images"] == 3 and result["medxfer_s"] > 0 and result["reference_s"] > 0
    assert 0.0 < result["mean_dice"] < 1.0  # an imperfect prediction, as the benchmark intends


def test_training_benchmark_sides_see_the_same_batches_and_losses():
    import bench_training

    result = bench_training.measure_model("unet", {"width": 2, "depth": 2}, batch_size=2, shape=(16, 16),
                                          steps=3, rounds=1)
    assert result["same_losses"]
    assert len(result["losses"]["bare"]) == len(result["losses"]["medxfer"]) == 3
    assert result["flops_per_step"] > 0
    for side in ("bare", "medxfer"):
        assert result[f"{side}_step_s"] > 0 and result[f"{side}_wait_s"] >= 0


def test_result_rows_reach_the_summary_table(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = [common.row("suite on masks", "medpy", 0.5, 6.0, "s", 12.0, ">= 10", True),
            common.row("reported only", "bare", float("nan"), None, "MB", None)]
    path = common.write_result("demo", rows, {common.NOTES_KEY: ["a note"]})
    data = json.loads(path.read_text())
    assert data["rows"][1]["medxfer"] is None  # NaN is stored as null, not as invalid JSON
    assert len(data["load_average"]) == 3  # every result says how loaded the shared machine was
    kept = common.write_result("demo_load", [], {"load_average": [9.0, 8.0, 7.0]})
    assert json.loads(kept.read_text())["load_average"] == [9.0, 8.0, 7.0]  # taken before the run: kept
    rows = common.write_and_print("demo_tail", rows, ["note 1"], {"sides": {}}, [1.0, 2.0, 3.0])
    tail = json.loads((tmp_path / "demo_tail.json").read_text())
    assert tail["load_average"] == [1.0, 2.0, 3.0] and tail["notes"] == ["note 1"] and len(rows) == 2
    summary = common.write_summary().read_text()
    assert "| demo | suite on masks | medpy | 0.5 | 6 | s | 12 | >= 10 | yes |" in summary
    assert "| demo | reported only | bare | - | - | MB | - | - | - |" in summary
    assert "- a note" in summary


def test_blob_pairs_are_seeded_and_non_empty():
    a_prob, a_gt = common.blob_pair((40, 40, 40), seed=3)
    b_prob, b_gt = common.blob_pair((40, 40, 40), seed=3)
    assert np.array_equal(a_prob, b_prob) and np.array_equal(a_gt, b_gt)
    assert a_prob.dtype == np.float32 and 0.0 <= a_prob.min() and a_prob.max() <= 1.0
    assert a_gt.any() and (a_prob > 0.5).any()


def test_sweep_benchmark_runs_the_cli_and_reads_back_every_run():
    import bench_sweep

    grid = {"name": "tiny", "base": {"data": {"name": "demo", "options": {"domain": "B"}, "train_images": 2},
                                     "model": {"preset": "unet", "width": 4, "depth": 2},
                                     "train": {"strategy": "scratch", "max_epochs": 1, "batch_size": 2}},
            "axes": {"seed": [0, 1]}}
    result = bench_sweep.run_side(grid, threads=1)
    assert result["counts"] == {"done": 2} and len(result["dice"]) == 2
    assert all(0.0 <= dice <= 1.0 for dice in result["dice"].values())
    assert 0 < result["startup_s"] < result["seconds"] and result["run_s"] > 0


def test_estimator_benchmark_times_every_estimator_on_tiny_images():
    import bench_estimators
    import bench_robustness

    images = bench_robustness.demo_images(6)[:, :, :32, :32].copy()
    labels = bench_estimators.labels_for(6)[:, :32, :32].copy()
    encoder = bench_robustness.make_encoder(width=2, depth=2)
    result = bench_estimators.compare(images, labels, encoder, rounds=1, max_pixels=300,
                                      estimators=("logme", "knn", "gbc", "ccfv"))
    assert set(result["estimator_s"]) == {"logme", "knn_accuracy", "gbc", "cc_fv"}
    assert result["score_s"] > 0 and all(t > 0 for t in result["estimator_s"].values())
    assert len(result["scores"]["knn_accuracy"]) == len(encoder.channels)


def test_metric_benchmark_nsd_agrees_with_monai_on_tiny_masks():
    pytest.importorskip("monai")
    import bench_metrics

    result = bench_metrics.compare_nsd(bench_metrics.make_inputs((40, 40), 2), repeat=1)
    assert result["agree"], result["max_abs_diff"]
    assert result["medxfer_s"] > 0 and result["monai_s"] > 0


def test_3d_benchmark_measures_every_side_and_profiles_unet3d(tmp_path, monkeypatch):
    import bench_3d

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_3d, "SHAPE", (32, 32, 32))
    monkeypatch.setattr(bench_3d, "WIDTH", 4)
    monkeypatch.setattr(bench_3d, "ROUNDS", 1)
    rows = bench_3d.main()
    data = json.loads((tmp_path / "3d.json").read_text())
    assert set(data["times"]) == {"unet3d", "unet3d channels-last", "DynUNet (nnU-Net)"}
    assert all(len(t) == 2 and min(t) > 0 for t in data["times"].values())
    assert data["flops"]["unet3d"] == data["flops"]["unet3d channels-last"] > 0  # same network, same work
    assert 0.5 < data["flops"]["unet3d"] / data["flops"]["DynUNet (nnU-Net)"] < 2  # "similar FLOPs"
    assert any("convolution" in op for op, _ in data["profile"])
    assert sum(share for _, share in data["profile"]) <= 1.0 + 1e-9
    assert [r["target"] for r in rows[:3]] == [">= 0.5", ">= 0.5", "-"]


def test_loss_selection_benchmark_runs_auto_and_every_fixed_loss_on_one_tiny_task():
    import bench_losses

    results = bench_losses.run_tasks([("rare_class_few_cases", 2)], seeds=[0, 1], workers=1,
                                     shape={2: (24, 24)}, steps={2: 4}, width=2)
    (result,) = results
    assert set(result["summary"]) == {"auto"} | set(bench_losses.fixed_losses(bench_losses.make_task(
        "rare_class_few_cases", 2, shape=(24, 24))))
    assert result["auto"]["loss"] and result["auto"]["reason"]
    for summary in result["summary"].values():
        assert 0.0 <= summary["dice"] <= 1.0 and summary["fg_ratio"] >= 0.0
        assert summary["seeds"] == [0, 1] and summary["dice"] == pytest.approx(np.mean(summary["per_seed"]))
    assert result["best_fixed"] != "auto"
    best = result["summary"][result["best_fixed"]]
    # paired per seed: auto's seed-s Dice minus the best fixed loss's seed-s Dice, and the interval around the mean
    assert result["gap_per_seed"] == [a - b for a, b in zip(result["summary"]["auto"]["per_seed"], best["per_seed"])]
    assert result["gap"] == pytest.approx(result["summary"]["auto"]["dice"] - best["dice"])
    assert result["gap_low"] <= result["gap"] <= result["gap_high"]
    assert result["verdict"].split(",")[0] in ("met", "missed", "undecided") and result["n_runs"] == 14
    assert result["met"] == bench_losses.target_met(result)
    run = result["runs"]["auto"][0]
    assert [step for step, _ in run["curve"]] == [1, 2, 3, 4] and run["converged"] in (True, False, None)
    table = bench_losses.markdown_table(results)
    assert "| rare_class_few_cases 2D |" in table and table.count("\n") == 3 and result["verdict"] in table
    assert bench_losses.seed_table(results).count("\n") == 3


def test_loss_benchmark_main_writes_tables_and_per_seed_results(tmp_path, monkeypatch):
    import bench_losses

    monkeypatch.setattr(bench_losses, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_losses, "SHAPES", {2: (16, 16), 3: (8, 8, 8)})
    bench_losses.main(["--tasks", "balanced", "--seeds", "0", "1", "--steps-2d", "2", "--workers", "1",
                       "--out", "tiny"])
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["complete"] and data["seeds"] == [0, 1] and data["n_runs"] == 14 and data["steps"] == {"2": 2}
    assert data["recipe"] == bench_losses.default_recipe()
    (task,) = data["tasks"]
    assert task["task"] == "balanced" and len(task["gap_per_seed"]) == 2 and task["verdict"] in data["table"]
    assert len(data["runs"]["balanced 2D"]["auto"]) == 2 and "curve" in data["runs"]["balanced 2D"]["auto"][0]
    assert data["rows"][0]["met"] == bench_losses.target_met(task)
    markdown = (tmp_path / "tiny.md").read_text()
    assert data["table"] in markdown and data["seed_table"] in markdown and "Whole benchmark" in markdown
    # --render rebuilds the same files from the JSON without training (timing note kept as measured)
    (tmp_path / "tiny.md").unlink()
    bench_losses.main(["--render", "--out", "tiny"])
    assert (tmp_path / "tiny.md").read_text() == markdown
    assert json.loads((tmp_path / "tiny.json").read_text())["runs"] == data["runs"]
    # --resume keeps the finished task (its runs unchanged) and trains only the one missing
    bench_losses.main(["--tasks", "balanced", "many_classes", "--seeds", "0", "1", "--steps-2d", "2", "--workers",
                       "1", "--out", "tiny", "--resume"])
    resumed = json.loads((tmp_path / "tiny.json").read_text())
    assert [t["task"] for t in resumed["tasks"]] == ["balanced", "many_classes"] and resumed["complete"]
    assert resumed["runs"]["balanced 2D"] == data["runs"]["balanced 2D"]
    assert "1 task(s) kept from an earlier run" in (tmp_path / "tiny.md").read_text()
    # the kept task's time is not repeated: the earlier run's timing note travels with it
    (earlier,) = [n for n in data["notes"] if n.startswith("Whole benchmark")]
    assert resumed["notes"][-1] == "Earlier run (the kept tasks): " + earlier
    assert resumed["notes"][-2].startswith("Whole benchmark")
    # --render keeps both
    bench_losses.main(["--out", "tiny", "--render"])
    assert json.loads((tmp_path / "tiny.json").read_text())["notes"][-2:] == resumed["notes"][-2:]
    # another seed list would not compare: refused, naming the file
    with pytest.raises(ValueError, match="tiny.json: cannot resume, its seeds"):
        bench_losses.main(["--tasks", "balanced", "--seeds", "0", "--steps-2d", "2", "--workers", "1",
                           "--out", "tiny", "--resume"])


def test_loss_benchmark_trains_with_medxfers_default_recipe(monkeypatch):
    """The optimizer, lr and schedule come from TrainConfig() at run time, through medxfer's own builders."""
    import bench_losses

    from medxfer.config import TrainConfig
    from medxfer.training import strategies

    seen = {}
    build_optimizer, build_scheduler = strategies.build_optimizer, strategies.build_scheduler

    def spy_optimizer(groups, train):
        seen["train"], seen["optimizer"] = train, build_optimizer(groups, train)
        seen["lrs"] = [group["lr"] for group in seen["optimizer"].param_groups]
        return seen["optimizer"]

    def spy_scheduler(optimizer, train, total_steps):
        seen["total_steps"] = total_steps
        return build_scheduler(optimizer, train, total_steps)

    monkeypatch.setattr(strategies, "build_optimizer", spy_optimizer)
    monkeypatch.setattr(strategies, "build_scheduler", spy_scheduler)
    task = bench_losses.make_task("balanced", 2, shape=(16, 16), n_train=3, n_test=2)
    bench_losses.train_and_score(task, "ce", {}, seed=0, steps=3, batch_size=2, width=2)
    default = TrainConfig()
    assert seen["train"] == TrainConfig(strategy="scratch") and seen["total_steps"] == 3
    assert type(seen["optimizer"]).__name__.lower() == default.optimizer
    assert seen["lrs"] == [default.lr] * len(seen["lrs"])
    recipe = bench_losses.default_recipe()
    assert (recipe["lr"], recipe["scheduler"], recipe["sampling"]) == (default.lr, default.scheduler, default.sampling)


def test_loss_benchmark_batches_interval_and_verdict_by_hand():
    import bench_losses

    rng = np.random.default_rng(0)
    drawn = list(bench_losses.batch_indices(5, 4, 7, "with_replacement", rng))
    assert len(drawn) == 7 and all(len(b) == 4 and b.max() < 5 for b in drawn)  # never a short batch
    epochs = list(bench_losses.batch_indices(5, 4, 4, "epochs", rng))
    assert [len(b) for b in epochs] == [4, 1, 4, 1] and sorted(np.concatenate(epochs[:2])) == [0, 1, 2, 3, 4]
    mean, low, high = bench_losses.paired_interval([0.01, -0.01, 0.0, 0.02, -0.02])
    # t(0.975, 4) = 2.776; sd = sqrt(0.001 / 4) = 0.0158; half width 2.776 * 0.0158 / sqrt(5) = 0.0196
    assert mean == pytest.approx(0.0) and high == pytest.approx(0.0196, abs=1e-4) and low == pytest.approx(-high)
    assert bench_losses.paired_interval([0.03]) == (0.03, 0.03, 0.03)
    assert bench_losses.verdict(-0.019, 0.01, False) == "met"
    assert bench_losses.verdict(-0.05, 0.01, False) == "undecided"  # the interval reaches past -0.02
    assert bench_losses.verdict(-0.05, -0.021, False) == "missed"
    assert bench_losses.verdict(0.0, 0.01, True) == "met, auto collapsed"
    collapsed = {"verdict": "met, auto collapsed", "summary": {"auto": {"any_collapse": True}}}
    assert bench_losses.target_met(collapsed) is False  # a collapse misses the target whatever the interval
    assert bench_losses.target_met({"verdict": "undecided", "summary": {"auto": {"any_collapse": False}}}) is None
    # false positives on the cases without a class: 1 of the 2 cases lacking class 1 gets a stray pixel
    truth = np.zeros((3, 4, 4), dtype=np.int64)
    truth[0, :2] = 1
    predicted = truth.copy()
    predicted[2, 0, 0] = 1
    assert bench_losses.absent_false_positives(predicted, truth, 3) == [0.5, 0.0]
    assert bench_losses.task_specs(["balanced", "amygdala"], [2, 3]) == [("balanced", 2), ("amygdala", 2),
                                                                         ("balanced", 3)]
    with pytest.raises(ValueError, match="unknown task 'lungs'"):
        bench_losses.task_specs(["lungs"], [2])


def test_loss_benchmark_amygdala_task_is_real_and_mostly_absent():
    import bench_losses

    from medxfer.data import colin27

    if not (colin27.TEMPLATES / colin27.IMAGE_FILE).is_file():
        pytest.skip("needs the Debian package mricron-data")
    task = bench_losses.make_task("amygdala", 2)
    assert (len(task.train_labels), len(task.test_labels), task.n_classes) == (16, 16, 2)
    present = lambda labels: sum(bool((label == 1).any()) for label in labels)  # noqa: E731
    assert present(task.train_labels) == 3 and present(task.test_labels) == 3  # absent from most slices
    assert set(task.extra["train_z"]).isdisjoint(task.extra["test_z"])
    assert all(abs(float(image.mean())) < 1e-4 for image in task.train_images)  # z-scored per image
    name, options, _, _ = bench_losses.auto_choice(task)
    assert name == "dice_ce" and options["class_weights"][1] > 1  # the rare-class rule
    with pytest.raises(ValueError, match="2D only"):
        bench_losses.make_task("amygdala", 3)


def test_loss_benchmark_tasks_hold_their_regimes_and_score_by_hand():
    import bench_losses

    rare = bench_losses.make_task("rare_class_few_cases", 2)
    assert [int((label == 2).any()) for label in rare.train_labels] == [1, 1, 0, 0, 0, 0, 0, 0]
    small = bench_losses.make_task("small_objects", 3)
    assert all(0 < np.mean(label == 1) < 0.005 for label in small.train_labels)
    sparse = bench_losses.make_task("sparse_labels", 2)
    assert all(not (label == 2).any() for label, entry in zip(sparse.train_labels, sparse.annotated) if entry)
    # Pooled Dice and the collapse rule by hand: class 1 right, class 2 (2 px) predicted on 6 px elsewhere.
    truth = np.zeros((1, 10, 10), dtype=np.int64)
    truth[0, :5] = 1
    truth[0, 9, :2] = 2
    predicted = truth.copy()
    predicted[0, 9, :2] = 0
    predicted[0, 8, :6] = 2
    scored = bench_losses.score(predicted, truth, 3)
    assert scored["class_dice"] == [1.0, 0.0] and scored["pred_fraction"] == [0.5, 0.06]
    assert scored["fg_ratio"] == pytest.approx(56 / 52) and not scored["collapsed"]  # foreground within 2x
    predicted[0, 5:] = 2  # the rare class on the background: foreground 100 / 52 px, Dice 2 * 2 / 52
    scored = bench_losses.score(predicted, truth, 3)
    assert scored["class_dice"] == [1.0, pytest.approx(4 / 52)] and scored["pred_fraction"][1] == 0.5
    assert scored["fg_ratio"] == pytest.approx(100 / 52) and not scored["collapsed"]
    truth[0, :4] = 0  # foreground 12 px, predicted 100: a collapse
    assert bench_losses.score(predicted, truth, 3)["collapsed"]


@pytest.mark.slow  # ~15 s of bf16-free 3D steps on 2 CPU cores; the benchmark itself runs on the GPU
def test_3d_gpu_benchmark_steps_run_on_the_cpu_with_cached_patches(tmp_path, monkeypatch):
    import bench_3d_gpu
    import torch

    monkeypatch.setattr(bench_3d_gpu, "PATCH", (32, 32, 32))
    cases = common.synthetic_cache(tmp_path, 3, (36, 34, 32), "float16")
    models = bench_3d_gpu.build_models(width=2)
    assert set(models) == {"unet3d", "DynUNet (nnU-Net)"}
    stream = bench_3d_gpu.batches(bench_3d_gpu.make_loader(cases, workers=0))
    fed = bench_3d_gpu.measure(models["unet3d"], stream, steps=2, warmup=0, device=torch.device("cpu"))
    fixed = bench_3d_gpu.measure(models["DynUNet (nnU-Net)"], None, steps=2, warmup=0, device=torch.device("cpu"))
    for result in (fed, fixed):
        assert result["steps_per_s"] > 0 and 0.0 <= result["wait_share"] < 1.0 and np.isfinite(result["loss"])
    assert fed["wait_s"] > 0 and fixed["wait_s"] < fed["wait_s"]  # the fixed batch never waits for data


def test_data3d_benchmark_visits_every_cached_case_and_measures_memory_and_wait(tmp_path):
    import bench_data3d

    cases = common.synthetic_cache(tmp_path, 3, (20, 20, 18), "float16")
    result = bench_data3d.pipeline(cases, patch=(16, 16, 16), steps=1, width=2, workers=0)
    assert result["visited"] == 3 and result["workers"] == 0 and result["worker_peak_mb"] == 0.0
    assert result["main_peak_mb"] >= result["main_start_mb"] > 0
    assert result["total_peak_mb"] == result["main_peak_mb"] and 0.0 < result["wait_share"] < 1.0


@pytest.mark.slow  # three tiny training runs, one through Lightning: 20-170 s on this 2-core machine
def test_convergence_benchmark_trains_every_side_from_the_same_weights_and_reports_each_target():
    from medxfer.data import colin27

    if not (colin27.TEMPLATES / colin27.IMAGE_FILE).is_file():
        pytest.skip("needs the Debian package mricron-data")
    import bench_convergence

    result = bench_convergence.compare(sizes=(5,), seeds=(0,), steps=4, eval_every=2, width=2, shape=32)
    runs = {r["side"]: r for r in result["runs"]}
    assert set(runs) == {"medxfer", "bare", "nnunet"}
    assert runs["medxfer"]["same_init"]  # medxfer's run starts from the weights the plain loops start from
    assert runs["medxfer"]["recipe"]["sampling"] == "with_replacement" and runs["medxfer"]["setup_s"] > 0
    for run in runs.values():
        assert run["curve"]["step"] == [2, 4] and all(0.0 <= d <= 1.0 for d in run["curve"]["dice"])
        assert 0 < run["curve"]["seconds"][0] < run["curve"]["seconds"][1]
    rows = bench_convergence.rows_for(result)
    # set-up needs a second run (imports paid once); time to each side's own plateau is reported, not a target
    assert [r["target"] for r in rows] == ["<= 1.1", ">= -0.02", "-"]
    # time to a common Dice: 95% of the lower plateau of each (medxfer, bare) pair, reached by both
    pair = [{"side": side, "size": 5, "seed": 0, "plateau": plateau,
             "curve": {"seconds": [1.0, 2.0, 3.0], "dice": dice}}
            for side, plateau, dice in (("medxfer", 0.8, [0.3, 0.6, 0.8]), ("bare", 0.5, [0.5, 0.5, 0.5]))]
    assert bench_convergence.time_to_common_dice(pair, 5) == (2.0, 1.0, 1)
    # the summary by hand: 95% of a plateau reached at the first evaluation at or above it
    curve = {"step": [10, 20, 30, 40], "seconds": [1.0, 2.0, 3.0, 4.0], "dice": [0.2, 0.5, 0.6, 0.6]}
    summary = bench_convergence.summarise(curve)
    assert summary["plateau"] == 0.6 and summary["steps_to_95"] == 30 and summary["seconds_to_95"] == 3.0


def _answer_table(rows: list[tuple[str, str, str, str, str]]) -> str:
    """A demo answer table as rich prints it (box-drawing cells), with a wrapped continuation line."""
    lines = ["      the study's answer (Colin27 T1)", "┃ question ┃ training slices ┃ seeds ┃ Dice scratch ┃ Dice ┃ difference ┃ verdict ┃"]
    for question, slices, scratch, dice, difference in rows:
        first, _, rest = question.partition("/")  # "/" marks where rich wraps the question
        lines.append(f"│ {first} │ {slices} │ 5 │ {scratch} │ {dice} │ {difference} [-0.1, +0.2] │ within │")
        lines.append(f"│ {rest} │ │ │ │ │ never fired) │ │")
    return "\n".join(lines + ["runs: 31 done"])


def test_demo_transcripts_compare_on_every_answer_number_within_the_stated_tolerance():
    import bench_demo

    reference = _answer_table([("ImageNet vs scratch", "5", "0.500", "0.600", "+0.100"),
                               ("T1 -> T2-like", "5", "0.300", "0.310", "+0.010")])
    assert bench_demo.answer_numbers(reference) == {("ImageNet vs scratch", "5"): [0.5, 0.6, 0.1],
                                                    ("T1 -> T2-like", "5"): [0.3, 0.31, 0.01]}
    close = reference.replace("0.600", "0.610").replace("+0.100", "+0.110")
    check = bench_demo.compare_transcripts(reference, close)
    assert check["rows"] == 2 and check["within"] and abs(check["max_deviation"] - 0.01) < 1e-9
    far = reference.replace("0.300", "0.350")
    assert not bench_demo.compare_transcripts(reference, far)["within"]
    # a row in only one transcript is never "within", whatever the numbers
    # the same row wrapped at another column width is the same row
    wrapped = _answer_table([("ImageNet vs/scratch", "5", "0.500", "0.600", "+0.100"),
                             ("T1 -> T2-like", "5", "0.300", "0.310", "+0.010")])
    assert bench_demo.compare_transcripts(reference, wrapped)["within"]
    fewer = _answer_table([("ImageNet vs scratch", "5", "0.500", "0.600", "+0.100")])
    check = bench_demo.compare_transcripts(reference, fewer)
    assert not check["within"] and check["missing"] == [["T1 -> T2-like", "5"]]


def test_threads_benchmark_runs_one_side_in_a_fresh_process_and_reads_its_record():
    import bench_threads

    result = bench_threads.run_side("OMP_NUM_THREADS=1", 0, steps=1)
    assert not result["timed_out"] and result["threads"]["intra_op"] == 1
    assert result["threads"]["source"] == "OMP_NUM_THREADS" and result["threads"]["omp_wait_policy"] == "PASSIVE"
    assert 0.0 <= result["dice"] <= 1.0 and 0 < result["train_s"] < result["wall_s"]


def test_analyze_benchmark_measures_an_analysis_of_its_synthetic_tables(monkeypatch):
    import bench_analyze

    import medxfer.report.analyze.inputs as inputs

    monkeypatch.setattr(inputs, "MAX_VARIANTS", inputs.MAX_VARIANTS)  # the child lifts it: restored after

    down, rob = bench_analyze.tables(10)
    assert len(rob) == 10 * len(bench_analyze.LENGTHS) * len(bench_analyze.DATASETS)
    assert rob.groupby(["level", "pooled"]).ngroups == 10 and len(down) == 2 * 20 * 3
    result = bench_analyze.child(str(bench_analyze.SRC), 10)
    assert result["rows"] == len(rob) and result["variants"] == 10 and result["seconds"] > 0
    assert result["rules"] > 20  # an argmin and a patience rule per variant, and the others


def test_layout_benchmark_times_both_layouts_on_one_model_and_checks_the_loss():
    import bench_layout

    result = bench_layout.measure("efficientnet_lite0_unet", threads=1, width=2, batch=2, size=32, steps=1, rounds=2)
    assert result["nchw_ms"] > 0 and result["nhwc_ms"] > 0
    assert result["ratio"] == pytest.approx(result["nhwc_ms"] / result["nchw_ms"])
    assert result["same_loss"] and set(result["losses"]) == {"NCHW", "NHWC"}
