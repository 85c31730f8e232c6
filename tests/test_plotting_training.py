"""The training-figure functions: each run's method as data (never parsed from its label),
colours, smoothing, and every plot on toy runs."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tvae_core import plotting  # noqa: E402
from tvae_core.config import ObjectiveConfig, RunConfig  # noqa: E402
from tvae_core.methods import get_method  # noqa: E402

# the methods of the toy runs below, as data: label -> registry name, entry or label
METHODS = {"FB 4": "fb", "FB 8": get_method("fb"), "MDR 4": "MDR", "MDR 8": "mdr"}


def test_shades_and_run_styles():
    assert plotting.shades("#D55E00", 1) == ["#d55e00"]
    five = plotting.shades("#D55E00", 5)
    assert len(set(five)) == 5
    styles = plotting.run_styles(["VAE", "FB 4", "FB 8", "MDR 4"], methods=METHODS)
    assert styles["VAE"]["color"] == plotting.METHOD_COLOURS["VAE"].lower()
    assert styles["FB 4"]["color"] != styles["FB 8"]["color"]
    assert styles["FB 4"]["method"] == "FB" and styles["MDR 4"]["method"] == "MDR"
    assert styles["MDR 4"]["marker"] == plotting.METHOD_MARKERS["MDR"]


def test_runs_of_one_method_differ_by_marker_fill_in_the_training_curves():
    # three VAEs (page 01's, by decoder strength) share the VAE's marker: told apart by more than a shade
    labels = ["VAE", "VAE, word dropout 0.5", "VAE, word dropout 1"]
    ax = plotting.plot_training_curves({label: _history() for label in labels}, methods=dict.fromkeys(labels, "vae"))
    validation = [line for line in ax.get_lines() if line.get_marker() not in (None, "None", "")]
    assert [line.get_fillstyle() for line in validation] == ["full", "none", "left"]
    assert len({line.get_marker() for line in validation}) == 1
    plt.close("all")


@pytest.mark.parametrize("label", ["VAE", "AE", "MDR", "CYC-FB", "LM", "cyc_fb"])
def test_a_registry_label_or_name_needs_no_methods(label):
    style = plotting.run_styles([label])[label]
    assert style["method"] == get_method(label).label
    assert style["marker"] == get_method(label).marker


@pytest.mark.parametrize("label", ["FB 16", "VAE, word dropout 1", "something else", "vae 2"])
def test_a_label_that_names_no_method_and_is_not_in_methods_is_refused(label):
    # labels are never parsed: "FB 16" looks like free bits but says so only through methods=
    with pytest.raises(ValueError, match=f"run label '{label}' names no method: pass methods="):
        plotting.run_styles(["VAE", label], methods={"other run": "fb"})
    with pytest.raises(ValueError, match="names no method"):
        plotting.plot_training_curves({label: _history()})
    plt.close("all")


def test_an_unusual_label_gets_its_method_from_methods():
    config = RunConfig(objective=ObjectiveConfig(name="mdr", target_rate=8.0), label="my run")
    run = type("Run", (), {"config": config})()   # anything with a .config, as a trained Run
    for method in (run, config, config.objective, get_method("mdr"), "mdr", "MDR"):
        style = plotting.run_styles(["my run"], methods={"my run": method})["my run"]
        assert style == {"color": get_method("mdr").colour.lower(), "marker": get_method("mdr").marker,
                         "method": "MDR", "fillstyle": "full"}
    # the method, not the label, decides: a run called "VAE" trained with MDR is drawn as MDR
    assert plotting.run_styles(["VAE"], methods={"VAE": config})["VAE"]["method"] == "MDR"
    ax = plotting.plot_training_curves({"my run": _history()}, methods={"my run": run})
    assert ax.get_lines()[0].get_color() == get_method("mdr").colour.lower()
    plt.close("all")


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
    table = pd.DataFrame(rows, index=["method", "target_rate", "rate", "distortion"]).T  # method: data
    table[["target_rate", "rate", "distortion"]] = table[["target_rate", "rate", "distortion"]].astype(float)
    table["elbo"] = -(table["rate"] + table["distortion"])
    return table


def test_every_figure_draws():
    plotting.set_style()
    histories = {"VAE": _history(), "MDR 4": _history(mdr=True), "MDR 8": _history(mdr=True)}
    table = _table()
    fig, axes = plotting.new_figure("panel", ncols=4, nrows=2)
    axes = axes.flat
    assert plotting.plot_training_curves(histories, "rate", ax=next(axes), window=5, logy=True,
                                         methods=METHODS) is not None
    plotting.plot_rate_distortion_plane(table, ax=next(axes), reference="VAE")
    plotting.plot_elbo_vs_rate(table.drop(columns="method"), ax=next(axes), reference="VAE", methods=METHODS)
    plotting.plot_achieved_vs_target(table, ax=next(axes), reference={"FB": {4.0: 2.7, 8.0: 6.2}})
    plotting.plot_multiplier_trajectories({k: v for k, v in histories.items() if k != "VAE"}, ax=next(axes),
                                          methods=METHODS)
    plotting.plot_rate_against_target(histories, {"MDR 4": 4.0, "MDR 8": 8.0}, ax=next(axes), methods=METHODS)
    plotting.plot_kl_per_dimension({"VAE": [0.0, 0.01, 0.2], "FB 4": [1.0, 2.0, 1.0]}, ax=next(axes),
                                   active={"VAE": 1, "FB 4": 3}, methods=METHODS)
    ax = plotting.plot_run_dots({"ELBO": {"VAE": -101.0, "LM": -100.0}, "IW": {"VAE": -100.5, "LM": -100.0}},
                                ax=next(axes), errors={"IW": {"VAE": 0.5}}, reference=(-100.0, "LM"))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["LM", "VAE"]
    # the iso-ELBO line through the VAE has slope -1 and passes through its point
    rd_ax = fig.axes[1]
    line = [l for l in rd_ax.get_lines() if l.get_label().startswith("$D + R$")][0]
    x, y = line.get_data()
    assert np.allclose(np.asarray(x) + np.asarray(y), 100.1)
    plt.close(fig)


def test_a_table_without_a_method_column_takes_methods():
    table = _table().drop(columns="method")
    with pytest.raises(ValueError, match="run label 'FB 4' names no method"):
        plotting.plot_rate_distortion_plane(table)
    ax = plotting.plot_achieved_vs_target(table, methods=METHODS)
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"FB", "MDR"}
    plt.close("all")


def test_the_latent_figures_take_methods_and_keep_the_prior():
    labels = ["VAE", "my run", "prior", "prior (calibration)"]
    methods = {"my run": "fb"}
    ax = plotting.plot_versus_rate([0.1, 4.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.1], labels, methods=methods)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"VAE", "FB", "prior"}
    with pytest.raises(ValueError, match="run label 'my run' names no method"):
        plotting.plot_versus_rate([0.1, 4.0], [0.0, 1.0], ["VAE", "my run"])
    # an open marker at the spot of a filled one (page 04: the thesis-multiplier MDR) is drawn over it
    ax = plotting.plot_versus_rate([4.0, 4.0], [1.0, 1.0], ["MDR 4", "MDR 16 (thesis)"], hollow=[False, True],
                                   methods={"MDR 4": "mdr", "MDR 16 (thesis)": "mdr"})
    filled, hollow = ax.collections
    assert hollow.get_zorder() > filled.get_zorder() and hollow.get_sizes()[0] > filled.get_sizes()[0]
    assert len(hollow.get_facecolors()) == 0 or hollow.get_facecolors()[0][3] == 0   # open
    # on symlog axes the rate axis starts just below 0, with no negative ticks (a rate is >= 0)
    ax = plotting.plot_versus_rate([0.0, 4.0, 150.0], [-1.0, 1.0, 20.0], ["prior", "VAE", "AE"], symlog=True)
    assert ax.get_xlim()[0] < 0 and min(ax.xaxis.get_major_locator()()) == 0.0
    assert min(ax.yaxis.get_major_locator()()) < 0      # an estimate below 0 keeps its negative ticks
    ax = plotting.plot_kl_decomposition_by_run(["VAE", "my run"], [0.0, 1.0], [0.1, 2.0], methods=methods)
    colours = {t.get_text(): t.get_color() for t in ax.get_yticklabels()}
    assert colours["my run"] == plotting.METHOD_COLOURS["FB"]
    rng = np.random.default_rng(0)
    latents = {"my run": (rng.normal(size=(50, 2)), rng.normal(size=(50, 2)), np.ones((50, 2)))}
    axes = plotting.plot_latent_histograms(latents, [0, 1], num_posteriors=1, methods=methods)
    assert axes.shape == (1, 2)
    plt.close("all")


def test_target_labels_of_two_methods_at_one_point_do_not_overprint():
    import pandas as pd

    from tvae_core.plotting import new_figure, plot_rate_distortion_plane

    table = pd.DataFrame({"rate": [20.0, 20.0], "distortion": [115.0, 115.0], "target_rate": [24.0, 24.0],
                          "elbo": [-135.0, -135.0], "method": ["FB", "CYC-FB"]}, index=["FB 24", "CYC-FB 24"])
    fig, axes = new_figure("single")
    plot_rate_distortion_plane(table, ax=axes[0, 0])
    labels = [t for t in axes[0, 0].texts if t.get_text() == "24"]
    assert len(labels) == 2 and labels[0].xyann != labels[1].xyann
