"""The report: figures (valid PNGs, embedded in the HTML), skipping, mean ± sd and paired statistics."""

from __future__ import annotations

import base64
import html as html_module
import io
import re
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from medxfer.config import RunConfig, config_to_dict, parse_config
from medxfer.errors import DataError
from medxfer.io import stable_hash
from medxfer.report import downstream_table, paired_comparison, paired_test, summary_table, write_report
from medxfer.records import iter_records, write_record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["dice_vs_pretraining_length", "transferability_vs_pretraining_length", "score_vs_dice",
               "dice_vs_n_images", "per_class_dice_vs_n_images", "source_vs_target", "overlays",
               "learning_curves"]
ARMS = [("scratch", 0), ("full", 1), ("full", 5), ("frozen_encoder", 1), ("frozen_encoder", 5)]


def fake_dice(strategy: str, length: int, n_images: int, seed: int) -> float:
    """A plausible, fully known Dice: pretraining helps, more images help, seeds add a little noise."""
    bonus = {"scratch": 0.0, "full": 0.03 * length ** 0.5, "frozen_encoder": 0.02 * length ** 0.5}[strategy]
    return round(0.50 + 0.01 * n_images + bonus + 0.013 * seed * (1 + length % 3), 6)


def make_record(strategy: str, length: int, n_images: int, seed: int, *, source: bool = True) -> dict:
    config = parse_config({
        "seed": seed,
        "data": {"name": "demo", "options": {"domain": "B"}, "train_images": n_images},
        "model": {"preset": "unet", "width": 4, "depth": 3},
        "pretrained": ({} if strategy == "scratch" else {"checkpoint": "pretrain/encoder", "length": length}),
        "train": {"strategy": strategy, "max_steps": 2},
    }, RunConfig)
    config_dict = config_to_dict(config)
    dice = fake_dice(strategy, length, n_images, seed)

    def test_result(value: float) -> dict:
        return {"per_image_mean": {"dice index": value, "mean dice index": value, "accuracy": 0.9},
                "pooled": {"dice index": value}, "nan_counts": {"dice index": 0}, "n_images": 2,
                "per_image": [{"case_id": "nucleiB_r0c1", "dice index": value}]}

    metrics = {"target": test_result(dice)}
    if source:
        metrics["source"] = test_result(round(0.9 - 0.02 * n_images - 0.01 * seed, 6))
    return {
        "kind": "finetune", "status": "done", "run_id": stable_hash(config_dict), "config": config_dict,
        "model": "unet", "dataset": "demo-nuclei-B", "strategy": strategy,
        "freeze_encoder": strategy == "frozen_encoder", "seed": seed, "n_train_images": n_images,
        "train_case_ids": [], "loss": {"name": "dice_ce"},
        "pretraining": {"length": None if strategy == "scratch" else length, "scheme": "simple" if length else None,
                        "accuracy": None, "checkpoint": None, "load": None},
        "metrics": metrics, "timings": {"train_s": 1.0, "eval_s": 0.5, "total_s": 1.5},
        "curves": {"train_loss": [[1, 0.9], [2, 0.7]], "val": [[1, dice / 2], [2, dice]], "val_metric": "dice"},
        "convergence": {"converged": None},
    }


def save_tiny_model(run_dir, record: dict) -> None:
    """Save a tiny untrained U-Net the way finetune does (model.pt + model.json manifest)."""
    from medxfer.models import build_segmenter
    from medxfer.models.weights import save_model_weights

    torch.manual_seed(0)
    spec = {**record["config"]["model"], "in_channels": 1, "n_classes": 2}
    model = build_segmenter(spec)
    save_model_weights(model, run_dir / "model.pt", manifest={"model": spec, "run_id": record["run_id"]})


def write_robustness(path) -> pd.DataFrame:
    rows = []
    for metric in ("cosine", "euclidean"):
        for pooled in (True, False):
            for level in (0, 1, 2):
                for length in (0, 1, 5):
                    rows.append({"dataset": "demo-nuclei-B", "metric": metric, "margin": 0.5, "encoder": "unet",
                                 "pretraining_scheme": "simple", "pooled": pooled, "level": level,
                                 "pretraining_length": length, "robustness": 0.1 * level + 0.05 * length})
    table = pd.DataFrame(rows)
    table.to_csv(path, index=False)
    return table


@pytest.fixture()
def results(tmp_path):
    records = []
    for strategy, length in ARMS:
        for n_images in (5, 10):
            for seed in (0, 1):
                record = make_record(strategy, length, n_images, seed)
                write_record(tmp_path / "runs" / record["run_id"], record)
                records.append(record)
    return tmp_path, records


def _check_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.width > 50 and image.height > 50
        return image.size


def test_full_report_has_every_figure_embedded_and_valid(results):
    root, records = results
    write_robustness(root / "robustness.csv")
    shown = [r for r in records if r["seed"] == 0 and r["n_train_images"] == 5
             and (r["strategy"], r["pretraining"]["length"]) in (("scratch", None), ("full", 5))]
    for record in shown:
        save_tiny_model(root / "runs" / record["run_id"], record)

    html_path = write_report(root)
    assert html_path == root / "report" / "report.html"
    html = html_path.read_text(encoding="utf-8")
    for name in ALL_FIGURES:
        data = (root / "report" / f"{name}.png").read_bytes()
        _check_png(data)
        assert f"href='{name}.png'" in html
        embedded = re.search(rf"<figure id='{name}'><img alt='{name}' src='data:image/png;base64,([^']+)'", html)
        assert embedded and base64.b64decode(embedded.group(1)) == data
    assert "Skipped figures" not in html

    # The overlay grid: image + ground truth + one column per run with a model (2), 3 test cases.
    width, height = Image.open(root / "report" / "overlays.png").size
    assert width > height

    # The opening sentence: the best of the 4 pretrained arms vs scratch with 5 images, paired over the 2
    # seeds, said to be the best of 4; 2 seeds give no interval (a t-interval on 1 degree of freedom).
    differences = [fake_dice("full", 5, 5, seed) - fake_dice("scratch", 0, 5, seed) for seed in (0, 1)]
    finding = html_module.unescape(re.search(r"<p class='finding'>([^<]+)</p>", html).group(1))
    assert finding.startswith("Best of 4 pretrained set-ups compared with scratch")
    assert "Fine-tuning from the pretrained encoder (pretraining length 5) (simple) differs from training from " \
           f"scratch by {np.mean(differences):+.3f} Dice" in finding
    assert "5 target images, 2 seeds" in finding and "2 seeds: no interval, too few to tell it from seed noise" \
        in finding and "CI" not in finding
    # The transferability sentence: the score rises with length, and so does Dice for full fine-tuning.
    assert "Spearman" in html
    corr = pd.read_csv(root / "report" / "score_dice_correlation.csv")
    # full: scratch is its length-0 point, so 3 lengths; Dice and score both rise with length -> rho = 1.
    # frozen: lengths 1 and 5 only, too few for a rank correlation.
    assert set(corr["strategy"]) == {"full", "frozen_encoder"}
    full, frozen = corr[corr["strategy"] == "full"], corr[corr["strategy"] == "frozen_encoder"]
    assert (full["n lengths"] == 3).all() and np.allclose(full["spearman rho"], 1.0)
    assert (frozen["n lengths"] == 2).all() and frozen["spearman rho"].isna().all()
    assert "The best pretraining length is 5" in html and "rho = +1.00" in html
    # Tables exist as CSV and in the page.
    for csv in ("summary_mean_sd.csv", "paired_comparison.csv"):
        assert (root / "report" / csv).is_file() and f"href='{csv}'" in html


def test_missing_data_skips_figures_and_says_why(tmp_path):
    for strategy, length in ARMS[:3]:
        for seed in (0, 1):
            record = make_record(strategy, length, 5, seed, source=False)
            del record["curves"]  # a record from before runs kept their curves
            write_record(tmp_path / "runs" / record["run_id"], record)
    stale = tmp_path / "report" / "overlays.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")

    html = write_report(tmp_path).read_text(encoding="utf-8")
    _check_png((tmp_path / "report" / "dice_vs_pretraining_length.png").read_bytes())
    skipped = {name: re.search(rf"<li><b>{name}</b>: ([^<]+)</li>", html) for name in ALL_FIGURES[1:]}
    assert all(skipped.values()), skipped
    assert "robustness.csv" in skipped["transferability_vs_pretraining_length"].group(1)
    assert "robustness.csv" in skipped["score_vs_dice"].group(1)
    assert "two or more numbers of training images" in skipped["dice_vs_n_images"].group(1)
    assert "source test set" in skipped["source_vs_target"].group(1)
    assert "model.pt" in skipped["overlays"].group(1)
    assert "learning curves" in skipped["learning_curves"].group(1)
    for name in ALL_FIGURES[1:]:
        assert not (tmp_path / "report" / f"{name}.png").exists()
        assert f"<figure id='{name}'" not in html


def test_robustness_only_report(tmp_path):
    write_robustness(tmp_path / "robustness.csv")
    html = write_report(tmp_path).read_text(encoding="utf-8")
    _check_png((tmp_path / "report" / "transferability_vs_pretraining_length.png").read_bytes())
    assert "peaks at pretraining length 5" in html
    assert "<li><b>dice_vs_pretraining_length</b>" in html


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nothing to report"):
        write_report(tmp_path)


def test_mean_sd_table_matches_hand_computation(results):
    root, _ = results
    table = downstream_table(iter_records(root))
    summary = summary_table(table)
    assert len(summary) == len(ARMS) * 2 * 2  # arms x n images x test sets
    row = summary[(summary["strategy"] == "full") & (summary["pretraining length"] == 5)
                  & (summary["n train images"] == 10) & (summary["test set"] == "target")].iloc[0]
    values = [fake_dice("full", 5, 10, seed) for seed in (0, 1)]
    assert row["n seeds"] == 2
    assert row["dice mean"] == pytest.approx(statistics.mean(values))
    assert row["dice sd"] == pytest.approx(statistics.stdev(values))
    assert row["dice mean ± sd"] == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    scratch = summary[(summary["strategy"] == "scratch") & (summary["test set"] == "source")
                      & (summary["n train images"] == 5)].iloc[0]
    assert scratch["pretraining length"] == 0  # scratch is length 0 by definition
    assert scratch["dice mean"] == pytest.approx(np.mean([0.9 - 0.1, 0.9 - 0.1 - 0.01]))


def test_mean_dice_index_is_used_where_dice_index_is_empty():
    record = make_record("full", 1, 5, 0, source=False)
    record["metrics"]["target"]["per_image_mean"]["dice index"] = None
    record["metrics"]["target"]["per_image_mean"]["mean dice index"] = 0.42
    assert downstream_table([record])["dice"].tolist() == [0.42]


def test_paired_comparison_gives_the_scipy_values(results):
    root, _ = results
    paired = paired_comparison(downstream_table(iter_records(root)))
    # arms are compared in sorted order, so "full, ..." is a and "scratch" is b
    row = paired[(paired["a"] == "full, length 5 (simple)") & (paired["b"] == "scratch")
                 & (paired["n train images"] == 5) & (paired["test set"] == "target")].iloc[0]
    a = [fake_dice("full", 5, 5, seed) for seed in (0, 1)]
    b = [fake_dice("scratch", 0, 5, seed) for seed in (0, 1)]
    expected = stats.ttest_rel(a, b)
    assert row["test"] == "paired t-test" and row["n pairs"] == 2
    assert row["p value"] == pytest.approx(expected.pvalue)
    assert row["statistic"] == pytest.approx(expected.statistic)
    diff = np.subtract(a, b)
    assert row["mean difference"] == pytest.approx(diff.mean())
    assert row["effect size"] == pytest.approx(diff.mean() / diff.std(ddof=1))


def test_paired_test_uses_wilcoxon_from_six_pairs():
    rng = np.random.default_rng(3)
    a = rng.uniform(0.5, 0.9, 8)
    b = a - rng.normal(0.05, 0.04, 8)
    result = paired_test(a, b)
    expected = stats.wilcoxon(a, b)
    assert result["test"] == "wilcoxon signed-rank"
    assert result["p value"] == pytest.approx(expected.pvalue)
    assert result["statistic"] == pytest.approx(expected.statistic)
    diff = a - b
    ranks = stats.rankdata(np.abs(diff))
    r = (ranks[diff > 0].sum() - ranks[diff < 0].sum()) / ranks.sum()
    assert result["effect size"] == pytest.approx(r)
    five = paired_test(a[:5], b[:5])
    assert five["test"] == "paired t-test"
    assert five["p value"] == pytest.approx(stats.ttest_rel(a[:5], b[:5]).pvalue)
    assert np.isnan(paired_test(a[:1], b[:1])["p value"])


@pytest.mark.parametrize("limits,expected", [((2, 4), 2), ((4, 4), 3), ((0, 4), 0)])
def test_the_overlay_grid_shows_no_more_cases_than_evaluation_max_overlays(tmp_path, limits, expected):
    """evaluation.max_overlays was accepted and ignored: the grid shows at most that many test cases (the
    smallest among the runs shown, at most the report's 3); 0 = no grid."""
    from medxfer.report.overlays import plot_overlay_grid
    from medxfer.report.plots import SkipFigure

    records = []
    for (strategy, length), limit in zip((("scratch", 0), ("full", 5)), limits):
        record = make_record(strategy, length, 5, 0)
        record["config"]["evaluation"]["max_overlays"] = limit
        write_record(tmp_path / "runs" / record["run_id"], record)
        save_tiny_model(tmp_path / "runs" / record["run_id"], record)
        records.append(record)
    if expected == 0:
        with pytest.raises(SkipFigure, match="evaluation.max_overlays is 0"):
            plot_overlay_grid(tmp_path, records)
        return
    figure, description = plot_overlay_grid(tmp_path, records)
    assert description.endswith(f"2 run(s) on {expected} test case(s)")
    assert len(figure.axes) == expected * 4  # image, ground truth and 2 runs per case
