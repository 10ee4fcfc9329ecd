"""`medxfer analyze` on small synthetic tables: a planted score-Dice relation, each input defect (copied
block, duplicates, constant variant, uneven coverage) and the rule harness (decisions.csv)."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medxfer.cli import main
from medxfer.errors import DataError
from medxfer.report.analyze import (
    IMAGENET_PREDICTOR,
    analyze,
    dataset_key,
    encoder_key,
    scheme_key,
)
from medxfer.report.analyze.statistics import _row_kendall_b, _row_pearson
from medxfer.report.rules import (
    DECISION_COLUMNS,
    Decision,
    GroupCurves,
    Rule,
    evaluate_rules,
    imagenet_gain_below,
    oracle_saving,
    score_rule,
)

LENGTHS = [0, 10, 20, 40, 80]
ACCURACY = {0: 0.001, 10: 0.30, 20: 0.50, 40: 0.53, 80: 0.60}  # gains after 10: +67%, +6%, +13%
PLANTED = "cosine margin=0.5 level=1 pooled"
# downstream name -> robustness name, as the published tables spell them
MODELS = {"ResNet50 Attention U-Net": "resnet50", "Swin U-Net": "swin_transformer", "basic U-Net": "u-net_encoder"}
DATASETS = {"COVIDQUDataset": "COVID-QU", "ACDC": "ACDC"}
SEED_OFFSETS = (-0.0005, 0.0, 0.0005)  # seed noise (s.d.) 0.0005


def _planted_tables(seed=0, levels=(0, 1)):
    """Dice peaks at a group-specific length; the planted variant is 1 - Dice (lower = better), the others
    random smooth trends over length (as real scores are: neighbouring checkpoints score alike)."""
    rng = np.random.default_rng(seed)
    down, rob, truth = [], [], {}
    for model, encoder in MODELS.items():
        for ds_down, ds_rob in DATASETS.items():
            start, slope = rng.random(64), rng.normal(0, 0.3, 64)
            peak = LENGTHS[1 + (len(truth) % 4)]
            dice = {n: 0.8 - 0.001 * abs(n - peak) - (0.1 if n == 0 else 0.0) for n in LENGTHS}
            truth[(model, ds_down)] = dice
            for n in LENGTHS:
                for s, offset in enumerate(SEED_OFFSETS):
                    down.append({"model": model, "dataset": ds_down, "pretraining length": n,
                                 "ImageNet accuracy": ACCURACY[n], "freeze encoder": False,
                                 "pretraining scheme": "advanced", "seed": s, "dice index": dice[n] + offset,
                                 "mean dice index": np.nan})
                for i, (metric, margin, level, pooled) in enumerate(itertools.product(
                        ("cosine", "l2"), (0.0, 0.5), levels, (True, False))):
                    planted = (metric, margin, level, pooled) == ("cosine", 0.5, 1, True)
                    noise = start[i] + slope[i] * n / 80 + 0.01 * rng.random()
                    rob.append({"dataset": ds_rob, "metric": metric, "margin": margin, "encoder": encoder,
                                "pretraining_scheme": "advanced_training", "pooled": pooled, "level": level,
                                "pretraining_length": n, "robustness": (1.0 - dice[n]) if planted else noise})
    return pd.DataFrame(down), pd.DataFrame(rob), truth


def _rule(result, name):
    return result.decisions[result.decisions["rule"] == name]


def _checks(result, check):
    return [f for f in result.quality if f.check == check]


def test_published_names_map_to_the_same_keys_as_medxfer_names():
    assert encoder_key("ResNet50 Attention U-Net") == encoder_key("resnet50") == encoder_key("resnet50_attention_unet")
    assert encoder_key("Swin U-Net") == encoder_key("swin_transformer") == encoder_key("swin_unet") \
        == encoder_key("swin_tiny_patch4_window7_224")
    assert encoder_key("basic U-Net") == encoder_key("u-net_encoder") == encoder_key("unet") \
        == encoder_key("attention_unet")
    assert dataset_key("COVIDQUDataset") == dataset_key("COVID-QU")
    assert scheme_key("advanced") == scheme_key("advanced_training") != scheme_key("simple")


def test_planted_relation_baselines_and_decisions_csv(tmp_path):
    down, rob, truth = _planted_tables()
    down.to_csv(tmp_path / "results.csv", index=False)
    rob.to_csv(tmp_path / "robustness.csv", index=False)
    result = analyze(tmp_path / "results.csv", tmp_path / "robustness.csv", out_dir=tmp_path / "an", n_resamples=200)
    n_groups = len(MODELS) * len(DATASETS)
    assert result.best_variant == PLANTED
    assert result.quality == []  # clean input: nothing to report
    planted = _rule(result, f"{PLANTED} | argmin")
    assert len(planted) == n_groups and np.allclose(planted["regret"], 0.0)
    assert (planted["stopped_length"] == 80).all() and (planted["saved"] == 0).all()  # argmin needs every checkpoint
    for (model, ds), dice in truth.items():
        rows = result.decisions[(result.decisions["model"] == model) & (result.decisions["dataset"] == ds)]
        best = max(dice.values())
        by_rule = rows.set_index("rule")
        assert by_rule.loc["always longest", "regret"] == pytest.approx(best - dice[80], abs=1e-9)
        assert by_rule.loc["shortest non-zero", "chosen_length"] == 10
        assert by_rule.loc["shortest non-zero", "saved"] == pytest.approx(1 - 10 / 80)
        expected = np.mean([best - dice[n] for n in LENGTHS])
        assert by_rule.loc["uniform random length (expected)", "regret"] == pytest.approx(expected, abs=1e-9)
        assert by_rule.loc["uniform random length (expected)", "saved"] == pytest.approx(
            np.mean([1 - n / 80 for n in LENGTHS]))
        # ImageNet accuracy gains 6% (< 10%) from 20 to 40: stop at 40 and fine-tune it.
        assert by_rule.loc["ImageNet accuracy gain < 10%", ["chosen_length", "stopped_length"]].tolist() == [40, 40]
        assert by_rule.loc[f"{PLANTED} | argmin", "chosen_length"] == max(dice, key=dice.get)
    # Out of sample: chosen on the other dataset, applied to the held-out one; covers every group.
    lodo = _rule(result, "best variant | argmin [leave-one-dataset-out]")
    assert len(lodo) == n_groups and set(lodo["detail"]) == {PLANTED}
    assert sorted(result.lodo["held_out"].unique()) == ["acdc", "covidqu"]
    # decisions.csv: the agreed columns first, exactly one recommended rule, and it is an honest one.
    written = pd.read_csv(tmp_path / "an" / "decisions.csv")
    assert list(written.columns[:len(DECISION_COLUMNS)]) == DECISION_COLUMNS
    assert written.loc[written["recommended"], "rule"].nunique() == 1
    # Patience 1 finds each single peak too, and stops right after it: as good, and cheaper than argmin.
    patience = _rule(result, "best variant | patience=1 [leave-one-dataset-out]")
    assert np.allclose(patience["regret"], 0.0) and 0 < patience["saved"].mean() < 0.5
    # Recommended: the online rule with the lowest out-of-sample regret among those saving >= 50%
    # (here only the ImageNet rule, stopping at 40 of 80, saves that much); its parameters are saved.
    summary = result.summary.set_index("rule")
    assert result.recommended == "ImageNet accuracy gain < 10%"
    assert summary.loc[result.recommended, "saved_mean"] >= 0.5 and summary.loc[result.recommended, "online"]
    saving = summary[summary["online"] & (summary["saved_mean"] >= 0.5) & ~summary["bound"]
                     & (summary["evaluation"] != "in-sample")]
    assert summary.loc[result.recommended, "regret_mean"] == saving["regret_mean"].min()
    saved_rule = json.loads((tmp_path / "an" / "recommended_rule.json").read_text())
    assert saved_rule["stop_rule"] == {"kind": "ImageNet plateau", "min_gain": 0.1}
    assert saved_rule["goal_met"] == bool(summary.loc[result.recommended, "regret_mean"]
                                          <= summary.loc["always longest", "regret_mean"])
    for name in ("analysis_summary.csv", "correlations.csv", "claims.csv", "data_quality.csv", "lodo.csv",
                 "figures/regret_vs_saved.png", "figures/score_vs_dice.png"):
        assert (tmp_path / "an" / name).stat().st_size > 0
    corr = result.correlations.set_index(["model", "dataset", "predictor"])
    assert np.allclose(corr.xs(PLANTED, level="predictor")[["pearson", "spearman", "kendall", "weighted_tau"]], 1.0)


def test_copied_block_is_flagged_and_left_out_unless_kept():
    down, rob, truth = _planted_tables()
    # The published defect: every variant's score at length 0 pasted from length 80, for one dataset.
    acdc = rob["dataset"] == "ACDC"
    at_80 = rob[acdc & (rob["pretraining_length"] == 80)].set_index(
        ["metric", "margin", "encoder", "pooled", "level"])["robustness"]
    zero = acdc & (rob["pretraining_length"] == 0)
    keys = pd.MultiIndex.from_frame(rob.loc[zero, ["metric", "margin", "encoder", "pooled", "level"]])
    rob.loc[zero, "robustness"] = at_80.reindex(keys).to_numpy()
    result = analyze(down, rob, figures=False, n_resamples=50)
    copies = _checks(result, "copied block")
    assert len(copies) == len(MODELS)  # one block per encoder of ACDC, and only the length-0 copy
    assert all(f.where.endswith("| length 0") and "length 80" in f.detail and f.action == "left out" for f in copies)
    acdc_groups = [g for g in result.groups if g.dataset == "ACDC"]
    assert all(g.lengths.tolist() == [10, 20, 40, 80] for g in acdc_groups)
    assert all(g.lengths.tolist() == LENGTHS for g in result.groups if g.dataset != "ACDC")
    kept = analyze(down, rob, keep_copies=True, figures=False, n_resamples=50)
    assert [f.action for f in _checks(kept, "copied block")] == ["flagged, kept"] * len(MODELS)
    assert all(0 in g.lengths for g in kept.groups)


def test_duplicate_rows_are_counted_once():
    down, rob, truth = _planted_tables()
    doubled = pd.concat([down, down.iloc[[5]]], ignore_index=True)  # an exact copy of one run
    result = analyze(doubled, pd.concat([rob, rob.iloc[[3]]]), figures=False, n_resamples=50)
    duplicates = _checks(result, "duplicate rows")
    assert [f.where for f in duplicates] == ["1 row(s)", "1 row(s)"]  # one in each table
    reference = analyze(down, rob, figures=False, n_resamples=50)
    assert np.allclose(result.decisions["regret"], reference.decisions["regret"])


def test_constant_variant_is_reported_and_never_selected():
    down, rob, truth = _planted_tables()
    # A variant constant over every length: argmin ties and takes the shortest, which we make the best Dice.
    down.loc[down["pretraining length"] == 0, "dice index"] = 0.95
    constant = (rob["metric"] == "l2") & (rob["margin"] == 0.0) & (rob["level"] == 0) & rob["pooled"]
    rob.loc[constant, "robustness"] = 0.25
    rob.loc[(rob["metric"] == "cosine") & (rob["margin"] == 0.5) & (rob["level"] == 1) & rob["pooled"]
            & (rob["pretraining_length"] == 0), "robustness"] = 0.0  # the planted variant agrees again
    result = analyze(down, rob, figures=False, n_resamples=50)
    name = "l2 margin=0 level=0 pooled"
    assert len(_checks(result, "constant variant")) == len(MODELS) * len(DATASETS)
    tied = _rule(result, f"{name} | argmin")
    assert (tied["detail"] == "tied").all() and np.allclose(tied["regret"], 0.0)  # lucky, but a tie
    summary = result.summary.set_index("rule")
    assert summary.loc[f"{name} | argmin", "tied_argmin"] == len(tied)
    assert result.best_variant not in (None, name)  # as good in-sample, but a constant variant is not eligible
    assert np.allclose(_rule(result, "best variant | argmin [in-sample]")["regret"], 0.0)


def test_uneven_coverage_is_named_and_selection_uses_the_common_groups():
    down, rob, truth = _planted_tables(levels=(0, 1, 2))
    # Level 2 exists only for two encoders (as level 5 in the published tables); there it is perfect.
    rob = rob[(rob["level"] < 2) | (rob["encoder"] != "swin_transformer")]
    perfect = rob["level"] == 2
    rob.loc[perfect, "robustness"] = rob.loc[perfect].apply(
        lambda r: 1.0 - truth[({v: k for k, v in MODELS.items()}[r["encoder"]],
                                {v: k for k, v in DATASETS.items()}[r["dataset"]])][r["pretraining_length"]], axis=1)
    rob.loc[(rob["metric"] == "cosine") & (rob["margin"] == 0.5) & (rob["level"] == 1) & rob["pooled"]
            & (rob["encoder"] == "resnet50") & (rob["pretraining_length"] == 10), "robustness"] = -1.0  # imperfect
    result = analyze(down, rob, figures=False, n_resamples=50)
    summary = result.summary.set_index("rule")
    level2 = "cosine margin=0.5 level=2 pooled | argmin"
    assert summary.loc[level2, "coverage"] == "4 of 6 groups (no Swin U-Net)"
    assert summary.loc[level2, "regret_mean"] == 0.0
    assert summary.loc["always longest", "coverage"] == "all 6 groups"
    # The best variant is chosen among those scored on every group, and covers every group in and out of sample.
    assert result.best_variant == PLANTED
    assert len(_rule(result, "best variant | argmin [leave-one-dataset-out]")) == 6


def _curves(dice, scores=None, accuracy=None, seeds=None, lengths=(0, 10, 20, 40, 80), dataset="d"):
    lengths = np.array(lengths, dtype=float)
    dice = np.array(dice, dtype=float)
    by_seed = np.column_stack([dice + o for o in (seeds if seeds is not None else (-0.001, 0.0, 0.001))])
    return GroupCurves("m", dataset, "s", False, "m", dataset, "s", lengths, dice, by_seed,
                       imagenet_accuracy=np.array(accuracy if accuracy is not None else [np.nan] * len(lengths)),
                       scores={k: np.array(v, dtype=float) for k, v in (scores or {}).items()})


def test_patience_rule_counts_saved_where_pretraining_stopped():
    # Score falls to 20, rises at 40: the rule fine-tunes 20 but pretraining ran to 40 to see the rise.
    g = _curves([0.5, 0.7, 0.8, 0.79, 0.78], scores={"v": [0.9, 0.5, 0.4, 0.45, 0.3]})
    decisions = evaluate_rules([g], [Rule("first rise", score_rule("v", "patience", 1))])
    row = decisions.iloc[0]
    assert (row["chosen_length"], row["stopped_length"]) == (20, 40)
    assert row["saved"] == pytest.approx(1 - 40 / 80) and row["regret"] == pytest.approx(0.0)
    assert row["dice_vs_longest"] == pytest.approx(0.02) and row["vs_longest"] == "win"


def test_ties_are_within_the_group_seed_noise():
    g = _curves([0.5, 0.7, 0.8, 0.7995, 0.799], seeds=(-0.001, 0.0, 0.001))  # s.d. 0.001 at every length
    assert g.seed_noise == pytest.approx(0.001)
    fixed = [Rule(f"at {n}", lambda c, t, n=n: (n, n)) for n in (20, 40, 10)]
    outcome = evaluate_rules([g], fixed).set_index("rule")["vs_longest"]
    assert outcome.to_dict() == {"at 20": "tie", "at 40": "tie", "at 10": "loss"}
    one_seed = _curves([0.5, 0.7, 0.8, 0.7995, 0.799], seeds=(0.0,))
    assert evaluate_rules([one_seed], fixed[:1])["vs_longest"].iloc[0] == "n/a (one seed)"


def test_imagenet_gain_rule_stops_at_the_first_small_relative_gain():
    g = _curves([0.5, 0.7, 0.8, 0.79, 0.78], accuracy=[0.001, 0.2, 0.3, 0.32, 0.5])
    assert imagenet_gain_below(0.10)(g, []) == Decision(40, 40)  # 0.30 -> 0.32 is +6.7%
    assert imagenet_gain_below(0.05)(g, []) == Decision(80, 80)  # never below 5%: the longest


def test_oracle_saving_matches_brute_force():
    rng = np.random.default_rng(3)
    groups = [_curves(rng.uniform(0.6, 0.9, 5), dataset=str(i)) for i in range(4)]
    decide = oracle_saving(0.5)
    chosen = [decide(g, groups).chosen_length for g in groups]
    saved = np.mean([1 - c / 80 for c in chosen])
    regret = np.mean([g.dice.max() - g.dice_at(c) for g, c in zip(groups, chosen)])
    best = min(
        np.mean([g.dice.max() - g.dice_at(c) for g, c in zip(groups, combo)])
        for combo in itertools.product(*(g.lengths for g in groups))
        if np.mean([1 - c / 80 for c in combo]) >= 0.5 - 1e-12)
    assert saved >= 0.5 - 1e-9 and regret == pytest.approx(best, abs=1e-12)


def test_vectorised_correlations_equal_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(20, 7)).astype(float)  # ties on purpose
    x[:, 0] += 10  # no constant rows
    y = np.array([0.3, 0.5, 0.5, 0.6, 0.2, 0.9, 0.1])
    assert np.allclose(_row_kendall_b(x, y), [stats.kendalltau(row, y).statistic for row in x])
    assert np.allclose(_row_pearson(x, y), [stats.pearsonr(row, y).statistic for row in x])


def test_imagenet_accuracy_is_a_predictor_and_a_checked_claim():
    down, rob, _ = _planted_tables()
    result = analyze(down, rob, figures=False, n_resamples=50)
    imagenet = result.correlations[result.correlations["predictor"] == IMAGENET_PREDICTOR]
    assert len(imagenet) == len(MODELS) * len(DATASETS) and imagenet["spearman"].notna().all()
    claims = result.claims.set_index("claim")
    assert {v.split(":")[0] for v in claims["verdict"]} <= {
        "supported", "not supported", "contradicted", "mixed", "significantly worse than always longest",
        "not significantly worse", "not supported (the held-out gain's interval holds 0)"}
    # ImageNet accuracy rises with length alike in every run (one scheme), so between runs at equal length it
    # cannot rank runs: there is no between-run cell with varying accuracy
    assert "ImageNet accuracy is a poor indicator of downstream Dice" not in claims.index
    # Every group of the planted tables peaks before 80 except the one with its peak at 80; seed offsets are
    # constant over lengths, so held out the shorter length replicates with its planted gain.
    shorter = claims.loc["shorter pretraining is often better downstream"]
    assert "a shorter length is chosen in 5 of 6 groups and replicates (positive held-out gain) in 5" in shorter["figure"]
    gains = [0.001 * (80 - LENGTHS[1 + (i % 4)]) for i in range(6)]
    assert result.evidence.replication["gain"].mean() == pytest.approx(np.mean(gains))
    assert shorter["verdict"].startswith("supported")


def test_extra_rules_plug_into_the_harness_and_can_be_recommended():
    down, rob, _ = _planted_tables()
    calls = set()

    def fitted(curves, training):
        calls.add((curves.dataset, frozenset(g.dataset for g in training)))
        return Decision(curves.lengths[1], curves.lengths[1], "second length")

    rule = Rule("second length", fitted, "extra", fitted=True)
    result = analyze(down, rob, extra_rules=[rule], recommended="second length [leave-one-dataset-out]",
                     figures=False, n_resamples=50)
    both = frozenset(DATASETS)
    assert calls == {("ACDC", both), ("COVIDQUDataset", both),  # in-sample: trained on every group
                     ("ACDC", frozenset({"COVIDQUDataset"})), ("COVIDQUDataset", frozenset({"ACDC"}))}
    lodo = _rule(result, "second length [leave-one-dataset-out]")
    assert len(lodo) == 6 and lodo["recommended"].all()
    assert result.decisions.loc[result.decisions["recommended"], "rule"].nunique() == 1


def test_leave_one_out_needs_two_datasets():
    down, rob, _ = _planted_tables()
    result = analyze(down[down["dataset"] == "ACDC"], rob[rob["dataset"] == "ACDC"], figures=False, n_resamples=50)
    assert result.lodo.empty and result.best_variant == PLANTED
    assert not result.decisions["evaluation"].eq("leave-one-dataset-out").any()


def test_analyze_says_when_nothing_joins():
    down, rob, _ = _planted_tables()
    with pytest.raises(DataError, match="name mapping"):
        analyze(down, rob.assign(dataset="elsewhere"), figures=False)


def test_mean_dice_where_dice_is_empty_and_a_yaml_name_mapping(tmp_path):
    down, rob, _ = _planted_tables(seed=1)
    down.loc[down["dataset"] == "ACDC", "mean dice index"] = down["dice index"]
    down.loc[down["dataset"] == "ACDC", "dice index"] = np.nan  # multi-class: only the mean is filled
    down["model"] = down["model"].replace({"basic U-Net": "My Plain Net"})  # unknown without the mapping
    down = pd.concat([down, down.assign(**{"test set": "source", "dice index": 0.0})], ignore_index=True)
    down.loc[: len(down) // 2 - 1, "test set"] = "target"
    (tmp_path / "names.yaml").write_text("encoder: {My Plain Net: unet}\n")
    without = analyze(down, rob, figures=False, n_resamples=50)
    assert "My Plain Net" not in {g.model for g in without.groups}
    assert any(f.check == "group without scores" for f in without.quality)  # not dropped silently
    result = analyze(down, rob, names=tmp_path / "names.yaml", figures=False, n_resamples=50)
    assert "My Plain Net" in {g.model for g in result.groups}
    assert result.best_variant == PLANTED  # source-test rows (Dice 0) were left out


def test_baseline_estimators_are_oriented_higher_is_better():
    down, rob, truth = _planted_tables()
    inverse = {v: k for k, v in DATASETS.items()}
    models = {v: k for k, v in MODELS.items()}
    base = pd.DataFrame([
        {"dataset": ds, "metric": "logme", "encoder": enc, "pretraining_scheme": "advanced", "level": 0,
         "pretraining_length": n, "score": truth[(models[enc], inverse[ds])][n], "higher_is_better": True}
        for enc in MODELS.values() for ds in DATASETS.values() for n in LENGTHS])
    result = analyze(down, rob, baselines=base, figures=False, n_resamples=50)
    rows = _rule(result, "logme level=0 | argmin")
    assert len(rows) == len(MODELS) * len(DATASETS) and np.allclose(rows["regret"], 0.0)
    corr = result.correlations[result.correlations["predictor"] == "logme level=0"]
    assert np.allclose(corr["spearman"], 1.0)
    assert result.best_variant == PLANTED  # the selection is among robustness variants


def test_cli_analyze_writes_decisions_and_exits_2_on_a_missing_column(tmp_path, capsys):
    down, rob, _ = _planted_tables()
    down.to_csv(tmp_path / "results.csv", index=False)
    rob.to_csv(tmp_path / "robustness.csv", index=False)
    assert main(["analyze", "--downstream", str(tmp_path / "results.csv"), "--robustness",
                 str(tmp_path / "robustness.csv"), "--out", str(tmp_path / "an")]) == 0
    out = capsys.readouterr().out
    assert "recommended rule:" in out and "[leave-one-dataset-out]" in out  # printed as text, not markup
    assert (tmp_path / "an" / "decisions.csv").is_file()
    rob.drop(columns="margin").to_csv(tmp_path / "bad.csv", index=False)
    assert main(["analyze", "--downstream", str(tmp_path / "results.csv"), "--robustness", str(tmp_path / "bad.csv"),
                 "--out", str(tmp_path / "bad_out")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "margin" in err and not (tmp_path / "bad_out").exists()


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
    result = analyze(down, rob, baselines=pd.DataFrame(rows), figures=False, n_resamples=50)
    for metric in ("knn_accuracy", "cc_fv"):
        chosen = _rule(result, f"{metric} level=1 | argmin")
        assert len(chosen) == len(MODELS) * len(DATASETS) and np.allclose(chosen["regret"], 0.0)
    against = _rule(result, "gbc level=1 | argmin")
    assert len(against) == len(MODELS) * len(DATASETS) and (against["regret"] > 0).all()


def _stop_rule_groups(dice_of=None, seed=0):
    """Three datasets x four groups: Dice rising and flattening at a group-specific length, two robustness
    variants that flatten with it (with noise), ImageNet accuracy rising. ``dice_of(dataset, i, dice)`` may
    change a group's Dice."""
    rng = np.random.default_rng(seed)
    lengths = np.array([1, 5, 20, 50, 100, 150, 200, 300], dtype=float)
    accuracy = np.array([0.01, 0.1, 0.3, 0.5, 0.58, 0.62, 0.66, 0.7])
    groups = []
    for dataset in ("a", "b", "c"):
        for i in range(4):
            knee = 2 + (i + ord(dataset)) % 5
            progress = np.minimum(np.arange(len(lengths)), knee) / knee
            dice = 0.6 + 0.2 * progress + rng.normal(0, 0.002, len(lengths))
            if dice_of is not None:
                dice = dice_of(dataset, i, dice)
            scores = {f"cosine_distance margin=0.5 level={lv} pooled": 0.5 - 0.2 * progress * lv / 5
                      + rng.normal(0, 0.003, len(lengths)) for lv in (4, 5)}
            groups.append(GroupCurves(f"model{i}", dataset, "s", False, f"model{i}", dataset, "s", lengths, dice,
                                      np.column_stack([dice - 0.001, dice + 0.001]), imagenet_accuracy=accuracy,
                                      scores=scores))
    return groups


def test_nested_evaluation_never_sees_the_held_out_datasets_dice():
    from medxfer.report.rules import LODO, stop_rule_families

    learned = [r for r in stop_rule_families() if r.fitted]
    assert {r.family for r in learned} == {"online stop rule (learned)", "online stop rule (selected)"}
    before = evaluate_rules(_stop_rule_groups(), learned)
    # The held-out dataset's Dice turned upside down: everything learned from it would change.
    after = evaluate_rules(_stop_rule_groups(lambda ds, i, d: 1.6 - d if ds == "c" else d), learned)
    columns = ["rule", "model", "dataset", "chosen_length", "stopped_length"]
    held_out = lambda frame: frame[(frame["evaluation"] == LODO) & (frame["dataset"] == "c")][columns]  # noqa: E731
    assert len(held_out(before)) == 4 * len(learned)
    pd.testing.assert_frame_equal(held_out(before).reset_index(drop=True), held_out(after).reset_index(drop=True))
    # ... while the decisions that may learn from it (in-sample, or other datasets held out) do change.
    trained_on_c = lambda frame: frame[(frame["evaluation"] != LODO) | (frame["dataset"] != "c")][columns]  # noqa: E731
    assert not trained_on_c(before).reset_index(drop=True).equals(trained_on_c(after).reset_index(drop=True))


def test_online_stop_rules_are_evaluated_and_an_online_rule_is_recommended_with_its_parameters(tmp_path):
    from medxfer.report.rules import stop_rule_families
    from medxfer.transferability.stopping import rule_from_dict

    families = stop_rule_families()
    assert {"online stop rule", "online stop rule (learned)", "online stop rule (selected)"} == {
        r.family for r in families}
    down, rob, _ = _planted_tables()
    result = analyze(down, rob, out_dir=tmp_path, figures=True, n_resamples=50)
    summary = result.summary.set_index("rule")
    for rule in families:
        names = [rule.name] if not rule.fitted else [f"{rule.name} [in-sample]", f"{rule.name} [leave-one-dataset-out]"]
        for name in names:
            assert summary.loc[name, "n_groups"] == 6 and summary.loc[name, "online"]
    saved = json.loads((tmp_path / "recommended_rule.json").read_text())
    assert saved["rule"] == result.recommended
    # the saved rule reproduces the recommended rule's decisions on every group
    rule = rule_from_dict(saved["stop_rule"])
    decisions = result.decisions[result.decisions["rule"] == result.recommended]
    for g in result.groups:
        row = decisions[(decisions["model"] == g.model) & (decisions["dataset"] == g.dataset)].iloc[0]
        assert rule.decide(g.stop_curve) == (row["chosen_length"], row["stopped_length"])
    assert (tmp_path / "figures" / "regret_vs_saved.png").stat().st_size > 0


def test_pareto_front_keeps_only_undominated_rules():
    from medxfer.report.plots import pareto_front

    saved = np.array([0.0, 0.2, 0.5, 0.5, 0.9, 0.3])
    regret = np.array([0.004, 0.005, 0.007, 0.009, 0.04, 0.006])
    # 0.5/0.009 is beaten by 0.5/0.007; 0.3/0.006 by nothing (saves more than 0.2 but with more regret)
    assert pareto_front(saved, regret).tolist() == [0, 1, 5, 2, 4]


def test_a_learned_stop_rule_with_too_little_to_learn_from_decides_nothing():
    from medxfer.report.rules import online_rule
    from medxfer.transferability.stopping import LearnedGain

    groups = [_curves([0.5, 0.6], lengths=(10, 20), dataset=d, accuracy=[0.2, 0.3]) for d in ("a", "b")]
    rule = Rule("learned gain", online_rule(LearnedGain()), "online stop rule (learned)", fitted=True)
    assert evaluate_rules(groups, [rule]).empty  # two training rows: not fitted, no decision, no crash


# ----------------------------------------------------------------------------- the evidence behind the claims
def _group(dice_by_seed, lengths=(10, 20, 40, 80), model="m", dataset="d", scheme="s", frozen=False, accuracy=None):
    dice_by_seed = np.asarray(dice_by_seed, dtype=float)
    lengths = np.asarray(lengths, dtype=float)
    return GroupCurves(model, dataset, scheme, frozen, model, dataset, scheme, lengths, dice_by_seed.mean(axis=1),
                       dice_by_seed, tuple(range(dice_by_seed.shape[1])),
                       np.asarray(accuracy if accuracy is not None else lengths / 100, dtype=float), {})


def test_held_out_replication_and_the_flat_curve_null():
    from medxfer.report.analyze.evidence import flat_curve_null, held_out_replication

    # a true peak at 20 (+0.01 over the longest) with constant seed offsets: every fold chooses 20 and gains 0.01
    true_peak = _group(np.array([[0.80, 0.81, 0.805, 0.80]]).T + np.array([[-0.001, 0.0, 0.001]]))
    # seed 0 alone is high at 10: chosen when seed 0 selects, it does not hold on the other seeds; without seed 0
    # every length ties and the longest stays (a shorter length must be strictly better)
    lucky = _group(np.array([[0.9, 0.8, 0.8], [0.8, 0.8, 0.8], [0.8, 0.8, 0.8], [0.8, 0.8, 0.8]]))
    table = held_out_replication([true_peak, lucky]).set_index("model", append=True)
    first, second = table.iloc[0], table.iloc[1]
    assert first["chosen_lengths"] == "20 20 20" and first["gain"] == pytest.approx(0.01) and first["replicates"]
    assert second["chosen_lengths"] == "80 10 10"
    assert second["gain"] == pytest.approx(0.0) and not second["replicates"]
    # pure noise over 5 lengths: the best mean sits before the longest in 4 of 5 groups, and held out there is
    # nothing to gain
    rng = np.random.default_rng(3)
    noise = [_group(0.8 + 0.01 * rng.normal(size=(5, 3)), lengths=(1, 5, 20, 50, 100)) for _ in range(40)]
    null = flat_curve_null(noise, n_simulations=100)
    assert null["peak_before_longest"] == pytest.approx(0.8 * 40, abs=2.5)
    assert abs(null["mean_gain"]) < 0.002 and null["replicating"] < null["peak_before_longest"]


def test_between_runs_ranks_runs_of_equal_length():
    from medxfer.report.analyze.evidence import between_runs

    runs = []
    for i, (model, scheme) in enumerate(itertools.product(("a", "b"), ("simple", "advanced"))):
        accuracy = np.array([0.1, 0.2, 0.3, 0.4]) + 0.05 * i
        dice = 0.7 + 0.01 * i + np.zeros((4, 1))  # run i is better at every length, and has higher accuracy
        runs.append(_group(dice, model=model, scheme=scheme, accuracy=accuracy))
    table = between_runs(runs)
    assert len(table) == 4 and (table["n_runs"] == 4).all()
    assert np.allclose(table["spearman_accuracy"], 1.0)
    assert table["spearman_score"].isna().all()  # no score scored: NaN, not a made-up value


def test_no_pretraining_against_the_best_pretrained_length():
    from medxfer.report.analyze.evidence import no_pretraining

    group = _group(np.array([[0.80, 0.81, 0.805, 0.80]]).T + np.array([[-0.001, 0.0, 0.001]]))
    rows = [{"model": "m", "dataset": "d", "pretraining_scheme": "s", "frozen": False, "length": 0.0, "dice": d}
            for d in (0.83, 0.83, 0.83)]
    table = no_pretraining(pd.DataFrame(rows), [group])
    assert len(table) == 1 and table["best_pretrained_length"].iloc[0] == 20
    assert table["dice_at_0_minus_best"].iloc[0] == pytest.approx(0.02) and table["outcome"].iloc[0] == "no pretraining better"
    assert no_pretraining(pd.DataFrame(rows).assign(dice=0.8105), [group])["outcome"].iloc[0] == \
        "no pretraining highest, within seed noise"


def test_paired_and_cluster_intervals_and_matched_saving_baselines():
    from medxfer.report.analyze.statistics import cluster_bootstrap_interval
    from medxfer.report.rules import carried_over_length, fixed_length, imagenet_gain_below_twice

    # two clusters of identical members: resampling clusters can only give a, (a + b) / 2 or b
    low, high = cluster_bootstrap_interval([1.0, 1.0, 1.0, 3.0, 3.0, 3.0], list("aaabbb"), n_resamples=400)
    assert low == pytest.approx(1.0) and high == pytest.approx(3.0)
    assert np.isnan(cluster_bootstrap_interval([1.0, 2.0], ["a", "a"])[0])
    g = _group(np.array([[0.80, 0.81, 0.805, 0.80]]).T + np.zeros((1, 3)), accuracy=[0.10, 0.105, 0.109, 0.3])
    assert fixed_length(20)(g)[:2] == (20.0, 20.0) and fixed_length(30)(g) is None
    assert imagenet_gain_below_twice(0.10)(g)[:2] == (40.0, 40.0)  # +5%, then +3.8%: the second slow gain stops
    other = _group(np.array([[0.70, 0.72, 0.71, 0.69]]).T + np.zeros((1, 3)), dataset="e")
    assert carried_over_length(g, [other])[:2] == (20.0, 20.0)
    down, rob, _ = _planted_tables()
    result = analyze(down, rob, figures=False, n_resamples=50,  # the built-in always 150 / 200: no such lengths here
                     extra_rules=[Rule("always 20", fixed_length(20), "baseline (matched saving)")])
    summary = result.summary.set_index("rule")
    assert "always 150" not in summary.index
    for rule in ("ImageNet accuracy gain < 10%", "always 20"):
        chosen = _rule(result, rule)
        longest = _rule(result, "always longest").set_index(["model", "dataset"])["regret"]
        expected = (chosen.set_index(["model", "dataset"])["regret"] - longest).mean()
        assert summary.loc[rule, "regret_vs_longest_mean"] == pytest.approx(expected)
        assert summary.loc[rule, "regret_vs_longest_cluster_ci_low"] <= expected <= \
            summary.loc[rule, "regret_vs_longest_cluster_ci_high"]
    assert summary.loc["ImageNet accuracy gain < 10%", "uses_imagenet"] and not summary.loc["always 20", "uses_imagenet"]
    assert summary.loc["learned gain [leave-one-dataset-out]", "uses_imagenet"]  # it reads accuracy as a feature
    breakdown = result.evidence.breakdown
    per_dataset = breakdown[(breakdown["rule"] == "always 20") & (breakdown["by"] == "dataset")]
    assert set(per_dataset["value"]) == set(DATASETS) and (per_dataset["n_groups"] == 3).all()


def test_best_of_n_against_its_permutation_null():
    from medxfer.report.analyze.evidence import best_of_n_null

    rng = np.random.default_rng(5)
    groups = []
    for i in range(12):
        dice = 0.8 - 0.002 * np.abs(np.arange(6) - rng.integers(0, 6))
        g = _group(np.repeat(dice[:, None], 2, axis=1), lengths=(1, 2, 4, 8, 16, 32), dataset=f"d{i}")
        g.scores = {"planted": -dice, **{f"random {k}": rng.random(6) for k in range(5)}}
        groups.append(g)
    planted = best_of_n_null(groups, ["planted", *[f"random {k}" for k in range(5)]], n_permutations=200)
    assert planted["n_variants"] == 6 and planted["observed"] == 0.0 and planted["p_value"] < 0.05
    chance = best_of_n_null(groups, [f"random {k}" for k in range(5)], n_permutations=200)
    assert chance["p_value"] > 0.05 and chance["observed"] > chance["null_p5"]


def test_claims_on_one_seed_say_so_instead_of_a_verdict():
    down, rob, _ = _planted_tables()
    result = analyze(down[down["seed"] == 0], rob, figures=False, n_resamples=50)
    claims = result.claims.set_index("claim")
    assert claims.loc["shorter pretraining is often better downstream", "verdict"] == "undecided (one seed)"
    assert result.evidence.replication.empty and np.isnan(result.evidence.null["mean_gain"])


def test_correlation_table_lays_groups_out_by_dataset_and_notes_say_best_of_n(tmp_path):
    from medxfer.report.analyze import summary_for_print

    down, rob, _ = _planted_tables()
    result = analyze(down, rob, out_dir=tmp_path, figures=True, n_resamples=50)
    table = pd.read_csv(tmp_path / "correlation_table.csv")
    assert set(table["predictor"]) == {IMAGENET_PREDICTOR, PLANTED}
    assert {"ACDC", "COVIDQUDataset", "mean"} <= set(table.columns) and len(table) == 2 * len(MODELS)
    assert set(table["lengths"]) == {"0 10 20 40 80"}  # the lengths every group has
    assert list(table.groupby("predictor")["score_negated"].first().items()) == [(IMAGENET_PREDICTOR, False),
                                                                                (PLANTED, True)]
    planted = table[table["predictor"] == PLANTED]
    assert np.allclose(planted[["ACDC", "COVIDQUDataset"]], 1.0)  # 1 - Dice ranks the lengths exactly
    for name in ("replication", "between_runs", "no_pretraining", "breakdown"):
        assert (tmp_path / f"{name}.csv").is_file()
    assert (tmp_path / "figures" / "dice_vs_length.png").stat().st_size > 0
    zero = pd.read_csv(tmp_path / "no_pretraining.csv")  # the figure's length-0 marker and its seed range
    assert (zero["dice_at_0_low"] <= zero["dice_at_0"]).all() and (zero["dice_at_0"] <= zero["dice_at_0_high"]).all()
    assert np.allclose(zero["dice_at_0_high"] - zero["dice_at_0_low"], SEED_OFFSETS[-1] - SEED_OFFSETS[0])
    notes = summary_for_print(result).set_index("rule")["note"]
    assert notes["best variant | argmin [in-sample]"] == "chosen in-sample (best of 16 variants)"
    assert notes["best variant | argmin [leave-one-dataset-out]"] == "chosen on the other datasets (best of 16 variants)"


def test_imagenet_claim_is_judged_between_runs_at_all_lengths_and_at_50_and_above():
    from medxfer.report.analyze.claims import paper_claims
    from medxfer.report.analyze.evidence import Evidence

    def verdict(short, long):
        cells = pd.DataFrame({"length": [5.0] * 6 + [100.0] * 6, "spearman_accuracy": short + long,
                              "spearman_score": [0.0] * 12, "score_variant": "v", "dataset_key": "d",
                              "freeze_encoder": False, "n_runs": 4})
        evidence = Evidence(np.array([5.0, 100.0]), pd.DataFrame(), {}, cells, pd.DataFrame(), {}, pd.DataFrame())
        claims = paper_claims(pd.DataFrame(columns=["rule", "bound", "evaluation", "family", "n_groups"]),
                              pd.DataFrame(columns=["rule"]), pd.DataFrame(), 0, evidence)
        return claims.set_index("claim").loc["ImageNet accuracy is a poor indicator of downstream Dice", "verdict"]

    noise = [-0.4, 0.4, -0.2, 0.2, 0.0, 0.1]
    assert verdict(noise, noise).startswith("supported")
    assert verdict([0.9, 0.8, 0.9, 1.0, 0.8, 0.9], [0.9, 0.8, 0.9, 1.0, 0.8, 0.9]).startswith("not supported")
    assert verdict([-0.9, -0.8, -0.7, -0.9, -0.8, -0.9], [0.5, 0.6, 0.4, 0.5, 0.6, 0.5]).startswith("mixed")
