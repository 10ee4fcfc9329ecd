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
    assert recommend_from_table(table, StopConfig(metric="cosine", margin=0.5, level=-1)).length == 1
    assert recommend_from_table(table, StopConfig(metric="l2", margin=0.5, level=1)).length == 0
    with pytest.raises(ConfigError, match="not among"):
        recommend_from_table(table, StopConfig(metric="pearson"))


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
