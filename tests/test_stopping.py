"""Stop rules (offline) and the online early stop of a tiny pretraining run."""

import math

import pandas as pd
import pytest

from medxfer.config import DataConfig, PretrainConfig, ScoreConfig, StopConfig, parse_config
from medxfer.errors import ConfigError, DataError
from medxfer.transferability.scoring import RobustnessEarlyStopping
from medxfer.transferability.stopping import recommend_checkpoint, recommend_from_table


def test_argmin_picks_the_lowest_score_and_the_shorter_length_on_ties():
    scores = {0: 0.9, 5: 0.4, 10: 0.3, 20: 0.3, 40: 0.5}
    rec = recommend_checkpoint(scores, "argmin")
    assert rec.length == 10 and rec.score == 0.3 and rec.fired
    assert recommend_checkpoint({0: 0.1, 1: 0.5}, "argmin", higher_is_better=True).length == 1


def test_patience_stops_at_the_first_checkpoint_not_improved_upon_for_k_checkpoints():
    # best 0.4 at length 2, then two non-improvements (3, 4): stops at 4, recommends 2 although 6 is lower
    scores = [(0, 1.0), (1, 0.5), (2, 0.4), (3, 0.45), (4, 0.41), (5, 0.42), (6, 0.1)]
    rec = recommend_checkpoint(scores, "patience", patience=2)
    assert (rec.length, rec.stopped_at, rec.fired) == (2, 4, True)
    assert recommend_checkpoint(scores, "patience", patience=3).stopped_at == 5
    assert recommend_checkpoint(scores, "patience", patience=4).length == 6  # 6 improves before the 4th wait
    assert recommend_checkpoint(scores, "argmin").length == 6


def test_patience_that_never_fires_recommends_the_best_checkpoint():
    rec = recommend_checkpoint({0: 3.0, 1: 2.0, 2: 2.5, 3: 1.0}, "patience", patience=2)
    assert (rec.length, rec.fired, rec.stopped_at) == (3, False, 3)


def test_min_delta_and_nan_scores():
    # 0.39 is not an improvement on 0.4 by more than 0.05
    assert recommend_checkpoint({0: 0.4, 1: 0.39, 2: 0.38}, "patience", 2, min_delta=0.05).length == 0
    assert recommend_checkpoint({0: math.nan, 1: 0.5, 2: 0.7}, "argmin").length == 1
    with pytest.raises(DataError):
        recommend_checkpoint({0: math.nan}, "argmin")
    with pytest.raises(ConfigError):
        recommend_checkpoint({0: 1.0}, "median")


def test_recommend_from_table_uses_the_named_variant():
    rows = []
    for length, (a, b) in enumerate([(0.9, 0.1), (0.2, 0.5), (0.5, 0.6)]):
        rows += [{"dataset": "d", "encoder": "unet", "pretraining_scheme": "simple", "metric": "cosine",
                  "margin": 0.5, "level": 1, "pooled": True, "pretraining_length": length, "robustness": a},
                 {"dataset": "d", "encoder": "unet", "pretraining_scheme": "simple", "metric": "l2",
                  "margin": 0.5, "level": 1, "pooled": True, "pretraining_length": length, "robustness": b}]
    table = pd.DataFrame(rows)
    assert recommend_from_table(table, StopConfig(rule="argmin", metric="cosine", margin=0.5, level=-1)).length == 1
    assert recommend_from_table(table, StopConfig(rule="argmin", metric="l2", margin=0.5, level=1)).length == 0
    with pytest.raises(ConfigError, match="not among"):
        recommend_from_table(table, StopConfig(rule="argmin", metric="pearson"))


def _pretrain_config(lengths):
    return parse_config({
        "task": "classification", "model": {"preset": "unet", "width": 4, "depth": 2},
        "classification": {"n_per_class": 4, "val_per_class": 1, "image_size": 16, "input_size": 16},
        "schedule": {"lengths": lengths}, "train": {"batch_size": 16, "accelerator": "cpu"}}, PretrainConfig)


def _score_config(**stop):
    return ScoreConfig(checkpoints=".", data=DataConfig(name="demo", options={"domain": "B"}), n_images=4,
                       crop_size=[32, 32], bootstrap=0, margins=[0.5], stop=StopConfig(rule="patience", **stop))


def test_online_callback_stops_pretraining_when_the_score_stops_improving(tmp_path):
    from medxfer.pretraining import run_pretraining

    # No change counts as an improvement (min_delta is huge): the rule fires after `patience` checkpoints.
    callback = RobustnessEarlyStopping.from_config(_score_config(patience=2, min_delta=10.0),
                                                   csv_path=tmp_path / "online.csv")
    result = run_pretraining(_pretrain_config([0, 1, 2, 3, 4, 5]), tmp_path / "run", callbacks=[callback])
    assert result.lengths == [0, 1, 2]
    assert result.record["status"] == "stopped" and result.record["stopped_at"] == 2
    assert callback.stopped_at == 2 and sorted(callback.history) == [0, 1, 2]
    assert result.record["epochs_trained"] < 5
    manifest = result.checkpoints[-1].manifest
    assert manifest["robustness"] == pytest.approx(callback.history[2])
    online = pd.read_csv(tmp_path / "online.csv")
    assert sorted(online["pretraining_length"].unique()) == [0, 1, 2]
    assert list(online.columns[:9]) == ["dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled",
                                        "level", "pretraining_length", "robustness"]


def test_online_callback_lets_pretraining_finish_while_the_rule_does_not_fire(tmp_path):
    from medxfer.pretraining import run_pretraining

    callback = RobustnessEarlyStopping.from_config(_score_config(patience=5))
    result = run_pretraining(_pretrain_config([0, 1, 2]), tmp_path / "run", callbacks=[callback])
    assert result.lengths == [0, 1, 2] and result.record["status"] == "done"
    assert callback.stopped_at is None and callback.recommendation.length in (0, 1, 2)


def test_stop_rules_import_neither_torch_nor_the_scoring_modules():
    # The rules are evaluated on tables by `medxfer analyze` and applied by `medxfer score`: one pure module,
    # with imports running one way (stopping <- robustness <- scoring), so no cycle can come back.
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import medxfer.transferability as package

    folder = Path(package.__file__).parent
    imported = {}
    for module in ("stopping", "robustness", "scoring"):
        tree = ast.parse((folder / f"{module}.py").read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        imported[module] = names
    assert not {n for n in imported["stopping"] if n.split(".")[0] in ("torch", "lightning")}
    assert not {n for n in imported["stopping"] if n.startswith("medxfer.transferability")}
    assert not {n for n in imported["robustness"] if n.startswith("medxfer.transferability")}
    code = "import sys, medxfer.transferability.stopping; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- online stop rules on small curves with known answers ---------------------------------------------------
import numpy as np  # noqa: E402

from medxfer.transferability.stopping import (  # noqa: E402
    Curve,
    ImageNetAndScore,
    ImageNetPlateau,
    LearnedGain,
    ScorePlateau,
    SelectedRule,
    VariantAgreement,
    regret_and_saved,
    rule_from_dict,
)

LENGTHS = [1, 5, 20, 50, 100, 150]
DEEP = ("cosine", 0.5, -1, True)


def _curve(values, **extra):
    return Curve(LENGTHS[:len(values)], {("cosine", 0.5, 4, True): values, ("cosine", 0.5, 3, True): [1.0] * len(values)},
                 **extra)


def test_score_plateau_stops_after_patience_checkpoints_within_the_tolerance():
    # changes: -0.5, -0.2, -0.001 (0.3%), -0.0005 -> the second small change completes patience 2 at length 100
    curve = _curve([1.0, 0.5, 0.3, 0.299, 0.2985, 0.1])
    assert ScorePlateau(DEEP, rel_tol=0.02, patience=2).decide(curve) == (100.0, 100.0)
    assert ScorePlateau(DEEP, rel_tol=0.02, patience=1).decide(curve) == (50.0, 50.0)
    # the deepest level is resolved per curve: level 3 is constant, level 4 is the deepest
    assert ScorePlateau(("cosine", 0.5, 3, True), patience=1).decide(curve) == (5.0, 5.0)


def test_score_plateau_does_not_stop_on_a_rise_and_runs_to_the_end():
    rising = _curve([0.2, 0.3, 0.45, 0.6, 0.8, 1.0])
    assert ScorePlateau(DEEP, rel_tol=0.02, patience=1).decide(rising) == (150.0, 150.0)


def test_score_plateau_ties_stop_as_soon_as_patience_allows():
    tied = _curve([0.4] * 6)
    assert ScorePlateau(DEEP, rel_tol=0.0, patience=2).decide(tied) == (20.0, 20.0)


def test_a_move_inside_the_bootstrap_interval_counts_as_a_plateau():
    values = [1.0, 0.8, 0.7, 0.6, 0.5, 0.4]  # 10-15 % per step: no plateau at 2 %
    assert ScorePlateau(DEEP, 0.02, 1).decide(_curve(values)) == (150.0, 150.0)
    halfwidth = {("cosine", 0.5, 4, True): [0.01, 0.01, 0.15, 0.15, 0.15, 0.15]}
    # the tolerance of a change is the earlier checkpoint's interval: 0.7 -> 0.6 is inside 0.7's (0.15)
    assert ScorePlateau(DEEP, 0.02, 1).decide(_curve(values, halfwidth=halfwidth)) == (50.0, 50.0)


def test_variant_agreement_needs_the_quorum_of_variants_at_the_level():
    flat, moving = [0.5, 0.5, 0.5, 0.5], [1.0, 0.6, 0.3, 0.1]
    scores = {("cosine", 0.5, 4, True): flat, ("l2", 0.5, 4, True): flat, ("pearson", 0.5, 4, True): flat,
              ("cosine", 0.5, 4, False): moving, ("cosine", 0.5, 2, True): moving}
    curve = Curve([1, 5, 20, 50], scores)
    assert VariantAgreement(level=-1, rel_tol=0.01, quorum=0.75).decide(curve) == (5.0, 5.0)
    assert VariantAgreement(level=-1, rel_tol=0.01, quorum=1.0).decide(curve) == (50.0, 50.0)


def test_imagenet_plateau_skips_the_random_checkpoint_and_stops_at_a_small_relative_gain():
    curve = Curve([0, 1, 5, 20, 50], {}, imagenet_accuracy=[0.001, 0.1, 0.3, 0.32, 0.5])
    assert ImageNetPlateau(0.10).decide(curve) == (20.0, 20.0)  # 0.3 -> 0.32 is +6.7 %
    assert ImageNetPlateau(0.05).decide(curve) == (50.0, 50.0)  # never below 5 %: the last
    unknown = Curve([1, 5, 20], {}, imagenet_accuracy=None)
    assert ImageNetPlateau(0.10).decide(unknown) == (20.0, 20.0)


def test_imagenet_and_score_needs_both_plateaus():
    accuracy = [0.1, 0.3, 0.32, 0.33, 0.34, 0.35]
    moving = Curve(LENGTHS, {("cosine", 0.5, 4, True): [1.0, 0.8, 0.6, 0.4, 0.39, 0.2]}, imagenet_accuracy=accuracy)
    assert ImageNetPlateau(0.10).decide(moving) == (20.0, 20.0)
    assert ImageNetAndScore(0.10, DEEP, 0.05).decide(moving) == (100.0, 100.0)


def _dice_that_rises_until(k, n=6):
    return np.array([0.5 + 0.1 * min(i, k) for i in range(n)])


def _curve_flat_after(k, n=6):
    return Curve(LENGTHS[:n], {("cosine", 0.5, 4, True): [1.0 - 0.15 * min(i, k) for i in range(n)]},
                 imagenet_accuracy=np.linspace(0.1, 0.7, n))


def test_learned_gain_learns_from_other_curves_that_dice_stops_rising_with_the_score():
    training = [(_curve_flat_after(k), _dice_that_rises_until(k)) for k in (1, 2, 3, 4, 1, 2, 3, 4)]
    fitted = LearnedGain(min_saved=0.3).fit(training)
    assert fitted.model is not None and fitted.threshold is not None
    regret, saved = regret_and_saved(fitted, training)
    assert regret == pytest.approx(0.0, abs=1e-9) and saved > 0.3
    chosen, stopped = fitted.decide(_curve_flat_after(3))
    assert chosen == stopped and chosen >= 50.0  # never before the Dice stopped rising (at length 50)
    # unfitted, it never stops; saved and reloaded, it decides alike
    assert LearnedGain().decide(_curve_flat_after(1)) == (150.0, 150.0)
    assert rule_from_dict(fitted.as_dict()).decide(_curve_flat_after(2)) == fitted.decide(_curve_flat_after(2))


def test_selected_rule_takes_the_lowest_regret_among_candidates_that_save_enough():
    training = [(_curve_flat_after(k), _dice_that_rises_until(k)) for k in (2, 3)]
    never = ScorePlateau(DEEP, rel_tol=0.0, patience=5)  # no regret, saves nothing
    early = ScorePlateau(DEEP, rel_tol=0.0, patience=1)  # stops one checkpoint after the plateau starts
    eager = ImageNetPlateau(10.0)  # stops at the second checkpoint: saves most, loses Dice
    assert SelectedRule((never, early, eager), min_saved=0.3).fit(training) is early
    assert SelectedRule((never, eager), min_saved=0.3).fit(training) is eager
    assert SelectedRule((never, early, eager), min_saved=0.99).fit(training) is eager  # none saves 99 %: most saved


def test_rules_round_trip_through_their_saved_parameters():
    curve = _curve([1.0, 0.5, 0.3, 0.299, 0.2985, 0.1], imagenet_accuracy=[0.1, 0.2, 0.3, 0.31, 0.32, 0.33])
    for rule in (ScorePlateau(DEEP, 0.02, 2), VariantAgreement(-1, 0.02, 0.5), ImageNetPlateau(0.1),
                 ImageNetAndScore(0.1, DEEP, 0.05)):
        assert rule_from_dict(rule.as_dict()).decide(curve) == rule.decide(curve)
    with pytest.raises(ConfigError, match="unknown stop rule kind"):
        rule_from_dict({"kind": "oracle"})


# -- the recommended rule in `medxfer score` and the online callback ----------------------------------------
import json  # noqa: E402

from medxfer.transferability.stopping import RECOMMENDED_RULE, curve_from_table, load_stop_rule  # noqa: E402


def _robustness_rows(values, level=2, ci=None):
    rows = []
    for i, (length, value) in enumerate(zip(LENGTHS, values)):
        row = {"dataset": "d", "encoder": "unet", "pretraining_scheme": "simple", "metric": "cosine", "margin": 0.5,
               "level": level, "pooled": True, "pretraining_length": length, "robustness": value}
        if ci is not None:
            row.update(ci_low=value - ci[i], ci_high=value + ci[i])
        rows.append(row)
    return pd.DataFrame(rows)


def test_the_default_stop_rule_is_the_recommended_one_and_reads_imagenet_accuracy_from_manifests():
    assert StopConfig().rule == "recommended"
    assert load_stop_rule(StopConfig()).as_dict() == RECOMMENDED_RULE
    table = _robustness_rows([0.5, 0.45, 0.44, 0.43, 0.42, 0.41])
    accuracy = {1: 0.1, 5: 0.3, 20: 0.5, 50: 0.52, 100: 0.6, 150: 0.61}  # +4 % from 20 to 50
    rec = recommend_from_table(table, StopConfig(), accuracy)
    assert (rec.length, rec.stopped_at, rec.fired) == (50.0, 50.0, True)
    assert rec.stop_rule == RECOMMENDED_RULE and rec.score == pytest.approx(0.43)
    # without ImageNet accuracy (e.g. segmentation pretraining) the ImageNet rule cannot stop early
    assert recommend_from_table(table, StopConfig()).length == 150.0


def test_a_rule_file_written_by_analyze_is_applied_with_its_parameters(tmp_path):
    path = tmp_path / "recommended_rule.json"
    path.write_text(json.dumps({"rule": "x", "stop_rule": ScorePlateau(DEEP, 0.05, 1).as_dict()}))
    stop = StopConfig(rule="recommended", rule_file=path)
    # intervals from ci_low/ci_high: 0.5 -> 0.4 is inside the first checkpoint's half-width 0.2
    table = _robustness_rows([0.5, 0.4, 0.3, 0.2, 0.1, 0.05], ci=[0.2, 0.01, 0.01, 0.01, 0.01, 0.01])
    assert curve_from_table(table).halfwidth[("cosine", 0.5, 2, True)][0] == pytest.approx(0.2)
    rec = recommend_from_table(table, stop)
    assert (rec.length, rec.stopped_at) == (5.0, 5.0) and rec.stop_rule["kind"] == "score plateau"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_stop_rule(StopConfig(rule_file=tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"stop_rule": {"kind": "crystal ball"}}))
    with pytest.raises(ConfigError, match="other.json: unknown stop rule kind"):
        load_stop_rule(StopConfig(rule_file=tmp_path / "other.json"))


def test_online_callback_applies_the_recommended_rule_from_its_file(tmp_path):
    from medxfer.pretraining import run_pretraining

    # any change within 1000 % counts as a plateau: the rule fires at the second checkpoint
    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"stop_rule": ScorePlateau(DEEP, 10.0, 1).as_dict()}))
    config = _score_config().model_copy(update={"stop": StopConfig(rule="recommended", rule_file=path)})
    callback = RobustnessEarlyStopping.from_config(config)
    result = run_pretraining(_pretrain_config([0, 1, 2, 3]), tmp_path / "run", callbacks=[callback])
    assert result.lengths == [0, 1] and result.record["status"] == "stopped"
    assert callback.stopped_at == 1 and callback.recommendation.length == 1
    assert callback.recommendation.stop_rule["kind"] == "score plateau"


def test_a_resumed_callback_keeps_every_variant_of_the_checkpoints_scored_before(tmp_path):
    table = pd.concat([_robustness_rows([0.5, 0.4, 0.3, 0.29, 0.28, 0.27]),
                       _robustness_rows([0.6, 0.5, 0.4, 0.3, 0.2, 0.1], level=3)])
    table.to_csv(tmp_path / "online.csv", index=False)
    config = _score_config().model_copy(update={"stop": StopConfig(rule="recommended")})
    callback = RobustnessEarlyStopping(np.zeros((2, 1, 8, 8), np.float32), config, csv_path=tmp_path / "online.csv")
    callback.load_state_dict({"history": {"1": 0.5, "5": 0.4, "20": 0.3}, "stopped_at": None,
                              "accuracy": {"1": 0.1, "5": 0.3, "20": 0.31}})
    assert sorted(callback.table["pretraining_length"].unique()) == [1, 5, 20]
    assert len(callback.table) == 6  # both levels
    # the ImageNet rule sees the restored accuracy: +3 % from 5 to 20
    assert callback.should_stop and callback.recommendation.length == 20
