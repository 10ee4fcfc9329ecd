"""``medxfer evaluate``: a trained model on a dataset -> the metrics record a fine-tuning run writes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from medxfer.cli import main
from medxfer.config import DataConfig, EvalConfig, EvaluateConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.errors import ConfigError, DataError
from medxfer.finetune import run_finetune
from medxfer.model_evaluation import load_evaluate_config, resolve_model_file, run_evaluation
from medxfer.models import build_segmenter
from medxfer.models.weights import save_model_weights
from medxfer.records import iter_evaluations

TINY = ModelConfig(preset="unet", width=4, depth=3)
SOURCE = DataConfig(name="demo", options={"domain": "A"}, train_images=2)
SHIFTED = DataConfig(name="demo", options={"domain": "B"})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = RunConfig(data=SOURCE, model=TINY, evaluation=EvalConfig(source_test=SHIFTED),
                       train=TrainConfig(strategy="scratch", max_steps=1, batch_size=2, lr=1e-2))
    return run_finetune(config, out)


def _metrics_equal(ours: dict, theirs: dict) -> None:
    for part in ("per_image_mean", "pooled"):
        assert ours[part] == pytest.approx(theirs[part], nan_ok=True), part
    assert ours["n_images"] == theirs["n_images"]
    assert [row["case_id"] for row in ours["per_image"]] == [row["case_id"] for row in theirs["per_image"]]


def test_evaluate_reproduces_the_run_record_for_both_test_sets(finished_run, tmp_path):
    target = run_evaluation(finished_run.run_dir, EvaluateConfig(data=SOURCE), tmp_path)
    _metrics_equal(target["metrics"]["target"], finished_run.metrics["target"])
    source = run_evaluation(finished_run.run_dir / "model.pt", EvaluateConfig(data=SHIFTED, test_set="source"),
                            tmp_path)
    _metrics_equal(source["metrics"]["source"], finished_run.metrics["source"])
    assert source["evaluated"]["run_id"] == finished_run.run_id
    assert source["evaluated"]["path"] == str((finished_run.run_dir / "model.pt").resolve())
    assert {r["evaluation_id"] for r in iter_evaluations(tmp_path)} == {target["evaluation_id"],
                                                                       source["evaluation_id"]}
    # the same weights and config again: the record is reused, not recomputed
    again = run_evaluation(finished_run.run_dir, EvaluateConfig(data=SOURCE), tmp_path)
    assert again["finished"] == target["finished"]


def test_cli_evaluate_writes_record_and_table(finished_run, tmp_path, capsys):
    config = tmp_path / "source.yaml"  # a bare data section
    config.write_text(yaml.safe_dump(SHIFTED.model_dump(mode="json")))
    out = tmp_path / "out"
    assert main(["evaluate", str(finished_run.run_dir), str(config), "--out", str(out), "--test-set", "source"]) == 0
    assert "record:" in capsys.readouterr().out
    [path] = list((out / "evaluations").glob("*/result.json"))
    record = json.loads(path.read_text())
    assert record["kind"] == "evaluate" and record["split"] == "test"
    table = pd.read_csv(out / "evaluations.csv")
    assert table["test set"].tolist() == ["source"]
    assert table["dice index"].iloc[0] == pytest.approx(record["metrics"]["source"]["per_image_mean"]["dice index"])


def test_a_run_config_gives_its_data_and_evaluation_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "demo", "root": "data"}, "model": {"preset": "unet"},
                                    "train": {"strategy": "scratch"}, "evaluation": {"threshold": 0.3}}))
    config = load_evaluate_config(path, split="val")
    assert config.split == "val" and config.evaluation.threshold == 0.3
    assert config.data.root == (tmp_path / "data").resolve()  # relative to the config file, as for runs
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"name": "demo"}, "split": "everything"}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: split"):
        load_evaluate_config(bad)


def test_pretraining_folder_with_length_and_mismatch_errors(tmp_path, capsys):
    model = build_segmenter(TINY.model_copy(update={"in_channels": 1, "n_classes": 4}))
    save_model_weights(model, tmp_path / "pre" / "models" / "model_len0005.pt",
                       manifest={"model": TINY.model_copy(update={"in_channels": 1, "n_classes": 4}).model_dump(),
                                 "length": 5, "source": "pretrain:segmentation:x"})
    assert resolve_model_file(tmp_path / "pre", 5).name == "model_len0005.pt"
    with pytest.raises(Exception, match="length 7"):
        resolve_model_file(tmp_path / "pre", 7)
    with pytest.raises(ConfigError, match=r"predicts 4 classes but demo-nuclei-A has 2"):
        run_evaluation(tmp_path / "pre", EvaluateConfig(data=SOURCE), tmp_path / "out", length=5)
    with pytest.raises(DataError, match="model file not found"):
        resolve_model_file(tmp_path / "nowhere")
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump(SOURCE.model_dump(mode="json")))
    assert main(["evaluate", str(tmp_path / "pre"), str(config), "--length", "5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predicts 4 classes" in err[0]
    assert not (tmp_path / "o" / "evaluations").exists()  # nothing half-written
