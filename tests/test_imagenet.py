"""The ImageNet ``.npy`` + ``labels.json`` reader, its errors and transforms, on a generated miniature copy."""

import json

import numpy as np
import pytest
import torch

from medxfer.config import PretrainConfig, parse_config
from medxfer.data.imagenet import (
    AugmentationRecipe,
    NpyImageDataset,
    classification_transform,
    load_imagenet,
    read_imagenet_index,
)
from medxfer.errors import DataError

SIZE = 16


def make_copy(root, n_train_per_class=3, n_val_per_class=2, classes=(1, 7, 1000), size=SIZE, seed=0):
    """A miniature ImageNet copy: data/<wnid>_<i>.npy and data/ILSVRC2012_val_<n>.npy + labels.json.

    Each class has its own mean colour, so a file's content tells its class."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True)
    labels, arrays = {}, {}
    val_index = 1
    for label in classes:
        for i in range(n_train_per_class + n_val_per_class):
            if i < n_train_per_class:
                name = f"data/n{label:08d}_{i}.npy"
            else:
                name = f"data/ILSVRC2012_val_{val_index:08d}.npy"
                val_index += 1
            array = rng.integers(0, 40, size=(3, size, size)).astype(np.uint8) + np.uint8(label % 200)
            np.save(root / name, array)
            labels[name] = label
            arrays[name] = array
    (root / "labels.json").write_text(json.dumps(labels))
    return labels, arrays


def test_index_splits_by_name_and_shifts_labels(tmp_path):
    labels, _ = make_copy(tmp_path)
    index = read_imagenet_index(tmp_path)
    assert len(index.train) == 9 and len(index.val) == 6
    assert all("ILSVRC2012_val_" in item.path for item in index.val)
    assert not any("ILSVRC2012_val_" in item.path for item in index.train)
    for item in index.train + index.val:
        assert item.label == labels[item.path] - 1  # 1..1000 -> 0..999
    assert {item.label for item in index.train} == {0, 6, 999}
    assert [i.path for i in index.train] == sorted(i.path for i in index.train)


def test_dataset_reads_files_lazily_and_exactly(tmp_path):
    labels, arrays = make_copy(tmp_path)
    index = read_imagenet_index(tmp_path)
    raw = NpyImageDataset(tmp_path, index.val)  # no transform: the stored pixels as a uint8 tensor
    for i, item in enumerate(index.val):
        image, label = raw[i]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, SIZE, SIZE)
        assert np.array_equal(image.numpy(), arrays[item.path])
        assert label == labels[item.path] - 1
    # Lazy: a file removed after indexing is only noticed when its item is read, and named then.
    missing = tmp_path / index.val[0].path
    missing.unlink()
    with pytest.raises(DataError, match=str(missing)):
        raw[0]
    assert raw[1][1] == index.val[1].label


def test_load_imagenet_transforms_and_checks_files(tmp_path):
    make_copy(tmp_path)
    data = load_imagenet(tmp_path, input_size=12, recipe=AugmentationRecipe(kind="advanced", color_jitter=0.4,
                                                                             auto_augment="trivial"))
    assert data.n_classes == 1000 and len(data.train) == 9 and len(data.val) == 6
    image, label = data.train[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 12, 12)
    assert 0 <= label < 1000
    val_image, _ = data.val[0]
    assert tuple(val_image.shape) == (3, 12, 12)
    subset = load_imagenet(tmp_path, input_size=SIZE, recipe=AugmentationRecipe(), train_images=4, val_images=2)
    assert len(subset.train) == 4 and len(subset.val) == 2
    # A file listed in labels.json but absent is an error before any training, naming it.
    (tmp_path / "data" / "n00000007_2.npy").unlink()
    with pytest.raises(DataError, match="n00000007_2.npy.*not found"):
        load_imagenet(tmp_path, input_size=SIZE, recipe=AugmentationRecipe())


@pytest.mark.parametrize("bad_label", [0, 1001, -3, "5", 2.0])
def test_label_out_of_range_names_the_file(tmp_path, bad_label):
    labels, _ = make_copy(tmp_path)
    name = sorted(labels)[4]
    labels[name] = bad_label
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(DataError, match=f"{name}.*out of range 1..1000"):
        read_imagenet_index(tmp_path)


@pytest.mark.parametrize("bad_array, problem", [
    (np.zeros((SIZE, SIZE, 3), np.uint8), "shape"),  # channels last
    (np.zeros((1, SIZE, SIZE), np.uint8), "shape"),  # grayscale
    (np.zeros((3, SIZE, SIZE), np.float32), "dtype"),
    (np.zeros((3, SIZE, SIZE), np.int64), "dtype"),
])
def test_wrong_shape_or_dtype_names_the_file(tmp_path, bad_array, problem):
    make_copy(tmp_path)
    index = read_imagenet_index(tmp_path)
    np.save(tmp_path / index.train[2].path, bad_array)
    dataset = NpyImageDataset(tmp_path, index.train)
    with pytest.raises(DataError, match=f"{index.train[2].path}.*expected a uint8 RGB image of shape \\(3, H, W\\)"):
        dataset[2]
    dataset[1]  # the others still read


def test_pickled_or_corrupt_files_are_data_errors(tmp_path):
    make_copy(tmp_path)
    index = read_imagenet_index(tmp_path)
    np.save(tmp_path / index.train[0].path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / index.train[1].path).write_bytes(b"not an npy file")
    dataset = NpyImageDataset(tmp_path, index.train)
    for i in (0, 1):
        with pytest.raises(DataError, match=index.train[i].path):
            dataset[i]


def test_labels_file_problems(tmp_path):
    with pytest.raises(DataError, match="ImageNet folder not found"):
        read_imagenet_index(tmp_path / "nope")
    tmp_path.joinpath("data").mkdir()
    with pytest.raises(DataError, match="labels.json: labels file not found"):
        read_imagenet_index(tmp_path)
    (tmp_path / "labels.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="labels.json: expected a non-empty JSON object"):
        read_imagenet_index(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"../outside.npy": 1}))
    with pytest.raises(DataError, match="relative"):
        read_imagenet_index(tmp_path)


def test_transforms_keep_eval_deterministic_and_train_random():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    evaluate = classification_transform(16, train=False)
    first, second = evaluate(image), evaluate(image)
    assert torch.equal(first, second) and tuple(first.shape) == (3, 16, 16)
    # Same size in and out: evaluation is only the normalisation.
    same = classification_transform(20, train=False)(image)
    expected = (image.float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(same, expected, atol=1e-5)
    for recipe in (AugmentationRecipe(kind="simple"), AugmentationRecipe(kind="advanced", color_jitter=0.4)):
        train = classification_transform(16, train=True, recipe=recipe)
        outputs = [train(image) for _ in range(4)]
        assert all(tuple(o.shape) == (3, 16, 16) and o.dtype == torch.float32 for o in outputs)
        assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_pretraining_runs_on_an_imagenet_copy(tmp_path):
    from medxfer.models.weights import list_checkpoints
    from medxfer.pretraining import run_pretraining

    make_copy(tmp_path / "imagenet")
    config = parse_config({
        "model": {"preset": "unet", "width": 4, "depth": 3},
        "classification": {"source": "imagenet", "root": str(tmp_path / "imagenet"), "input_size": SIZE},
        "schedule": {"unit": "step", "lengths": [0, 2]},
        "train": {"batch_size": 4},
    }, PretrainConfig)
    result = run_pretraining(config, tmp_path / "out")
    assert [length for length, _, _ in list_checkpoints(tmp_path / "out" / "checkpoints")] == [0, 2]
    assert result.record["n_train_images"] == 9 and result.record["n_val_images"] == 6
    manifest = result.checkpoints[-1].manifest
    assert manifest["dataset"] == "imagenet:imagenet" and 0.0 <= manifest["val_accuracy"] <= 1.0
