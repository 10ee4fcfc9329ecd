"""The inference helpers (model rebuild, run preprocessing) sit below both their users: predict and the
report's overlay grid import them, and neither imports the other."""

import subprocess
import sys

import numpy as np

from medxfer.inference import label_map


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('medxfer')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_overlays_and_inference_do_not_import_predict():
    assert "medxfer.predict" not in _modules_after_import("medxfer.report.overlays")
    loaded = _modules_after_import("medxfer.inference")
    assert "medxfer.predict" not in loaded
    assert not any(m.startswith("medxfer.report") for m in loaded)


def test_label_map_thresholds_binary_and_argmaxes_multiclass():
    binary = np.array([[[0.6, 0.4]], [[0.4, 0.6]]], dtype=np.float32)  # (2, 1, 2)
    assert label_map(binary, threshold=0.5).tolist() == [[0, 1]]
    assert label_map(binary, threshold=0.7).tolist() == [[0, 0]]
    multi = np.array([[[0.5]], [[0.2]], [[0.3]]], dtype=np.float32)
    assert label_map(multi).tolist() == [[0]]
