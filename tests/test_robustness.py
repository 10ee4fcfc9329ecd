"""The contrastive robustness score: hand computations, the negative pairing, the one-pass path against
the naive per-variant path, degenerate encoders, and `medxfer score` end to end on saved checkpoints."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medxfer.config import AugmentConfig
from medxfer.models.encoders import UNetEncoder
from medxfer.models.weights import save_encoder
from medxfer.transferability.robustness import (
    METRICS,
    PhotometricAugmentation,
    negative_permutation,
    pair_distances,
    robustness_naive,
    row_distance,
    triplet_hinge,
    variant_table,
)
from medxfer.transferability.scoring import load_score_config, run_score

MARGINS = (0.0, 0.25, 0.5, 0.75, 1.0)
NO_JITTER = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, noise=0.0)


class IdentityEncoder(nn.Module):
    """Level 0 = the image itself: the features are exactly what the test makes them."""

    channels, strides, in_channels = [1], [1], 1

    def forward(self, x):
        return [x]


class ConstantEncoder(nn.Module):
    """Every image -> the same feature maps (level 0 nonzero, level 1 all zero)."""

    channels, strides, in_channels = [4, 2], [1, 2], 1

    def forward(self, x):
        n = x.shape[0]
        level0 = torch.linspace(-1.0, 2.0, 4 * 9).reshape(1, 4, 3, 3).expand(n, -1, -1, -1)
        return [level0 + 0.0 * x.mean(), torch.zeros(n, 2, 2, 2)]


def _hinge(d_pos, d_neg, margin):
    return max(0.0, d_pos - d_neg + margin)


def test_hand_made_vectors_match_hand_computation_for_every_distance_and_margin():
    q = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    k_neg = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    # By hand: cosine: q.k = 1, |q||k| = 2 -> d = 0.5; q.k' = 0 -> d = 1.
    # l2 (mean squared difference): (0 + 1 + 1) / 3 = 2/3; (1 + 1 + 1) / 3 = 1.
    # pearson: centred q = (1, -2, 1)/3, k = (1, 1, -2)/3 -> r = -0.5, d = 1.5; k' = (-1, 2, -1)/3 -> r = -1, d = 2.
    expected = {"cosine": (0.5, 1.0), "l2": (2.0 / 3.0, 1.0), "pearson": (1.5, 2.0)}
    for metric, (d_pos, d_neg) in expected.items():
        assert float(row_distance(q, k, metric)[0]) == pytest.approx(d_pos, abs=1e-12)
        assert float(row_distance(q, k_neg, metric)[0]) == pytest.approx(d_neg, abs=1e-12)
        for margin in MARGINS:
            got = triplet_hinge(row_distance(q, k, metric), row_distance(q, k_neg, metric), margin)
            assert got[0] == pytest.approx(_hinge(d_pos, d_neg, margin), abs=1e-12)


def test_score_of_identical_augmentations_is_margin_minus_negative_distance():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(7, 1, 3, 4)).astype(np.float32)
    distances = pair_distances(IdentityEncoder(), images, augment=NO_JITTER, seed=5, batch_size=3, device="cpu",
                               pooled=[False])
    p = distances.permutation
    flat = images.reshape(7, -1).astype(np.float64)

    def numpy_distance(a, b, metric):
        if metric == "l2":
            return float(np.mean((a - b) ** 2))
        if metric == "pearson":
            a, b = a - a.mean(), b - b.mean()
        return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))

    for metric in METRICS:
        assert np.allclose(distances.positive[(metric, 0, False)], 0.0, atol=1e-12)
        for margin in MARGINS:
            expected = [max(0.0, margin - numpy_distance(flat[i], flat[p[i]], metric)) for i in range(7)]
            assert np.allclose(distances.losses(metric, margin, 0, False), expected, atol=1e-9)
            assert distances.score(metric, margin, 0, False) == pytest.approx(np.mean(expected), abs=1e-9)


@pytest.mark.parametrize("n", [2, 3, 5, 16, 33])
def test_negative_permutation_has_no_fixed_point(n):
    for seed in range(5):
        p = negative_permutation(n, seed)
        assert sorted(p.tolist()) == list(range(n))
        assert np.all(p != np.arange(n))
    assert not np.array_equal(negative_permutation(33, 0), negative_permutation(33, 1))


def test_permutation_used_by_the_score_has_no_fixed_point():
    images = np.random.default_rng(0).normal(size=(6, 1, 2, 2)).astype(np.float32)
    distances = pair_distances(IdentityEncoder(), images, augment=NO_JITTER, seed=1, device="cpu", pooled=[False])
    assert np.all(distances.permutation != np.arange(6))
    # Negative distances are never 0 (an image paired with itself would give 0 with no jitter).
    assert np.all(distances.negative[("l2", 0, False)] > 0)


@pytest.mark.parametrize("channels,batch_size", [(1, 3), (3, 4)])
def test_all_variants_pass_equals_naive_per_variant_recomputation(channels, batch_size):
    torch.manual_seed(0)
    encoder = UNetEncoder(3, width=3, depth=3)  # grayscale targets are repeated to its 3 channels
    images = np.random.default_rng(1).normal(size=(7, channels, 12, 12)).astype(np.float32)
    augment = AugmentConfig(noise=0.05)  # colour jitter (hue, saturation) for RGB, noise for grayscale
    fast = pair_distances(encoder, images, augment=augment, seed=2, batch_size=batch_size, device="cpu")
    table = variant_table(fast, MARGINS, n_boot=0)
    assert len(table) == len(METRICS) * len(MARGINS) * 3 * 2
    for row in table.itertuples():
        naive = robustness_naive(encoder, images, metric=row.metric, margin=row.margin, level=row.level,
                                 pooled=row.pooled, augment=augment, seed=2, batch_size=5, device="cpu")
        assert np.allclose(fast.losses(row.metric, row.margin, row.level, row.pooled), naive, atol=1e-6, rtol=1e-6)
        assert row.robustness == pytest.approx(naive.mean(), abs=1e-6)


def test_constant_encoder_scores_exactly_the_margin():
    images = np.random.default_rng(0).normal(size=(5, 1, 6, 6)).astype(np.float32)
    distances = pair_distances(ConstantEncoder(), images, seed=0, batch_size=2, device="cpu")
    table = variant_table(distances, MARGINS, n_boot=20)
    assert len(table) == len(METRICS) * len(MARGINS) * 2 * 2
    assert np.allclose(table["robustness"], table["margin"], atol=1e-12)


def test_augmentation_is_seeded_per_image_and_keeps_the_intensity_range():
    images = torch.as_tensor(np.random.default_rng(0).normal(size=(4, 3, 8, 8)), dtype=torch.float32)
    config = AugmentConfig()
    a = PhotometricAugmentation(config, 4, seed=0, view=0, rgb=True)
    whole = a(images, [0, 1, 2, 3])
    assert torch.allclose(whole[2:3], a(images[2:3], [2]))  # same image, other batch: same jitter
    assert not torch.allclose(whole, images)
    assert not torch.allclose(whole, PhotometricAugmentation(config, 4, seed=0, view=1, rgb=True)(images, [0, 1, 2, 3]))
    lo = images.flatten(1).min(1).values
    hi = images.flatten(1).max(1).values
    assert torch.all(whole.flatten(1).min(1).values >= lo - 1e-5)
    assert torch.all(whole.flatten(1).max(1).values <= hi + 1e-5)


def test_distances_grow_with_stronger_jitter():
    torch.manual_seed(0)
    encoder = UNetEncoder(1, width=4, depth=2)
    images = np.random.default_rng(2).normal(size=(6, 1, 16, 16)).astype(np.float32)
    weak = pair_distances(encoder, images, augment=AugmentConfig(brightness=0.01, contrast=0.0, noise=0.001),
                          device="cpu", pooled=[False], levels=[1])
    strong = pair_distances(encoder, images, augment=AugmentConfig(brightness=0.5, contrast=0.5, noise=0.2),
                            device="cpu", pooled=[False], levels=[1])
    assert strong.positive[("l2", 1, False)].mean() > 10 * weak.positive[("l2", 1, False)].mean()


REFERENCE_COLUMNS = ["dataset", "metric", "margin", "encoder", "pretraining_scheme", "pooled", "level",
                     "pretraining_length", "robustness"]


def _tiny_checkpoints(folder, lengths=(0, 1, 2)):
    for length in lengths:
        torch.manual_seed(length)
        encoder = UNetEncoder(3, width=2, depth=2)
        save_encoder(encoder, folder / f"encoder_len{length:04d}.pt", length=length, scheme="simple")
    return folder


def test_score_writes_the_csv_for_every_checkpoint(tmp_path):
    folder = _tiny_checkpoints(tmp_path / "checkpoints")
    (tmp_path / "score.yaml").write_text(
        "data: {name: demo, options: {domain: B}}\n"
        "checkpoints: checkpoints\n"  # relative to the config file
        f"out: {tmp_path / 'out'}\n"
        "n_images: 4\ncrop_size: [32, 32]\nbootstrap: 50\nbatch_size: 3\n"
        "stop: {rule: argmin, metric: l2, margin: 0.25, level: -1, pooled: true}\n")
    config = load_score_config(tmp_path / "score.yaml")
    assert config.checkpoints == folder.resolve()
    result = run_score(config)
    table = pd.read_csv(tmp_path / "out" / "robustness.csv")
    assert list(table.columns[:9]) == REFERENCE_COLUMNS
    assert {"ci_low", "ci_high", "n_images", "checkpoint", "seed", "time_s"} <= set(table.columns)
    assert len(table) == 3 * len(METRICS) * len(MARGINS) * 2 * 2  # checkpoints x metrics x margins x levels x pooled
    assert sorted(table["pretraining_length"].unique()) == [0, 1, 2]
    assert set(table["metric"]) == {"cosine", "l2", "pearson"}
    assert set(table["encoder"]) == {"unet"} and set(table["pretraining_scheme"]) == {"simple"}
    assert set(table["dataset"]) == {"demo-nuclei-B"} and set(table["n_images"]) == {4}
    assert np.all(table["ci_low"] <= table["robustness"] + 1e-12)
    assert np.all(table["robustness"] <= table["ci_high"] + 1e-12)
    # The recommendation is the argmin of its variant.
    rec = json.loads((tmp_path / "out" / "recommendation.json").read_text())
    variant = table[(table.metric == "l2") & (table.margin == 0.25) & (table.level == 1) & table.pooled]
    assert rec["length"] == variant.loc[variant["robustness"].idxmin(), "pretraining_length"]
    assert result.recommendation.length == rec["length"]


def test_score_config_rejects_unknown_keys_and_bad_levels(tmp_path):
    from medxfer.errors import ConfigError

    (tmp_path / "bad.yaml").write_text("checkpoints: x\nmargin: 0.5\n")
    with pytest.raises(ConfigError, match="margin: unknown key"):
        load_score_config(tmp_path / "bad.yaml")
    images = np.zeros((3, 1, 4, 4), np.float32)
    with pytest.raises(ConfigError, match="level 5"):
        pair_distances(IdentityEncoder(), images, levels=[5], device="cpu")


def test_score_command_writes_every_new_estimator_to_baselines_csv(tmp_path):
    from medxfer.cli import main

    _tiny_checkpoints(tmp_path / "checkpoints", lengths=(0, 1))
    (tmp_path / "score.yaml").write_text(
        "data: {name: demo, options: {domain: B}}\ncheckpoints: checkpoints\n"
        "n_images: 6\ncrop_size: [32, 32]\nbootstrap: 0\nmetrics: [cosine]\nmargins: [0.5]\npooled: [true]\n"
        "baselines: [knn, gbc, ccfv]\nbaseline_pixels: 600\nknn_k: 5\n"
        "stop: {rule: argmin, metric: cosine, margin: 0.5, level: -1, pooled: true}\n")
    assert main(["score", str(tmp_path / "score.yaml"), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "baselines.csv")
    assert set(table["metric"]) == {"knn_accuracy", "gbc", "cc_fv"}
    # every estimator at each of the two levels, for each checkpoint, with its own time
    assert len(table) == 3 * 2 * 2 and table["score"].notna().all() and (table["time_s"] > 0).all()
    knn = table[table["metric"] == "knn_accuracy"]["score"]
    assert ((0.0 <= knn) & (knn <= 1.0)).all() and (table[table["metric"] == "gbc"]["score"] <= 0).all()


# ------------------------------------------------------------------ the reference code's protocol
@pytest.mark.parametrize("n", [2, 5, 6, 9])
def test_reference_negatives_are_the_reversed_second_views_rolled_by_two(n):
    from medxfer.transferability.robustness import reference_negatives

    # As the reference study describes its negatives: the second views in reverse order, then the
    # last two moved to the front.
    reversed_ids = [list(range(n))[i - 1] for i in range(n, 0, -1)]
    rolled = [reversed_ids[-2], reversed_ids[-1], *reversed_ids[:-2]]
    assert list(reference_negatives(n)) == rolled
    assert list(reference_negatives(n)) == [(n + 1 - i) % n for i in range(n)]
    fixed = [i for i in range(n) if reference_negatives(n)[i] == i]
    assert fixed == ([(n + 1) // 2] if n % 2 else [])


def test_reference_jitter_is_torchvisions_color_jitter_drawn_once_for_all_images():
    from torchvision.transforms import ColorJitter

    from medxfer.transferability.robustness import ReferenceColorJitter

    config = AugmentConfig(brightness=0.1, contrast=0.05, saturation=0.1, hue=0.05)
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    jitter = ReferenceColorJitter(config, seed=3, view=1)
    torch.manual_seed(jitter.torch_seed)
    expected = ColorJitter(brightness=0.1, contrast=0.05, saturation=0.1, hue=0.05)(images)
    assert torch.allclose(jitter(images), expected, atol=1e-6)
    assert torch.allclose(torch.cat([jitter(images[:2]), jitter(images[2:])]), expected, atol=1e-6)
    assert not torch.allclose(ReferenceColorJitter(config, seed=3, view=0)(images), expected)
    # no per-image rescaling: values outside [0, 1] are clamped, as ColorJitter does
    assert float(jitter(images * 4.0 - 1.0).min()) >= 0.0 and float(jitter(images * 4.0).max()) <= 1.0


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_reference_pair_distances_equal_the_whole_set_computation(batch_size):
    from medxfer.transferability.robustness import ReferenceColorJitter, reference_pair_distances, row_distance

    torch.manual_seed(0)
    encoder = UNetEncoder(1, width=4, depth=2)
    images = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    config = AugmentConfig()
    got = reference_pair_distances(encoder, images, seed=2, batch_size=batch_size, device="cpu",
                                   metrics=["cosine", "l2"], levels=[1], pooled=[True, False])
    encoder.eval()
    with torch.no_grad():
        q = encoder(ReferenceColorJitter(config, 2, 0)(images))[1]
        k = encoder(ReferenceColorJitter(config, 2, 1)(images))[1]
    negatives = [(7 + 1 - i) % 7 for i in range(7)]
    for pool in (True, False):
        qv = (q.flatten(2).mean(2) if pool else q.flatten(1)).double()
        kv = (k.flatten(2).mean(2) if pool else k.flatten(1)).double()
        for metric in ("cosine", "l2"):
            np.testing.assert_allclose(got.positive[(metric, 1, pool)], row_distance(qv, kv, metric).numpy(),
                                       rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got.negative[(metric, 1, pool)],
                                       row_distance(qv, kv[negatives], metric).numpy(), rtol=1e-5, atol=1e-7)
    # image 4 of 7 is its own negative: with no jitter its loss is exactly the margin
    plain = reference_pair_distances(IdentityEncoder(), images, augment=NO_JITTER, device="cpu", levels=[0])
    assert plain.losses("cosine", 0.5, 0, True)[4] == pytest.approx(0.5)


def test_score_with_reference_protocol_numbers_levels_from_one(tmp_path):
    _tiny_checkpoints(tmp_path / "checkpoints", lengths=(0, 1))
    (tmp_path / "score.yaml").write_text(
        "data: {name: demo, options: {domain: B}, normalization: minmax}\ncheckpoints: checkpoints\n"
        f"out: {tmp_path / 'out'}\nprotocol: reference\nlevels: [2]\n"
        "n_images: 5\ncrop_size: [32, 32]\nbootstrap: 0\nmetrics: [cosine]\nmargins: [0.5]\n"
        "stop: {rule: argmin, metric: cosine, margin: 0.5, level: 2, pooled: true}\n")
    result = run_score(load_score_config(tmp_path / "score.yaml"))
    table = pd.read_csv(tmp_path / "out" / "robustness.csv")
    assert set(table["level"]) == {2} and set(table["protocol"]) == {"reference"}
    assert set(table["stride"]) == {2}  # published level 2 = the encoder's second level (index 1)
    assert result.recommendation is not None and result.recommendation.variant["level"] == 2


def test_score_on_one_checkpoint_says_there_is_nothing_to_choose(tmp_path, capsys):
    from medxfer.cli import main

    _tiny_checkpoints(tmp_path / "checkpoints", lengths=(5,))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "recommendation.json").write_text('{"length": 3}')  # an earlier run's
    (tmp_path / "score.yaml").write_text(
        "data: {name: demo, options: {domain: B}}\ncheckpoints: checkpoints/encoder_len0005.pt\n"
        "n_images: 4\ncrop_size: [32, 32]\nbootstrap: 0\nmetrics: [cosine]\nmargins: [0.5]\npooled: [true]\n")
    assert main(["score", str(tmp_path / "score.yaml"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "one checkpoint: nothing to choose" in out and "nan" not in out.lower()
    assert not (tmp_path / "out" / "recommendation.json").exists()
    assert pd.read_csv(tmp_path / "out" / "robustness.csv")["pretraining_length"].unique().tolist() == [5]
