"""The training-figure functions: label parsing, colours, smoothing, and every plot on toy runs."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tvae_core import plotting  # noqa: E402


@pytest.mark.parametrize("label, method", [
    ("VAE", "VAE"), ("AE", "AE"), ("CYC", "CYC"), ("FB 16", "FB"), ("MDR 4", "MDR"),
    ("CYC-FB 32", "CYC-FB"), ("FB 8 (batch_dim)", "FB"), ("VAE, word dropout 1", "VAE"), ("LM", "LM"),
    ("something else", "something else"),
])
def test_method_of_label(label, method):
    assert plotting.method_of_label(label) == method


def test_shades_and_run_styles():
    assert plotting.shades("#D55E00", 1) == ["#d55e00"]
    five = plotting.shades("#D55E00", 5)
    assert len(set(five)) == 5
    styles = plotting.run_styles(["VAE", "FB 4", "FB 8", "MDR 4"])
    assert styles["VAE"]["color"] == plotting.METHOD_COLOURS["VAE"].lower()
    assert styles["FB 4"]["color"] != styles["FB 8"]["color"]
    assert styles["MDR 4"]["marker"] == plotting.METHOD_MARKERS["MDR"]


def test_smooth_keeps_constants_and_length():
    values = np.full(10, 3.0)
    np.testing.assert_allclose(plotting.smooth(values, 4), values)  # no shrinkage at the edges
    ramp = np.arange(7.0)
    assert plotting.smooth(ramp, 1).tolist() == ramp.tolist()
    assert plotting.smooth(ramp, 50).shape == ramp.shape


def _history(steps=20, mdr=False):
    train = [{"step": t, "rate": 1.0 + 0.1 * t, "distortion": 100.0 - t, "elbo": -101.0} for t in range(steps)]
    if mdr:
        for row in train:
            row["mdr_lambda"] = max(0.0, 1.0 - 0.05 * row["step"])
    valid = [{"step": 10, "rate": 1.5, "distortion": 95.0}, {"step": 20, "rate": 2.0, "distortion": 90.0}]
    return {"train": train, "valid": valid}


def _table():
    rows = {
        "VAE": ("VAE", np.nan, 0.1, 100.0), "CYC": ("CYC", np.nan, 1.0, 99.5),
        "FB 4": ("FB", 4.0, 3.0, 98.0), "FB 8": ("FB", 8.0, 6.5, 96.0),
        "MDR 4": ("MDR", 4.0, 4.1, 97.5), "MDR 8": ("MDR", 8.0, 8.0, 95.5),
    }
    table = pd.DataFrame(rows, index=["method", "target_rate", "rate", "distortion"]).T
    table[["target_rate", "rate", "distortion"]] = table[["target_rate", "rate", "distortion"]].astype(float)
    table["elbo"] = -(table["rate"] + table["distortion"])
    return table


def test_every_figure_draws():
    plotting.set_style()
    histories = {"VAE": _history(), "MDR 4": _history(mdr=True), "MDR 8": _history(mdr=True)}
    table = _table()
    fig, axes = plotting.new_figure("panel", ncols=4, nrows=2)
    axes = axes.flat
    assert plotting.plot_training_curves(histories, "rate", ax=next(axes), window=5, logy=True) is not None
    plotting.plot_rate_distortion_plane(table, ax=next(axes), reference="VAE")
    plotting.plot_elbo_vs_rate(table, ax=next(axes), reference="VAE")
    plotting.plot_achieved_vs_target(table, ax=next(axes), reference={"FB": {4.0: 2.7, 8.0: 6.2}})
    plotting.plot_multiplier_trajectories({k: v for k, v in histories.items() if k != "VAE"}, ax=next(axes))
    plotting.plot_rate_against_target(histories, {"MDR 4": 4.0, "MDR 8": 8.0}, ax=next(axes))
    plotting.plot_kl_per_dimension({"VAE": [0.0, 0.01, 0.2], "FB 4": [1.0, 2.0, 1.0]}, ax=next(axes),
                                   active={"VAE": 1, "FB 4": 3})
    ax = plotting.plot_run_dots({"ELBO": {"VAE": -101.0, "LM": -100.0}, "IW": {"VAE": -100.5, "LM": -100.0}},
                                ax=next(axes), errors={"IW": {"VAE": 0.5}}, reference=(-100.0, "LM"))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["LM", "VAE"]
    # the iso-ELBO line through the VAE has slope -1 and passes through its point
    rd_ax = fig.axes[1]
    line = [l for l in rd_ax.get_lines() if l.get_label().startswith("$D + R$")][0]
    x, y = line.get_data()
    assert np.allclose(np.asarray(x) + np.asarray(y), 100.1)
    plt.close(fig)
