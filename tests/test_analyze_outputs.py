"""Analysis outputs on small curves built here: the figure of every group's Dice against pretraining length
(small multiples with seed bands and the no-pretraining point), the correlation table over one length set, and
the "settled" rule for a score curve."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from medxfer.report.analyze.curves import score_settling, settling_length  # noqa: E402
from medxfer.report.analyze.evidence import Evidence  # noqa: E402
from medxfer.report.analyze.figures import _length_ticks, dice_vs_length, panel_grid  # noqa: E402
from medxfer.report.analyze.outputs import correlation_table  # noqa: E402
from medxfer.report.analyze.result import AnalysisResult  # noqa: E402
from medxfer.report.rules import GroupCurves  # noqa: E402

DEEPEST = ("cosine", 0.5, -1, True)


def _group(model, dataset, frozen, lengths=(1, 10, 100), scheme="advanced", score=None, base=0.8):
    lengths = np.array(lengths, dtype=float)
    by_seed = base + 0.01 * np.log1p(lengths)[:, None] + np.array([[-0.002, 0.0, 0.003]])
    scores = {} if score is None else {"cosine margin=0.5 level=3 pooled": np.asarray(score, dtype=float)}
    return GroupCurves(model=model, dataset=dataset, pretraining_scheme=scheme, freeze_encoder=frozen,
                       encoder_key=model.lower(), dataset_key=dataset.lower(), scheme_key=scheme, lengths=lengths,
                       dice=by_seed.mean(axis=1), dice_by_seed=by_seed, seeds=("0", "1", "2"),
                       imagenet_accuracy=lengths / lengths.max(), scores=scores)


def _panels(fig):
    return [ax for ax in fig.axes if ax.axison]


def test_every_group_gets_its_panel_in_a_model_by_dataset_grid_with_a_seed_band():
    groups = [_group("Swin", "ACDC", True), _group("Swin", "ACDC", False), _group("ResNet", "IDRiD", False),
              _group("ResNet", "ACDC", False), _group("ResNet", "ACDC", True)]
    rows, columns, place = panel_grid(groups)
    assert rows == [("ResNet", "advanced"), ("Swin", "advanced")]
    assert columns == [("ACDC", False), ("ACDC", True), ("IDRiD", False)]  # fine-tuned before frozen
    assert place[0] == (1, 1) and place[2] == (0, 2)
    fig = dice_vs_length(groups, plt)
    try:
        panels = _panels(fig)
        assert len(fig.axes) == 6 and len(panels) == len(groups)  # the empty cell (Swin, IDRiD) is off
        for ax in panels:
            model_scheme, dataset_state = ax.get_title().split("\n")
            group = next(g for g in groups if f"{g.model} | {g.pretraining_scheme}" == model_scheme
                         and dataset_state == f"{g.dataset} | {'frozen' if g.freeze_encoder else 'fine-tuned'}")
            line = ax.get_lines()[0]
            assert np.allclose(line.get_xdata(), group.lengths) and np.allclose(line.get_ydata(), group.dice)
            band = [c for c in ax.collections if isinstance(c, PolyCollection)]
            assert len(band) == 1
            vertices = band[0].get_paths()[0].vertices
            assert np.isclose(vertices[:, 1].min(), group.dice_by_seed.min())  # lowest seed
            assert np.isclose(vertices[:, 1].max(), group.dice_by_seed.max())  # highest seed
            assert ax.get_xscale() == "symlog" and ax.get_xlim() == panels[0].get_xlim()  # one length axis
        assert "all 5 groups" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_no_pretraining_is_a_marker_of_its_own_also_where_its_scores_were_left_out():
    with_zero = _group("ResNet", "COVID", False, lengths=(0, 1, 10, 100))  # length 0 scored: in the curve
    left_out = _group("ResNet", "ACDC", False)  # length 0 only in the downstream table
    without = _group("ResNet", "IDRiD", False)
    table = pd.DataFrame([{"model": "ResNet", "dataset": "ACDC", "pretraining_scheme": "advanced",
                           "freeze_encoder": False, "dice_at_0": 0.7, "dice_at_0_low": 0.69, "dice_at_0_high": 0.72}])
    fig = dice_vs_length([with_zero, left_out, without], plt, no_pretraining=table)
    try:
        by_dataset = {ax.get_title().split("\n")[1].split(" | ")[0]: ax for ax in _panels(fig)}

        def zero_marker(ax):
            points = [line for line in ax.get_lines() if line.get_marker() == "D"]
            return (float(points[0].get_xdata()[0]), float(points[0].get_ydata()[0])) if points else None

        assert zero_marker(by_dataset["ACDC"]) == (0.0, 0.7)
        assert zero_marker(by_dataset["COVID"]) == (0.0, pytest.approx(with_zero.dice[0]))
        assert zero_marker(by_dataset["IDRiD"]) is None
        # The line joins the pretrained lengths only: length 0 is another kind of start (a random encoder).
        assert by_dataset["COVID"].get_lines()[0].get_xdata().min() == 1
        assert by_dataset["ACDC"].get_xlim()[0] < 0 < by_dataset["ACDC"].get_xlim()[1]
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels[-1] == "no pretraining (length 0), seed range"
    finally:
        plt.close(fig)


def test_a_sparse_or_wide_grid_flows_in_rows_of_six():
    groups = [_group(f"model{i}", f"data{i}", False) for i in range(7)]  # 7 x 7 cells for 7 groups
    rows, columns, place = panel_grid(groups)
    assert rows == [] and columns == [] and place[6] == (1, 0)
    fig = dice_vs_length(groups, plt)
    try:
        assert len(_panels(fig)) == 7 and len(fig.axes) == 12
    finally:
        plt.close(fig)


def test_length_ticks_are_zero_powers_of_ten_and_the_longest():
    assert _length_ticks([0, 1, 5, 20, 50, 100, 300]) == [0, 1, 10, 100, 300]
    assert _length_ticks([10, 50, 100, 120]) == [10, 100]  # 120 is too close to 100 for a tick of its own
    assert _length_ticks([0, 20, 40]) == [0, 20, 40]


def test_settling_length_is_where_the_last_large_step_ends():
    lengths = [1, 2, 3, 4, 5]
    values = [5.0, 1.0, 0.9, 0.92, 0.91]  # range 4.1; steps 4, 0.1, 0.02, 0.01
    assert settling_length(lengths, values, 0.1) == 2  # 0.1 < 0.41: settled once the first step is done
    assert settling_length(lengths, values, 0.01) == 3  # 0.1 > 0.041, 0.02 < 0.041
    assert settling_length(lengths, values, 0.0) == 5  # any step counts: settles at the last length only
    assert settling_length(lengths, [2.0] * 5, 0.1) == 1  # constant: settled from the start
    assert settling_length(lengths, [0.0, 0.0, 0.0, 0.0, 1.0], 0.5) == 5  # still moving at the end
    # The range is the curve's own: scaling the score does not move the answer.
    assert settling_length(lengths, np.array(values) * 1000, 0.01) == 3
    with pytest.raises(ValueError, match="tolerance"):
        settling_length(lengths, values, 1.5)
    with pytest.raises(ValueError, match="one size"):
        settling_length(lengths, values[:3], 0.1)
    with pytest.raises(ValueError, match="finite"):
        settling_length(lengths, [1.0, np.nan, 0.0, 0.0, 0.0], 0.1)


def test_score_settling_summarises_the_deepest_level_over_groups_without_length_0():
    groups = [
        _group("A", "x", False, lengths=(1, 10, 100, 300), score=[4.0, 1.0, 1.05, 1.0]),  # settles at 10
        _group("B", "x", False, lengths=(1, 10, 100, 300), score=[4.0, 3.0, 1.0, 1.02]),  # at 100
        _group("C", "x", False, lengths=(0, 1, 10, 100, 300), score=[9.0, 4.0, 3.5, 3.0, 1.0]),  # at 300
        _group("D", "x", False, lengths=(1, 10, 100, 300)),  # no score: not counted
    ]
    summary = score_settling(groups, DEEPEST, 0.1, min_length=1)
    assert summary["n_groups"] == 3 and summary["median"] == 100 and summary["not_settled"] == 1
    assert (summary["q25"], summary["q75"]) == (55, 200)
    # With length 0 in C's curve its range grows, and its last step (2.0) is still above 0.1 x 8.
    assert score_settling(groups, DEEPEST, 0.1)["not_settled"] == 1
    assert score_settling([groups[3]], DEEPEST, 0.1)["n_groups"] == 0


def _result(groups, lengths, best_variant="cosine margin=0.5 level=3 pooled"):
    empty = pd.DataFrame()
    evidence = Evidence(np.asarray(lengths, dtype=float), empty, {}, empty, empty, {}, empty)
    return AnalysisResult(empty, empty, empty, empty, [], groups, None, best_variant, evidence=evidence)


def test_correlation_table_uses_the_lengths_every_group_has_and_says_the_score_is_negated():
    lengths = (0, 1, 10, 100, 300)
    # Dice rises with length except at 0; the score (a distance, lower = better) falls with length except at 0.
    scored_at_0 = _group("ResNet", "COVID", False, lengths=lengths, score=[1.5, 0.9, 0.8, 0.7, 0.6])
    scored_at_0.dice[0] = 0.99
    other = _group("ResNet", "ACDC", False, lengths=lengths[1:], score=[0.9, 0.8, 0.7, 0.6])
    table = correlation_table(_result([scored_at_0, other], lengths[1:]))
    # One row per predictor, model, scheme and encoder state (here one of each), one column per dataset.
    assert list(table["predictor"]) == ["ImageNet accuracy", "cosine margin=0.5 level=3 pooled"]
    assert list(table.columns[:6]) == ["predictor", "score_negated", "model",
                                                          "pretraining_scheme", "freeze_encoder", "lengths"]
    assert set(table["lengths"]) == {"1 10 100 300"} and list(table["score_negated"]) == [False, True]
    # Over 1-300 both rank the lengths exactly as Dice does; with length 0 (a random encoder scored, Dice 0.99)
    # COVID's cell would not be 1.
    assert np.allclose(table[["ACDC", "COVID", "mean"]].to_numpy(float), 1.0)
    own = correlation_table(_result([scored_at_0, other], [1, 10]))  # too few common lengths: each group's own
    assert set(own["lengths"]) == {"each group's own"}
    assert own.set_index("predictor").loc["cosine margin=0.5 level=3 pooled", "COVID"] < 1


def test_best_of_n_counts_the_variants_a_selection_could_choose_from():
    from dataclasses import replace

    from medxfer.report.analyze.outputs import selection_pool

    def scored(model, dataset, constant=()):
        falling = np.array([0.9, 0.8, 0.7])
        return replace(_group(model, dataset, False),
                       scores={v: (np.full(3, 0.5) if v in constant else falling + i) for i, v in enumerate("abc")})

    groups = [scored("A", "x"), scored("B", "x", constant=("c",)), scored("A", "y"), scored("B", "y")]
    summary = pd.DataFrame({"family": ["score"] * 4 + ["baseline"], "rule": ["a | argmin", "b | argmin", "c | argmin",
                                                                             "a | patience=1", "always longest"]})
    result = _result(groups, [1, 10, 100])
    result.summary = summary
    # c is constant in one group: no in-sample selection over every group can pick it. Held out, the folds
    # that hold out x (training on y) decide B|x on a, b only and A|x on a, b, c.
    assert selection_pool(result) == {"in-sample": "2", "leave-one-dataset-out": "2-3"}
    result.groups = groups[:1]
    assert selection_pool(result) == {"in-sample": "3"}  # one dataset: nothing is held out
