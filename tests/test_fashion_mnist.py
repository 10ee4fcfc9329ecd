"""Fashion-MNIST as a pretraining source: the IDX reader, the loader, and a pretraining run on it."""

import gzip
import json

import numpy as np
import pytest

from medxfer.config import PretrainConfig, parse_config
from medxfer.data.imagenet import AugmentationRecipe, load_fashion_mnist, read_idx
from medxfer.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(root, n_train=40, n_test=20, compress=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        # brightness grows with the class (plus noise): learnable in a few steps, whatever the crop or flip
        images = rng.integers(0, 20, size=(n, 28, 28)) + 23 * labels[:, None, None]
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte" + (".gz" if compress else "")
            (root / name).write_bytes(gzip.compress(data) if compress else data)
    return root


def test_idx_reader_reads_gzip_and_plain_files(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "a").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


@pytest.mark.parametrize("content, message", [(b"\x00\x00\x0d\x01" + bytes(8), "bad magic number"),
                                              (idx_bytes(np.zeros((3, 2), np.uint8))[:-1], "holds 5 values")])
def test_damaged_idx_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"broken-idx3-ubyte: .*{message}"):
        read_idx(path)


def test_loader_takes_a_seeded_training_subset_and_the_first_test_images(tmp_path):
    root = write_fashion(tmp_path / "fm")
    data = load_fashion_mnist(root, input_size=32, recipe=AugmentationRecipe(), train_images=16, val_images=8, seed=3)
    assert (len(data.train), len(data.val), data.n_classes) == (16, 8, 10)
    image, label = data.val[0]
    assert tuple(image.shape) == (3, 32, 32) and label == 0
    again = load_fashion_mnist(root, input_size=32, recipe=AugmentationRecipe(), train_images=16, seed=3)
    assert data.train.labels == again.train.labels
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: Fashion-MNIST file not found"):
        load_fashion_mnist(tmp_path / "absent", input_size=32, recipe=AugmentationRecipe())


def test_pretraining_on_fashion_mnist_learns_above_chance(tmp_path):
    from medxfer.pretraining import run_pretraining

    root = write_fashion(tmp_path / "fm", n_train=200, n_test=50, compress=False)
    config = parse_config({
        "name": "fm", "model": {"preset": "unet", "width": 4, "depth": 3},
        "classification": {"source": "fashion-mnist", "root": str(root), "input_size": 32},
        "schedule": {"unit": "step", "lengths": [0, 30]},
        "train": {"batch_size": 32, "optimizer": "adam", "lr": 0.01},
    }, PretrainConfig)
    run_pretraining(config, tmp_path / "out")
    manifests = {m["length"]: m for m in (json.loads(p.read_text()) for p in (tmp_path / "out").rglob("encoder_len*.json"))}
    assert set(manifests) == {0, 30}
    # chance is 0.1; the run is seeded, so this is the same number every time (0.3 when written)
    assert manifests[30]["val_accuracy"] >= max(0.2, manifests[0]["val_accuracy"] + 0.1)
