"""Losses: references (MONAI / torch / hand), ignore_index, partial labels, build_loss, loss selection."""

from __future__ import annotations

import math

import monai.losses
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medxfer.errors import ConfigError, DataError
from medxfer.training.losses import (
    BALANCED_IMBALANCE_RATIO,
    CLASS_WEIGHT_CAP,
    CrossEntropyLoss,
    FocalLoss,
    SMALL_FOREGROUND_FRACTION,
    available_losses,
    build_loss,
    class_weights_from_fractions,
    label_statistics,
    select_loss,
)

IGNORE = 255
BASE_NAMES = ["dice", "ce", "dice_ce", "focal", "dice_focal", "tversky"]


def _example(shape=(2, 3, 5, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    logits = torch.randn(shape, generator=generator, dtype=torch.float64).float()
    target = torch.randint(0, c, (n, *spatial), generator=generator)
    return logits, target


def _onehot(target, n_classes):
    return F.one_hot(target, n_classes).movedim(-1, 1).float()


# ---------------------------------------------------------------- references without ignored pixels


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_matches_monai(batch, include_background):
    logits, target = _example()
    ours = build_loss("dice", batch=batch, include_background=include_background)(logits, target)
    reference = monai.losses.DiceLoss(
        softmax=True, to_onehot_y=True, include_background=include_background, batch=batch
    )(logits, target[:, None])
    assert torch.allclose(ours, reference, atol=1e-6)


def test_dice_hand_computation():
    # p(class 1) = 0.75 on the two foreground pixels and 0.25 on the two background ones:
    # Dice = 2 * 1.5 / (2 + 2) = 0.75 -> loss 0.25 (smooth terms negligible).
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)], [math.log(3), 0.0], [math.log(3), 0.0]])
    logits = logits.T.reshape(1, 2, 2, 2)
    target = torch.tensor([1, 1, 0, 0]).reshape(1, 2, 2)
    assert build_loss("dice")(logits, target).item() == pytest.approx(0.25, abs=1e-5)
    # With background: both classes have Dice 0.75.
    assert build_loss("dice", include_background=True)(logits, target).item() == pytest.approx(0.25, abs=1e-5)


def test_ce_matches_torch_with_weights_and_ignore_index():
    logits, target = _example(seed=1)
    target[0, :2] = IGNORE
    weights = [0.2, 1.0, 3.0]
    ours = build_loss("ce", class_weights=weights)(logits, target)
    reference = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.allclose(build_loss("ce")(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE))


def test_focal_matches_monai_and_reduces_to_ce():
    logits, target = _example(seed=2)
    ours = build_loss("focal", gamma=2.0)(logits, target)
    per_class = monai.losses.FocalLoss(gamma=2.0, use_softmax=True, to_onehot_y=True, reduction="none")(
        logits, target[:, None]
    )
    assert torch.allclose(ours, per_class.sum(1).mean(), atol=1e-6)
    # Hand formula: -(1 - p_y)^2 log p_y averaged over pixels.
    log_p = torch.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    assert torch.allclose(ours, (-(1 - log_p.exp()) ** 2 * log_p).mean(), atol=1e-6)
    weights = [0.5, 2.0, 1.0]
    assert torch.allclose(
        build_loss("focal", gamma=0.0, class_weights=weights)(logits, target),
        F.cross_entropy(logits, target, weight=torch.tensor(weights)),
        atol=1e-6,
    )


@pytest.mark.parametrize("batch", [True, False])
def test_tversky_matches_monai_and_equals_dice_at_half(batch):
    logits, target = _example(seed=3)
    ours = build_loss("tversky", alpha=0.3, beta=0.7, batch=batch)(logits, target)
    reference = monai.losses.TverskyLoss(
        softmax=True, to_onehot_y=True, include_background=False, alpha=0.3, beta=0.7, batch=batch
    )(logits, target[:, None])
    assert torch.allclose(ours, reference, atol=1e-6)
    half = build_loss("tversky", alpha=0.5, beta=0.5, batch=batch)(logits, target)
    assert torch.allclose(half, build_loss("dice", batch=batch)(logits, target), atol=1e-5)


def test_combined_losses_match_monai():
    logits, target = _example(seed=4)
    ours = build_loss("dice_ce", lambda_dice=0.7, lambda_ce=1.3, include_background=True, batch=False)
    reference = monai.losses.DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0.7, lambda_ce=1.3)
    assert torch.allclose(ours(logits, target), reference(logits, target[:, None]), atol=1e-6)
    assert set(ours.last_components) == {"dice", "ce"}

    dice_focal = build_loss("dice_focal", gamma=1.5, lambda_focal=2.0)(logits, target)
    dice = monai.losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)
    focal = monai.losses.FocalLoss(gamma=1.5, use_softmax=True, to_onehot_y=True, reduction="none")
    expected = dice(logits, target[:, None]) + 2.0 * focal(logits, target[:, None]).sum(1).mean()
    assert torch.allclose(dice_focal, expected, atol=1e-6)


def test_perfect_prediction_gives_near_zero_overlap_losses():
    _, target = _example(seed=5)
    logits = 30.0 * _onehot(target, 3)
    for name in ["dice", "tversky", "partial_dice"]:
        for batch in (True, False):
            assert build_loss(name, batch=batch, include_background=True)(logits, target).item() < 1e-4
    assert build_loss("dice_ce")(logits, target).item() < 1e-4


# ----------------------------------------------------------------- classes absent from a case / batch

OVERLAP_NAMES = ["dice", "tversky", "dice_ce", "dice_focal"]


def _absent_class_pair(size=16, margin=5.0):
    """Class 1 in a box, class 2 absent; logits (margin 5) of the correct map and of the map where every
    background voxel is predicted as class 2 (issue 22's pair, at ``size``^3)."""
    target = torch.zeros((1, size, size, size), dtype=torch.long)
    target[0, size // 4: 3 * size // 4, size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 1
    degenerate = torch.where(target == 0, 2, target)
    return target, margin * _onehot(target, 3), margin * _onehot(degenerate, 3)


@pytest.mark.parametrize("prefix", ["", "partial_"])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("name", OVERLAP_NAMES)
def test_predicting_an_absent_class_everywhere_costs_more_than_the_correct_map(name, batch, include_background,
                                                                                prefix):
    target, correct, degenerate = _absent_class_pair()
    loss = build_loss(prefix + name, batch=batch, include_background=include_background)
    at_correct, at_degenerate = loss(correct, target).item(), loss(degenerate, target).item()
    # Before: both 0.5189 (dice) / 0.5141 (tversky): class 2 counted ~1 whatever was predicted.
    assert at_degenerate - at_correct > 0.25, (at_correct, at_degenerate)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("name", ["dice", "tversky"])
def test_class_absent_from_target_and_prediction_is_left_out(name, batch):
    target, correct, _ = _absent_class_pair()
    monai_loss = {"dice": monai.losses.DiceLoss, "tversky": monai.losses.TverskyLoss}[name]
    options = {"alpha": 0.3, "beta": 0.7} if name == "tversky" else {}
    # Class 1 alone, by MONAI on the class-1 channel: what the docstring promises for the 3-class loss.
    class_1 = monai_loss(smooth_nr=1e-5, smooth_dr=1e-5, **options)(
        torch.softmax(correct, 1)[:, 1:2], (target == 1).float()[:, None])
    assert class_1.item() < 0.05
    assert build_loss(name, batch=batch)(correct, target).item() == pytest.approx(class_1.item(), abs=1e-6)
    # A perfectly predicted all-background image: nothing to average, loss 0 (was ~1).
    background = torch.zeros_like(target)
    assert build_loss(name, batch=batch)(5.0 * _onehot(background, 3), background).item() == 0.0


def test_absent_class_is_left_out_per_case_or_per_batch():
    logits, target = _example(shape=(2, 3, 6, 6), seed=21)
    target[1][target[1] == 2] = 0  # case 1 has no class 2 ...
    logits[1, 2] = -20.0  # ... and predicts none
    p, g = torch.softmax(logits, 1), _onehot(target, 3)
    per_case = monai.losses.DiceLoss(reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)(p, g).reshape(2, 3)
    expected = (per_case[0, 1] + per_case[0, 2] + per_case[1, 1]) / 3  # case 1's class 2 is left out
    assert torch.allclose(build_loss("dice", batch=False)(logits, target), expected, atol=1e-6)
    # Batch Dice: class 2 is in the batch, so it counts, summed over both cases (nnU-Net's batch Dice).
    batch = monai.losses.DiceLoss(batch=True, reduction="none")(p, g).reshape(3)
    assert torch.allclose(build_loss("dice", batch=True)(logits, target), batch[1:].mean(), atol=1e-6)


def _selectable_losses():
    """Every (name, options) select_loss returns over the regimes its rules tell apart."""
    regimes = [label_statistics(labels, 3, annotated) for labels, annotated in _regime_label_maps()]
    chosen = {repr((name, options)): (name, options) for name, options, _ in map(select_loss, regimes)}
    return [chosen[key] for key in sorted(chosen)]


def _regime_label_maps():
    big = np.zeros((40, 40), dtype=np.int64)
    big[5:25, 5:25] = 1  # 25%
    balanced = big.copy()
    balanced[25:40, 5:35] = 2  # 28%
    small = big.copy()
    small[30:34, 30:34] = 2  # 1%
    tiny = big.copy()
    tiny[30:32, 30:32] = 2  # 0.25%
    rare = [tiny] + [big] * 7  # class 2 in 1 of 8 cases
    moderate = big.copy()
    moderate[30:39, 30:39] = 2  # 5%
    return [([balanced], None), ([small], None), ([tiny], None), (rare, None), ([moderate], None),
            ([small, big], [None, (1,)]), ([tiny, big, big, big], [None, None, None, (1,)])]


def test_select_loss_always_keeps_a_voxel_wise_term():
    chosen = _selectable_losses()
    names = {name for name, _ in chosen}
    assert names == {"ce", "dice_ce", "partial_dice_ce"}
    assert any(options.get("class_weights") for name, options in chosen if name == "partial_dice_ce")
    for name, options in chosen:
        loss = build_loss(name, **options)
        terms = loss.terms if hasattr(loss, "terms") else {name: loss}
        assert any(isinstance(term, (CrossEntropyLoss, FocalLoss)) for term in terms.values()), name


@pytest.mark.parametrize("name, options", _selectable_losses(), ids=str)
def test_every_selectable_loss_leads_out_of_foreground_everywhere(name, options):
    target, _, degenerate = _absent_class_pair(size=8)
    loss = build_loss(name, **options)
    logits = degenerate.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.5)
    for _ in range(40):
        optimizer.zero_grad()
        loss(logits, target).backward()
        optimizer.step()
    predicted = logits.detach().argmax(1)
    assert bool((predicted == target).all()), f"{name}: {(predicted[target == 0] == 0).float().mean():.2f} of background"


@pytest.mark.parametrize("name", ["dice", "tversky"])
def test_overlap_loss_alone_gives_no_way_out_of_foreground_everywhere(name):
    # Why select_loss never returns an overlap loss alone: a class absent from the target has Dice 0 for
    # any predicted volume, so nothing pulls its false positives back (the test above would fail).
    target, _, degenerate = _absent_class_pair(size=8)
    logits = degenerate.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.5)
    for _ in range(40):
        optimizer.zero_grad()
        build_loss(name)(logits, target).backward()
        optimizer.step()
    assert float((logits.detach().argmax(1)[target == 0] == 0).float().mean()) < 0.5


# ------------------------------------------------------------------------------------ ignore_index


@pytest.mark.parametrize("name", available_losses())
def test_ignored_pixels_do_not_change_loss_and_get_zero_gradient(name):
    logits, target = _example(shape=(2, 3, 4, 5), seed=6)
    ignored = torch.zeros_like(target, dtype=torch.bool)
    ignored[0, 1:3, 2:] = True
    ignored[1, 0, :] = True
    target[ignored] = IGNORE
    loss = build_loss(name)
    logits = logits.requires_grad_(True)
    value = loss(logits, target)
    value.backward()
    grad_at_ignored = logits.grad.movedim(1, -1)[ignored]
    assert torch.count_nonzero(grad_at_ignored) == 0
    assert torch.count_nonzero(logits.grad.movedim(1, -1)[~ignored]) > 0

    changed = logits.detach().clone()
    changed.movedim(1, -1)[ignored] = torch.tensor([50.0, -80.0, float("inf")])
    assert torch.equal(loss(changed, target), value.detach())


def test_ignored_pixels_equal_loss_on_valid_pixels_only():
    logits, target = _example(shape=(2, 3, 4, 5), seed=7)
    target[0, 0] = IGNORE
    target[1, :, 1] = IGNORE
    valid = target != IGNORE
    # Batch Dice sums over all valid pixels: identical to one flat "image" of the valid pixels.
    flat_logits = logits.movedim(1, -1)[valid].T[None, :, :, None]  # (1, C, P, 1)
    flat_target = target[valid][None, :, None]
    for name in ["dice", "tversky", "focal"]:
        assert torch.allclose(build_loss(name)(logits, target), build_loss(name)(flat_logits, flat_target), atol=1e-6)
    reference = monai.losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)
    assert torch.allclose(build_loss("dice")(logits, target), reference(flat_logits, flat_target[:, None]), atol=1e-6)


def test_all_pixels_ignored_gives_zero_not_nan():
    logits, target = _example(seed=8)
    target[:] = IGNORE
    for name in BASE_NAMES:
        value = build_loss(name)(logits.requires_grad_(True), target)
        assert value.item() == 0.0


# ---------------------------------------------------------------------------------- partial labels


def _split_background_and(logits, case, pixel, k, shift):
    """Move ``shift`` of logit mass between background and class ``k`` keeping their logsumexp."""
    changed = logits.detach().clone()
    a, b = changed[case, 0][pixel].item(), changed[case, k][pixel].item()
    total = np.logaddexp(a, b)
    new_a = a + shift
    new_b = total + np.log1p(-np.exp(new_a - total))  # solves logaddexp(new_a, new_b) = total
    changed[case, 0][pixel], changed[case, k][pixel] = new_a, new_b
    assert np.logaddexp(new_a, new_b) == pytest.approx(total, abs=1e-6)
    return changed


@pytest.mark.parametrize("name", [f"partial_{n}" for n in BASE_NAMES])
def test_partial_loss_is_blind_to_background_vs_unannotated_split(name):
    logits, target = _example(shape=(2, 3, 4, 5), seed=9)
    target[0][target[0] == 2] = 0  # case 0 does not annotate class 2: such pixels read as background
    target[0, 0, 0], target[0, 0, 1] = 0, 1
    target[1, 0, 0] = IGNORE
    annotated = [(1,), None]
    loss = build_loss(name, include_background=True) if "dice" in name or "tversky" in name else build_loss(name)
    base = loss(logits, target, annotated)
    for pixel in [(0, 0), (0, 1), (2, 3)]:  # a background, a class-1 and a random pixel of case 0
        changed = _split_background_and(logits, 0, pixel, 2, shift=-0.7)
        assert torch.allclose(loss(changed, target, annotated), base, atol=1e-5)

    # Gradient: proportional to (p_0, p_2) at every pixel of case 0, so zero along the split direction.
    logits = logits.requires_grad_(True)
    loss(logits, target, annotated).backward()
    p = torch.softmax(logits.detach(), 1)
    along_split = logits.grad[0, 0] * p[0, 2] - logits.grad[0, 2] * p[0, 0]
    assert along_split.abs().max() < 1e-7
    # ... while the full-annotation loss does tell background and class 2 apart.
    other = build_loss(name.removeprefix("partial_"))
    logits.grad = None
    other(logits, target).backward()
    along_split = logits.grad[0, 0] * p[0, 2] - logits.grad[0, 2] * p[0, 0]
    assert along_split.abs().max() > 1e-4


def test_partial_ce_and_dice_match_hand_marginal():
    logits, target = _example(shape=(1, 3, 4, 4), seed=10)
    target[target == 2] = 0
    annotated = torch.tensor([[True, True, False]])
    p = torch.softmax(logits, 1)
    merged = torch.stack([p[:, 0] + p[:, 2], p[:, 1]], 1)  # background absorbs unannotated class 2
    expected_ce = F.nll_loss(merged.log(), target)
    assert torch.allclose(build_loss("partial_ce")(logits, target, annotated), expected_ce, atol=1e-6)
    # Dice without background: class 2 is left out, class 1 keeps its full-softmax probability.
    dice_1 = monai.losses.DiceLoss(batch=True)(p[:, 1:2], (target == 1).float()[:, None])
    assert torch.allclose(build_loss("partial_dice")(logits, target, annotated), dice_1, atol=1e-6)


@pytest.mark.parametrize("name", BASE_NAMES)
def test_partial_loss_equals_normal_loss_when_all_annotated(name):
    logits, target = _example(seed=11)
    target[1, 0, :3] = IGNORE
    normal = build_loss(name)(logits, target)
    partial = build_loss(f"partial_{name}")
    for annotated in [None, [(1, 2), None], torch.ones(2, 3, dtype=torch.bool)]:
        assert torch.allclose(partial(logits, target, annotated), normal, atol=1e-6)
    # A fully annotated mask is accepted by the normal loss too.
    assert torch.allclose(build_loss(name)(logits, target, [(1, 2), (1, 2)]), normal)


def test_partial_batch_dice_counts_class_only_where_annotated():
    logits, target = _example(shape=(2, 3, 4, 4), seed=12)
    target[1][target[1] == 2] = 0
    annotated = [None, (1,)]
    loss = build_loss("partial_dice", batch=True)(logits, target, annotated)
    p = torch.softmax(logits, 1)
    g = _onehot(target, 3)
    dice_1 = 1 - (2 * (p[:, 1] * g[:, 1]).sum() + 1e-5) / (p[:, 1].sum() + g[:, 1].sum() + 1e-5)
    dice_2 = 1 - (2 * (p[0, 2] * g[0, 2]).sum() + 1e-5) / (p[0, 2].sum() + g[0, 2].sum() + 1e-5)
    assert torch.allclose(loss, (dice_1 + dice_2) / 2, atol=1e-6)


def test_missing_annotations_are_never_background_for_normal_losses():
    logits, target = _example(seed=13)
    target[target == 2] = 0
    with pytest.raises(ConfigError, match="partial_dice_ce"):
        build_loss("dice_ce")(logits, target, [(1,), (1,)])


def test_partial_loss_rejects_labels_of_unannotated_classes():
    logits, target = _example(seed=14)
    target[0, 0, 0] = 2
    with pytest.raises(DataError, match="class 2"):
        build_loss("partial_ce")(logits, target, [(1,), None])
    with pytest.raises(DataError, match="annotated"):
        build_loss("partial_ce")(logits, target, [(1,)])  # one entry for two cases


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name", available_losses())
def test_3d_shapes_work(name):
    logits, target = _example(shape=(2, 3, 3, 4, 4), seed=15)
    target[0, 0, 0, 0] = IGNORE
    logits.requires_grad_(True)
    value = build_loss(name)(logits, target, None)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_3d_dice_matches_monai_and_channel_target_is_accepted():
    logits, target = _example(shape=(1, 4, 3, 4, 4), seed=16)
    reference = monai.losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)
    ours = build_loss("dice")
    assert torch.allclose(ours(logits, target), reference(logits, target[:, None]), atol=1e-6)
    assert torch.equal(ours(logits, target[:, None]), ours(logits, target))


def test_bad_inputs_raise_data_errors():
    logits, target = _example()
    bad = target.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(DataError, match="outside 0..2"):
        build_loss("dice")(logits, bad)
    with pytest.raises(DataError, match="does not match"):
        build_loss("ce")(logits, target[:, :-1])
    with pytest.raises(DataError, match="integer"):
        build_loss("ce")(logits, target.float())
    with pytest.raises(ConfigError, match="class_weights has 2 entries"):
        build_loss("ce", class_weights=[1.0, 2.0])(logits, target)


# -------------------------------------------------------------------------------------- build_loss


def test_build_loss_unknown_name_lists_names():
    with pytest.raises(ConfigError) as error:
        build_loss("dice_bce")
    message = str(error.value)
    assert all(name in message for name in BASE_NAMES) and "partial_" in message
    with pytest.raises(ConfigError, match="select_loss"):
        build_loss("auto")


def test_build_loss_options_are_checked():
    with pytest.raises(ConfigError, match="unknown option.*gama.*accepted: gamma"):
        build_loss("focal", gama=2)
    with pytest.raises(ConfigError, match="partial_ce"):
        build_loss("ce", partial=True)
    with pytest.raises(ConfigError, match="gamma must be >= 0"):
        build_loss("dice_focal", gamma=-1)
    with pytest.raises(ConfigError, match="smooth_dr"):
        build_loss("dice", smooth_dr=0)
    with pytest.raises(ConfigError, match="class_weights"):
        build_loss("ce", class_weights=[1.0, -2.0])
    loss = build_loss("Partial_Dice_CE", lambda_ce=0.5)
    assert loss.name == "partial_dice_ce" and loss.partial and loss.term_weights["ce"] == 0.5


# ------------------------------------------------------------------------------ statistics, select


def test_label_statistics_hand_counts():
    a = np.zeros((4, 5), dtype=np.int64)
    a[0, :2] = 1  # 2 px class 1
    a[1, :] = IGNORE  # 5 px ignored
    b = np.zeros((2, 2, 3), dtype=np.uint8)  # a 3D case without class 1 annotated
    b[0, 0, :] = 2  # 3 px class 2
    stats = label_statistics([a, b], n_classes=3, annotated=[None, (2,)])
    assert stats["n_cases"] == 2 and stats["n_pixels"] == 15 + 12
    assert stats["ignored_fraction"] == pytest.approx(5 / 32)
    assert stats["class_fraction"][1] == pytest.approx(2 / 15)  # only case a annotates class 1
    assert stats["class_fraction"][2] == pytest.approx(3 / 27)
    assert stats["class_fraction"][0] == pytest.approx(22 / 27)
    assert stats["min_foreground_class"] == 2
    assert stats["imbalance_ratio"] == pytest.approx((22 / 27) / (3 / 27))
    assert stats["sparse_cases"] == 1 and stats["sparse"] is True
    assert stats["cases_with_class"] == [2, 1, 1] and stats["annotated_cases"] == [2, 1, 2]
    with pytest.raises(DataError, match="class 1"):
        label_statistics([a, b], n_classes=3, annotated=[(2,), (2,)])
    with pytest.raises(DataError, match="outside"):
        label_statistics([a + 3], n_classes=3)


def _stats(fractions, ratio, sparse_cases=0):
    return {"foreground_fraction": fractions, "imbalance_ratio": ratio, "sparse_cases": sparse_cases, "n_cases": 10}


def test_select_loss_follows_thresholds():
    name, options, reason = select_loss(_stats([0.3, 0.021], 40.0))
    assert (name, options) == ("dice_ce", {})
    assert reason.startswith("foreground fraction 0.021 (class 2), imbalance ratio 40") and reason.endswith("dice_ce")
    assert select_loss(_stats([0.001], 999.0))[:2] == ("dice_ce", {})  # tiny objects in every case
    assert select_loss(_stats([SMALL_FOREGROUND_FRACTION], BALANCED_IMBALANCE_RATIO))[0] == "ce"  # both ">="/"<="
    assert select_loss(_stats([SMALL_FOREGROUND_FRACTION * 0.99], 2.0))[0] == "dice_ce"
    assert select_loss(_stats([0.2, 0.3], BALANCED_IMBALANCE_RATIO + 0.1))[0] == "dice_ce"
    assert select_loss(_stats([None, 0.4], 1.5))[0] == "ce"  # a class no case annotates is skipped
    name, _, reason = select_loss(_stats([0.02], 30.0, sparse_cases=3))
    assert name == "partial_dice_ce" and "3 of 10 cases" in reason


def test_select_loss_weights_a_class_present_in_few_cases():
    big = np.zeros((10, 10), dtype=np.int64)
    big[:5] = 1  # class 1: 50% of every case
    lesion = big.copy()
    lesion[9, :2] = 2  # class 2: 2% of one case
    stats = label_statistics([lesion, lesion, big, big, big], n_classes=3)  # class 2 in 2 of 5 cases
    name, options, reason = select_loss(stats)
    assert name == "dice_ce"
    fractions = [246 / 500, 250 / 500, 4 / 500]
    expected = [round(min(CLASS_WEIGHT_CAP, math.sqrt(max(fractions) / f)), 3) for f in fractions]
    assert options == {"class_weights": expected} and expected == [1.008, 1.0, 7.906]
    assert reason.startswith("class 2 in 2 of 5 cases (< 0.5 of them): dice_ce, ce class weights [1.01, 1, 7.91]")
    build_loss(name, **options)
    # Half the cases or more: no weights; a class in no case at all gets the cap.
    assert select_loss(label_statistics([lesion, lesion, big, big], n_classes=3))[:2] == ("dice_ce", {})
    assert class_weights_from_fractions([0.9, 0.1, 0.0, None]) == [1.0, 3.0, CLASS_WEIGHT_CAP, 1.0]
    # Where the class is annotated decides "few cases": unannotated cases do not count against it.
    name, options, _ = select_loss(label_statistics([lesion, lesion, big, big, big], 3,
                                                    annotated=[None, None, (1,), (1,), (1,)]))
    assert name == "partial_dice_ce" and options == {}


def test_select_loss_is_deterministic_and_checks_input():
    stats = label_statistics([np.array([[0, 0, 1, 2], [0, 0, 0, 2]])], n_classes=3)
    assert select_loss(stats) == select_loss(dict(stats))
    assert select_loss(stats)[0] == "dice_ce"  # fractions 0.125 / 0.25, ratio 5
    with pytest.raises(ConfigError, match="foreground_fraction"):
        select_loss({"imbalance_ratio": 2.0})
    with pytest.raises(DataError):
        select_loss(_stats([None], 1.0))
