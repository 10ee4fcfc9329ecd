import numpy as np

from medxfer.config import DataConfig
from medxfer.data import load_data
from medxfer.data.base import select_subset
from medxfer.data.demo import load_demo, natural_images


def test_demo_segmentation_is_deterministic_and_split():
    a1, a2 = load_demo({"domain": "A"}), load_demo({"domain": "A"})
    assert (len(a1.train), len(a1.val), len(a1.test)) == (20, 4, 8)
    for c1, c2 in zip(a1.train + a1.test, a2.train + a2.test):
        assert c1.case_id == c2.case_id
        np.testing.assert_array_equal(c1.image, c2.image)
        np.testing.assert_array_equal(c1.label, c2.label)
    ids = [c.case_id for c in a1.train + a1.val + a1.test]
    assert len(set(ids)) == len(ids)  # no tile in two splits


def test_demo_domains_share_morphology_but_not_intensity():
    a = load_data(DataConfig(name="demo", options={"domain": "A"}))
    b = load_data(DataConfig(name="demo", options={"domain": "B"}))
    assert a.train[0].image.shape == b.train[0].image.shape == (1, 64, 64)
    for data in (a, b):
        labels = np.concatenate([c.label.ravel() for c in data.train])
        assert set(np.unique(labels)) == {0, 1}
        assert 0.05 < labels.mean() < 0.5  # real nuclei, not empty tiles
    # Domain A: bright nuclei on dark background; domain B: dark nuclei on bright background.
    def contrast(data):
        img = np.concatenate([c.image.ravel() for c in data.train])
        lab = np.concatenate([c.label.ravel() for c in data.train])
        return img[lab == 1].mean() - img[lab == 0].mean()
    assert contrast(a) > 0 > contrast(b)


def test_natural_images_are_deterministic_and_labelled():
    x1, y1, names = natural_images("train", n_per_class=5, size=16, seed=1)
    x2, y2, _ = natural_images("train", n_per_class=5, size=16, seed=1)
    x3, _, _ = natural_images("train", n_per_class=5, size=16, seed=2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (5 * len(names), 3, 16, 16) and x1.dtype == np.uint8
    assert set(y1.tolist()) == set(range(len(names)))


def test_subsets_are_deterministic_and_nested():
    cases = load_demo({"domain": "B"}).train
    subsets = [select_subset(cases, n, seed=7) for n in (5, 10, 15, 20)]
    ids = [[c.case_id for c in s] for s in subsets]
    assert ids[0] == [c.case_id for c in select_subset(cases, 5, seed=7)]
    for small, large in zip(ids, ids[1:]):
        assert set(small) <= set(large)
    assert ids[0] != [c.case_id for c in select_subset(cases, 5, seed=8)]
    assert len(select_subset(cases, 0.5, seed=0)) == 10
