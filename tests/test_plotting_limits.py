"""Points at their estimator's limit get an arrow and one legend entry (tvae_core.plotting.limits)."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from tvae_core.plotting.limits import mark_at_limit  # noqa: E402


def test_only_points_at_their_limit_get_an_arrow_and_the_legend_says_what_they_mean():
    fig, ax = plt.subplots()
    ax.set_yscale("symlog", linthresh=10)
    mark_at_limit(ax, [1, 2, 3], [5.0, 8.2, 8.2], [False, True, True], "up", "at ceiling log N: a lower bound")
    arrows = [t for t in ax.texts if t.arrow_patch is not None]
    assert len(arrows) == 2 and all(a.xy[1] == 8.2 for a in arrows)
    _, names = ax.get_legend_handles_labels()
    assert names == ["at ceiling log N: a lower bound"]
    fig2, ax2 = plt.subplots()
    mark_at_limit(ax2, [1], [1.0], [False], "down", "at floor")
    assert not ax2.texts and ax2.get_legend_handles_labels()[1] == []
    with pytest.raises(ValueError, match="direction"):
        mark_at_limit(ax2, [1], [1.0], [True], "sideways", "x")
    plt.close(fig)
    plt.close(fig2)


@pytest.mark.parametrize("low, high, linthresh", [(-5, 100, 10.0), (-1000, 100, 10.0), (0, 0.8, 0.1),
                                                   (-600, 120, 1.0), (0, 40, 1e-2)])
def test_symlog_ticks_never_crowd_and_keep_zero_and_powers_of_ten_first(low, high, linthresh):
    from tvae_core.plotting.style import symlog_axis

    fig, ax = plt.subplots()
    symlog_axis(ax, "x", linthresh=linthresh)
    ax.set_xlim(low, high)
    ticks = ax.xaxis.get_major_locator()()
    scale = ax.xaxis.get_transform()
    places = (scale.transform(ticks) - scale.transform([low])[0]) / (scale.transform([high])[0] - scale.transform([low])[0])
    assert len(ticks) >= 2 and all(low <= t <= high for t in ticks)
    assert min(b - a for a, b in zip(places, places[1:])) >= 0.08 - 1e-12     # a tenth-ish of the axis apart
    assert low > 0 or 0.0 in ticks                                           # 0 whenever it is in view
    # powers of ten are placed before any 5 or 2, so at least one of them is on the axis
    assert not (set(ticks) - {0.0}) or any(abs(t) in (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0) for t in ticks)
    plt.close(fig)


@pytest.mark.parametrize("width_inches", [1.6, 2.4, 6.0])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_symlog_tick_labels_never_overlap_at_the_panels_size(width_inches, axis):
    # page 04's panels: rates from 0 to ~150 nats on a symlog axis linear within 10; on a narrow
    # panel "50" and "100" ran into each other
    from tvae_core.plotting.style import symlog_axis

    fig, ax = plt.subplots(figsize=(width_inches, width_inches))
    symlog_axis(ax, axis, linthresh=10.0)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(-5, 150)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    boxes = [label.get_window_extent(renderer) for label in labels if label.get_text()]
    assert len(boxes) >= 3
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), [label.get_text() for label in labels]
    plt.close(fig)


def test_a_wide_symlog_axis_keeps_the_fives_a_narrow_one_drops():
    from tvae_core.plotting.style import symlog_axis

    ticks = {}
    for width in (1.6, 8.0):
        fig, ax = plt.subplots(figsize=(width, 2.0))
        symlog_axis(ax, "x", linthresh=10.0)
        ax.set_xlim(-5, 150)
        ticks[width] = ax.xaxis.get_major_locator()()
        plt.close(fig)
    assert 50.0 in ticks[8.0] and 100.0 in ticks[8.0]
    assert 100.0 in ticks[1.6] and 50.0 not in ticks[1.6]
