"""`medxfer analyze` on small synthetic tables with a planted score-Dice relation."""

import numpy as np
import pandas as pd
import pytest

from medxfer.errors import DataError
from medxfer.report.analyze import analyze, dataset_key, encoder_key, scheme_key

LENGTHS = [0, 10, 20, 40, 80]
PLANTED = "cosine margin=0.5 level=1 pooled | argmin"
# downstream name -> robustness name, as the published tables spell them
MODELS = {"ResNet50 Attention U-Net": "resnet50", "Swin U-Net": "swin_transformer", "basic U-Net": "u-net_encoder"}
DATASETS = {"COVIDQUDataset": "COVID-QU", "ACDC": "ACDC"}


def _planted_tables(seed=0):
    """Dice peaks at a group-specific length; the planted variant is 1 - Dice (lower = better), the others noise."""
    rng = np.random.default_rng(seed)
    down, rob, truth = [], [], {}
    for model, encoder in MODELS.items():
        for ds_down, ds_rob in DATASETS.items():
            peak = LENGTHS[1 + (len(truth) % 4)]
            dice = {n: 0.8 - 0.001 * abs(n - peak) - (0.1 if n == 0 else 0.0) for n in LENGTHS}
            truth[(model, ds_down)] = dice
            for n in LENGTHS:
                for seed_ in range(3):
                    down.append({"model": model, "dataset": ds_down, "pretraining length": n,
                                 "ImageNet accuracy": 0.5, "freeze encoder": False, "pretraining scheme": "advanced",
                                 "seed": seed_, "dice index": dice[n] + 0.0005 * (seed_ - 1),
                                 "mean dice index": np.nan})
                for metric in ("cosine", "l2"):
                    for margin in (0.0, 0.5):
                        for level in (0, 1):
                            for pooled in (True, False):
                                planted = (metric, margin, level, pooled) == ("cosine", 0.5, 1, True)
                                rob.append({"dataset": ds_rob, "metric": metric, "margin": margin,
                                            "encoder": encoder, "pretraining_scheme": "advanced_training",
                                            "pooled": pooled, "level": level, "pretraining_length": n,
                                            "robustness": (1.0 - dice[n]) if planted else rng.random()})
    return pd.DataFrame(down), pd.DataFrame(rob), truth


def test_published_names_map_to_the_same_keys_as_medxfer_names():
    assert encoder_key("ResNet50 Attention U-Net") == encoder_key("resnet50") == encoder_key("resnet50_attention_unet")
    assert encoder_key("Swin U-Net") == encoder_key("swin_transformer") == encoder_key("swin_unet") \
        == encoder_key("swin_tiny_patch4_window7_224")
    assert encoder_key("basic U-Net") == encoder_key("u-net_encoder") == encoder_key("unet") \
        == encoder_key("attention_unet")
    assert dataset_key("COVIDQUDataset") == dataset_key("COVID-QU")
    assert scheme_key("advanced") == scheme_key("advanced_training") != scheme_key("simple")


def test_analyze_finds_the_planted_relation_and_evaluates_stop_rules(tmp_path):
    down, rob, truth = _planted_tables()
    down.to_csv(tmp_path / "results.csv", index=False)
    rob.to_csv(tmp_path / "robustness.csv", index=False)
    result = analyze(tmp_path / "results.csv", tmp_path / "robustness.csv", patience=[1], out_dir=tmp_path / "an")
    n_groups = len(MODELS) * len(DATASETS)
    assert result.best_rule == PLANTED
    planted = result.groups[result.groups["rule"] == PLANTED]
    assert len(planted) == n_groups
    assert np.allclose(planted["spearman"], -1.0) and np.allclose(planted["kendall"], -1.0)
    assert np.allclose(planted["regret"], 0.0)
    # Fixed baselines, checked against the planted Dice curves by hand.
    for (model, ds), dice in truth.items():
        rows = result.groups[(result.groups["model"] == model) & (result.groups["dataset"] == ds)]
        longest = rows[rows["rule"] == "longest pretraining"].iloc[0]
        shortest = rows[rows["rule"] == "shortest non-zero pretraining"].iloc[0]
        best = max(dice.values())
        assert longest["chosen_length"] == 80 and longest["saved"] == 0.0
        assert longest["regret"] == pytest.approx(best - dice[80], abs=1e-9)
        assert shortest["chosen_length"] == 10 and shortest["saved"] == pytest.approx(1 - 10 / 80)
        assert shortest["regret"] == pytest.approx(best - dice[10], abs=1e-9)
        chosen = rows[rows["rule"] == PLANTED].iloc[0]
        assert chosen["chosen_length"] == max(dice, key=dice.get)
    # The random variants do worse on average than the planted one.
    summary = result.summary.set_index("rule")
    others = summary[(summary["family"] == "robustness") & (summary.index != PLANTED)
                     & ~summary.index.str.startswith("cosine margin=0.5 level=1 pooled")]
    assert (others["regret_mean"] > 0).all()
    assert summary.loc["cosine margin=0.5 level=1 pooled | patience=1", "n_groups"] == n_groups
    # Leave-one-dataset-out: chosen on the other dataset, scored on the held-out one.
    assert sorted(result.lodo["held_out"]) == ["acdc", "covidqu"]
    assert (result.lodo["selected_rule"] == PLANTED).all()
    assert result.summary["family"].iloc[:2].tolist() == ["selected (in-sample)", "selected (out-of-sample)"]
    for name in ("analysis_summary.csv", "analysis_groups.csv", "analysis_lodo.csv",
                 "figures/regret_vs_saved.png", "figures/score_vs_dice.png"):
        assert (tmp_path / "an" / name).stat().st_size > 0


def test_analyze_uses_mean_dice_where_dice_is_empty_and_a_yaml_name_mapping(tmp_path):
    down, rob, _ = _planted_tables(seed=1)
    down.loc[down["dataset"] == "ACDC", "mean dice index"] = down["dice index"]
    down.loc[down["dataset"] == "ACDC", "dice index"] = np.nan  # multi-class: only the mean is filled
    down["model"] = down["model"].replace({"basic U-Net": "My Plain Net"})  # unknown without the mapping
    down = pd.concat([down, down.assign(**{"test set": "source", "dice index": 0.0})], ignore_index=True)
    down.loc[: len(down) // 2 - 1, "test set"] = "target"
    (tmp_path / "names.yaml").write_text("encoder: {My Plain Net: unet}\n")
    without = analyze(down, rob, figures=False)
    assert "My Plain Net" not in set(without.groups["model"])
    result = analyze(down, rob, names=tmp_path / "names.yaml", figures=False)
    assert "My Plain Net" in set(result.groups["model"])
    assert result.best_rule == PLANTED  # source-test rows (Dice 0) were left out
    assert np.allclose(result.groups.loc[result.groups["rule"] == PLANTED, "regret"], 0.0)


def test_leave_one_out_with_one_dataset_runs_and_says_nothing_out_of_sample():
    down, rob, _ = _planted_tables()
    result = analyze(down[down["dataset"] == "ACDC"], rob[rob["dataset"] == "ACDC"], figures=False)
    assert result.lodo.empty and result.best_rule == PLANTED


def test_analyze_says_when_nothing_joins():
    down, rob, _ = _planted_tables()
    with pytest.raises(DataError, match="name mapping"):
        analyze(down, rob.assign(dataset="elsewhere"), figures=False)


def test_baseline_estimators_are_oriented_higher_is_better():
    down, rob, truth = _planted_tables()
    inverse = {v: k for k, v in DATASETS.items()}
    models = {v: k for k, v in MODELS.items()}
    base = pd.DataFrame([
        {"dataset": ds, "metric": "logme", "encoder": enc, "pretraining_scheme": "advanced", "level": 0,
         "pretraining_length": n, "score": truth[(models[enc], inverse[ds])][n], "higher_is_better": True}
        for enc in MODELS.values() for ds in DATASETS.values() for n in LENGTHS])
    result = analyze(down, rob, baselines=base, figures=False)
    rows = result.groups[result.groups["rule"] == "logme level=0 | argmin"]
    assert len(rows) == len(MODELS) * len(DATASETS)
    assert np.allclose(rows["regret"], 0.0) and np.allclose(rows["spearman"], 1.0)
    assert set(rows["family"]) == {"baseline estimator"}
    assert result.best_rule == PLANTED  # the selection is among robustness variants


def test_knn_gbc_and_ccfv_rows_of_baselines_csv_become_rules():
    """The estimators of `medxfer score` (baselines.csv, higher is better) each get a stop rule; one that
    follows Dice has no regret, one that runs against it picks the worst length."""
    down, rob, truth = _planted_tables()
    inverse = {v: k for k, v in DATASETS.items()}
    models = {v: k for k, v in MODELS.items()}
    rows = []
    for enc in MODELS.values():
        for ds in DATASETS.values():
            for n in LENGTHS:
                value = truth[(models[enc], inverse[ds])][n]
                rows += [{"dataset": ds, "metric": metric, "encoder": enc, "pretraining_scheme": "advanced",
                          "level": 1, "pretraining_length": n, "score": score, "higher_is_better": True}
                         for metric, score in (("knn_accuracy", value), ("gbc", -value), ("cc_fv", value))]
    result = analyze(down, rob, baselines=pd.DataFrame(rows), figures=False)
    for metric in ("knn_accuracy", "cc_fv"):
        chosen = result.groups[result.groups["rule"] == f"{metric} level=1 | argmin"]
        assert len(chosen) == len(MODELS) * len(DATASETS) and np.allclose(chosen["regret"], 0.0)
    against = result.groups[result.groups["rule"] == "gbc level=1 | argmin"]
    assert len(against) == len(MODELS) * len(DATASETS) and (against["regret"] > 0).all()
