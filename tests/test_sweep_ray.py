"""The Ray backend on a local Ray instance: the same tiny sweep, the same records as the local backend."""


import pytest

from medxfer.sweep.grid import parse_sweep
from medxfer.sweep.runner import run_sweep
from medxfer.records import read_record

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

from test_sweep_run import TINY_GRID, one_torch_thread, records  # noqa: E402  (the same tiny sweep)


def test_medxfer_starts_a_local_instance_without_dashboard_and_joins_a_cluster_as_is(monkeypatch):
    from medxfer.sweep.backends import connect_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert connect_ray() is True and connect_ray("ray://head:10001") is True
    assert calls == [{"log_to_driver": False, "include_dashboard": False},
                     {"address": "ray://head:10001", "log_to_driver": False}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert connect_ray() is False and len(calls) == 2  # already connected: left to its owner


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_backend_gives_the_records_of_the_local_backend(local_ray, tmp_path):
    on_ray = run_sweep(parse_sweep(TINY_GRID), tmp_path / "ray", backend="ray")
    assert on_ray.counts() == {"done": 8}
    assert ray.is_initialized()  # the backend used the running instance and left it to its owner
    with one_torch_thread():  # as each 1-CPU Ray task has
        local = run_sweep(parse_sweep(TINY_GRID), tmp_path / "local")
    assert local.counts() == {"done": 8}

    got, expected = records(tmp_path / "ray"), records(tmp_path / "local")
    assert sorted(got) == sorted(expected) and len(got) == 8
    for run_id, record in expected.items():
        other = got[run_id]
        assert other["config"] == record["config"] and other["train_case_ids"] == record["train_case_ids"]
        assert other["steps_trained"] == record["steps_trained"]
        for name, value in record["metrics"]["target"]["per_image_mean"].items():
            # same seeds -> same metrics (up to float reduction order if the thread counts differ)
            assert other["metrics"]["target"]["per_image_mean"][name] == pytest.approx(value, rel=1e-5, nan_ok=True)
    # a second sweep on Ray finds every run done and runs nothing
    assert run_sweep(parse_sweep(TINY_GRID), tmp_path / "ray", backend="ray").counts() == {"reused": 8}


def test_ray_failures_are_recorded_like_local_ones(local_ray, tmp_path):
    grid = parse_sweep({**TINY_GRID, "base": {**TINY_GRID["base"], "data": {"name": "demo", "train_images": 999}},
                        "axes": {"seed": [0]}})
    summary = run_sweep(grid, tmp_path, backend="ray")
    assert summary.counts() == {"failed": 1}
    error = read_record(tmp_path / "runs" / summary.runs[0].run_id / "error.json")
    assert "999" in error["error"] and "Traceback" in error["traceback"]
