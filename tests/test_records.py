import json
import math

import pandas as pd

from medxfer.io import atomic_write_json, stable_hash
from medxfer.records import REFERENCE_COLUMNS, collect, is_done, iter_records, write_error, write_record


def fake_record(run_id, seed, dice):
    return {
        "kind": "finetune", "status": "done", "run_id": run_id, "model": "unet", "dataset": "demo-nuclei-B",
        "strategy": "full", "freeze_encoder": False, "seed": seed, "n_train_images": 5,
        "pretraining": {"length": 3, "accuracy": 0.4, "scheme": "simple"},
        "loss": {"name": "dice_ce"}, "timings": {"train_s": 1.0, "eval_s": 0.5, "total_s": 2.0},
        "metrics": {
            "target": {"per_image_mean": {"dice index": dice, "hd95": float("nan")}, "nan_counts": {"hd95": 2}},
            "source": {"per_image_mean": {"dice index": dice / 2}, "nan_counts": {}},
        },
    }


def test_results_csv_has_reference_columns_first_and_one_row_per_test_set(tmp_path):
    for i, dice in enumerate([0.8, 0.6]):
        write_record(tmp_path / "runs" / f"run{i}", fake_record(f"run{i}", i, dice))
    table = pd.read_csv(collect(tmp_path))
    assert list(table.columns[: len(REFERENCE_COLUMNS)]) == REFERENCE_COLUMNS
    assert len(table) == 4
    target = table[table["test set"] == "target"].sort_values("seed")
    assert target["dice index"].tolist() == [0.8, 0.6]
    assert table["pretraining length"].iloc[0] == 3
    assert target["nan count"].tolist() == [2, 2]
    assert math.isnan(target["hd95"].iloc[0])  # undefined stays NaN, never 0


def test_a_run_is_done_only_when_its_record_exists(tmp_path):
    assert not is_done(tmp_path, "abc")
    write_error(tmp_path / "runs" / "abc", {"error": "boom"})
    assert not is_done(tmp_path, "abc")
    assert list(iter_records(tmp_path)) == []
    write_record(tmp_path / "runs" / "abc", fake_record("abc", 0, 0.5))
    assert is_done(tmp_path, "abc")
    assert not (tmp_path / "runs" / "abc" / "error.json").exists()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": {"c": 2, "d": 3}}) == stable_hash({"b": {"d": 3, "c": 2}, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash({"a": 1})) == 12


def test_results_csv_has_the_surface_metrics_and_named_per_class_columns(tmp_path):
    record = fake_record("multi", 0, float("nan"))
    record["metrics"] = {"target": {"per_image_mean": {
        "mean dice index": 0.7, "dice index/RV": 0.6, "dice index/LV": 0.8, "nsd/LV": 0.9, "mean nsd": 0.85,
        "hausdorff distance/LV": 4.0}, "nan_counts": {}}}
    write_record(tmp_path / "runs" / "multi", record)
    write_record(tmp_path / "runs" / "binary", fake_record("binary", 1, 0.5))
    table = pd.read_csv(collect(tmp_path)).set_index("run id")
    assert {"hausdorff distance", "assd", "nsd"} <= set(table.columns)
    columns = list(table.columns)
    assert columns.index("dice index/LV") > columns.index("nan count")  # appended after the fixed columns
    assert table.loc["multi", "dice index/LV"] == 0.8 and table.loc["multi", "mean nsd"] == 0.85
    binary = table[table.index == "binary"]
    assert binary["dice index/LV"].isna().all() and (binary["dice index"] == 0.5).any()
