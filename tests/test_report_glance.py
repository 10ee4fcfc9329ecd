"""What makes the report readable at a glance: vs-scratch intervals, legends, axis spans, overlay cases."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medxfer.data.base import Case
from medxfer.report import plots
from medxfer.report.overlays import cases_to_show
from medxfer.report.tables import format_difference, versus_scratch


def rows(strategy, length, scheme, n_images, values):
    return [{"dataset": "d", "model": "m", "n train images": n_images, "test set": "target", "strategy": strategy,
             "pretraining length": length, "pretraining scheme": scheme, "freeze encoder": strategy == "frozen_encoder",
             "seed": seed, "dice": value} for seed, value in enumerate(values)]


def test_versus_scratch_pairs_by_seed_with_a_t_interval_and_an_honest_verdict():
    table = pd.DataFrame(rows("scratch", 0.0, "", 5, [0.50, 0.52, 0.48])
                         + rows("full", math.nan, "imagenet", 5, [0.60, 0.65, 0.58])
                         + rows("frozen_encoder", math.nan, "imagenet", 5, [0.49, 0.55, 0.47])
                         + rows("scratch", 0.0, "", 20, [0.7]) + rows("full", math.nan, "imagenet", 20, [0.75]))
    result = versus_scratch(table).set_index(["n train images", "starting point"])
    full = result.loc[(5, "full (imagenet)")]
    diff = np.array([0.10, 0.13, 0.10])
    half = stats.t.ppf(0.975, 2) * diff.std(ddof=1) / math.sqrt(3)
    assert full["difference"] == pytest.approx(diff.mean())
    assert (full["95% CI low"], full["95% CI high"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert full["verdict"] == "better than scratch" and full["n seeds"] == 3
    assert result.loc[(5, "frozen_encoder (imagenet)"), "verdict"] == "within seed noise"
    one = result.loc[(20, "full (imagenet)")]
    assert one["verdict"] == "1 seed: no interval" and math.isnan(one["95% CI low"])
    assert format_difference(one) == "+0.050"
    two = versus_scratch(pd.DataFrame(rows("scratch", 0.0, "", 5, [0.40, 0.60]) + rows("full", 1.0, "", 5, [0.10, 0.95])))
    # a 2-seed t-interval would be [-8.2, +8.6] Dice: none is given
    assert two.iloc[0]["verdict"] == "2 seeds: no interval" and math.isnan(two.iloc[0]["95% CI high"])
    assert format_difference(full) == f"{diff.mean():+.3f} [{diff.mean() - half:+.3f}, {diff.mean() + half:+.3f}]"


def test_a_tiny_difference_is_not_blown_up_to_fill_the_axis():
    table = pd.DataFrame(rows("scratch", 0.0, "", 5, [0.5000, 0.5001]) + rows("scratch", 0.0, "", 10, [0.5001, 0.5002]))
    ax = plots.plot_dice_vs_n_images(table).axes[0]
    low, high = ax.get_ylim()
    assert high - low >= plots.MIN_DICE_SPAN - 1e-9 and low <= 0.5 <= high


def legend_sizes(figure):
    return [len(ax.get_legend().get_texts()) for ax in figure.axes if ax.get_legend() is not None]


def test_many_starting_points_are_split_into_panels_of_at_most_six_lines_with_scratch_in_each():
    table = pd.DataFrame(sum((rows("full", float(length), "simple", n, [0.5 + 0.01 * length])
                              for length in range(1, 10) for n in (5, 10)), [])
                         + rows("scratch", 0.0, "", 5, [0.4]) + rows("scratch", 0.0, "", 10, [0.45]))
    figure = plots.plot_dice_vs_n_images(table)
    sizes = legend_sizes(figure)
    assert len(sizes) == 2 and max(sizes) <= plots.MAX_LEGEND_ENTRIES and sum(sizes) == 9 + 2
    for ax in figure.axes:
        if ax.get_legend() is not None:
            assert any(t.get_text().startswith("scratch") for t in ax.get_legend().get_texts())
            # the legend sits below the axes, never over the data
            assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0 + 1


def test_a_dataset_with_more_scratch_lines_than_fit_one_panel_pairs_each_model_with_its_own_scratch():
    table = pd.DataFrame(sum(([dict(r, model=f"m{i}") for r in rows("scratch", 0.0, "", n, [0.4])]
                              + [dict(r, model=f"m{i}") for r in rows("full", math.nan, "imagenet", n, [0.5])]
                              for i in range(7) for n in (5, 10)), [])
                         + [dict(r, model="lonely") for n in (5, 10) for r in rows("scratch", 0.0, "", n, [0.3])])
    figure = plots.plot_dice_vs_n_images(table)
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figure.axes if ax.get_legend() is not None]
    assert max(map(len, legends)) <= plots.MAX_LEGEND_ENTRIES and sum(map(len, legends)) == 7 * 2 + 1
    for labels in legends:
        models = {label.split(",")[0] for label in labels}
        # every panel shows a model's fine-tuned line together with that model's scratch line, and no other scratch
        assert all(sum(label.startswith(f"{model}, scratch") for label in labels) == 1 for model in models)
    assert any(labels == [label for label in labels if label.startswith("lonely")] for labels in legends)


def test_length_plot_draws_imported_weights_as_reference_lines_and_drops_single_point_lines():
    table = pd.DataFrame(rows("scratch", 0.0, "", 5, [0.4, 0.42]) + rows("scratch", 0.0, "", 20, [0.6])
                         + rows("full", 50.0, "simple", 5, [0.45, 0.47]) + rows("full", 100.0, "simple", 5, [0.5, 0.5])
                         + rows("full", math.nan, "imagenet", 5, [0.55, 0.57])
                         + rows("full", math.nan, "imagenet", 20, [0.7]))
    figure = plots.plot_dice_vs_pretraining_length(table)
    (ax,) = [a for a in figure.axes if a.get_visible()]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == ["full (imagenet), 5 images, 2 seeds", "full, 5 images, 2 seeds"]  # no line for 20
    reference = [line for line in ax.get_lines() if line.get_label() == "full (imagenet), 5 images, 2 seeds"][0]
    assert reference.get_ydata()[0] == pytest.approx(0.56)


def test_overlays_show_the_test_slices_with_the_most_structures_in_dataset_order():
    def case(name, label):
        return Case(image=np.zeros((1, 4, 4), np.float32), label=np.array(label), case_id=name)

    empty = case("empty", np.zeros((4, 4), int))
    one = case("one", np.pad([[1, 1]], ((0, 3), (0, 2))))
    two_small = case("two-small", np.pad([[1, 2]], ((0, 3), (0, 2))))
    two_big = case("two-big", np.pad([[1, 2], [2, 2]], ((0, 2), (0, 2))))
    chosen = cases_to_show([empty, two_small, one, two_big], 2)
    assert [c.case_id for c in chosen] == ["two-small", "two-big"]
    assert [c.case_id for c in cases_to_show([empty, one], 5)] == ["empty", "one"]


def test_table_cells_format_a_whole_number_column_as_integers_and_dice_with_three_decimals():
    from medxfer.report.html import table_html

    table = pd.DataFrame({"pretraining length": [0.0, 50.0, math.nan], "dice": [0.5, 1.0, 0.0],
                          "p value": [0.0012, 0.5, 1.0]})
    cells = [c.split("<")[0] for c in table_html(table).split("<td>")[1:]]
    assert cells == ["0", "0.500", "0.0012", "50", "1.000", "0.500", "n/a", "0.000", "1.000"]


def test_score_plot_leaves_out_sizes_with_a_single_length():
    robustness = pd.DataFrame([{"dataset": "d", "metric": "cosine", "margin": 0.5, "encoder": "e",
                                "pretraining_scheme": "simple", "pooled": True, "level": 4,
                                "pretraining_length": float(length), "robustness": 0.5 - 0.01 * length}
                               for length in (0, 50, 100)])
    table = pd.DataFrame(rows("scratch", 0.0, "", 5, [0.4, 0.42]) + rows("scratch", 0.0, "", 20, [0.6])
                         + rows("full", 50.0, "simple", 5, [0.45]) + rows("full", 100.0, "simple", 5, [0.5]))
    figure = plots.plot_score_vs_dice(table, robustness)
    labels = [t.get_text() for ax in figure.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert len(labels) == 1 and labels[0].startswith("full, 5 images")


def test_the_ladder_verdict_says_when_the_best_length_is_within_seed_noise():
    from medxfer.demo import LADDER_SCHEME, TARGET_NAME, ladder_verdict

    def arm(length, values):
        strategy = "scratch" if length == 0 else "full"
        return [{**r, "dataset": TARGET_NAME, "pretraining scheme": "" if length == 0 else LADDER_SCHEME}
                for r in rows(strategy, float(length), "", 5, values)]

    noisy = pd.DataFrame(arm(0, [0.40, 0.50, 0.45]) + arm(50, [0.48, 0.44, 0.49]) + arm(100, [0.43, 0.47, 0.44]))
    best = pd.DataFrame({"pretraining length": [50, 0, 100]})  # by mean Dice
    p = stats.ttest_rel([0.48, 0.44, 0.49], [0.40, 0.50, 0.45]).pvalue
    assert ladder_verdict(noisy, best, 5) == \
        f"best by mean Dice: 50 steps, within seed noise of 0 steps (paired t-test p = {p:.2f}, 3 seeds)"
    clear = pd.DataFrame(arm(0, [0.40, 0.41, 0.42]) + arm(50, [0.60, 0.62, 0.63]))
    assert "ahead of 0 steps beyond seed noise" in ladder_verdict(clear, best.iloc[:2], 5)
    one = pd.DataFrame(arm(0, [0.40]) + arm(50, [0.60]))
    assert ladder_verdict(one, best.iloc[:2], 5).endswith("1 seed, so not told apart from 0 steps (seed noise unknown)")
