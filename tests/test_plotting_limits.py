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
