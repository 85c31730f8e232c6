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
