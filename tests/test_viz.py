"""viz: labelled grids, per-class bars and log axes whose tick labels do not collide."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from tutorial_lib.data.fashion_mnist import CLASSES  # noqa: E402
from tutorial_lib.viz import log_axis, per_class_bars, show_grid  # noqa: E402


def test_show_grid_labels_rows_and_columns_and_wraps_a_long_title():
    fig = show_grid(torch.zeros(6, 1, 8, 8), nrow=3, row_labels=["a", "b"], col_labels=["x", "y", "z"],
                    title="a title much longer than a grid three images wide can hold on one line")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert "\n" in ax.get_title()
    plt.close(fig)


@pytest.mark.parametrize("lo, hi, expected", [(0.09, 0.35, ["0.09", "0.1", "0.2", "0.3"]),
                                              (0.03, 3.0, ["0.05", "0.1", "0.2", "0.5", "1", "2"]),
                                              (1e-3, 1e3, ["0.001", "0.01", "0.1", "1", "10", "100", "1000"])])
def test_log_axis_labels_plain_numbers_and_no_minor_ticks(lo, hi, expected):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [lo, hi])
    log_axis(ax)
    fig.canvas.draw()
    lo_lim, hi_lim = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if lo_lim <= t.get_position()[1] <= hi_lim]
    assert ax.get_yscale() == "log"
    assert [x for x in labels if x] == expected
    assert isinstance(ax.yaxis.get_minor_formatter(), NullFormatter)
    plt.close(fig)


def test_per_class_bars_draws_one_bar_per_class_and_model():
    ax = per_class_bars({"a": dict.fromkeys(CLASSES, 0.9),
                         "b": dict(zip(CLASSES, torch.linspace(0.5, 1, 10).tolist()))}, "t")
    assert len(ax.patches) == 20
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert ax.get_ylim()[0] == 45  # 5 below the lowest bar, rounded down to a multiple of 5
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    plt.close(ax.figure)
