"""The MI-bound bars (tvae_core.plotting.bounds): tick labels that never run into each other."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from tvae_core import plotting  # noqa: E402
from tvae_core.exact import LinearGaussianLVM  # noqa: E402
from tvae_core.pathological import constant_elbo_path  # noqa: E402


def _decompositions():
    base = LinearGaussianLVM.fitted(latent_dim=8, data_dim=16, seed=0)
    path = constant_elbo_path(base, 4.0)
    models = [path.models[0], path.models[-1], LinearGaussianLVM.mismatched(), LinearGaussianLVM.collapsed()]
    return [m.bound_decomposition() for m in models]


@pytest.mark.parametrize("nrows", [1, 2])       # notebook 05's row of two panels, notebook 00's grid
@pytest.mark.parametrize("index", range(4))
def test_the_mi_row_labels_do_not_overlap_and_name_every_tick(index, nrows):
    plotting.set_style()
    fig, axes = plotting.new_figure("bar", ncols=2, nrows=nrows)
    ax = axes.flat[index % (2 * nrows)]
    plotting.plot_bound_decomposition(_decompositions()[index], ax=ax, legend=False)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if "I_q" in t.get_text() or "H-D" in t.get_text() or "$R$" in t.get_text()]
    text = " ".join(t.get_text() for t in labels)
    assert all(name in text for name in ("$H-D$", "$I_q$", "$R$"))          # every tick is named once
    # a gap of 4 points at least: a browser renders the SVG's text in its own font, a little wider
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda box: box.x0)
    assert all(b.x0 - a.x1 >= 4.0 for a, b in zip(boxes, boxes[1:]))
    plt.close(fig)


@pytest.mark.parametrize("exact", [True, False])
def test_the_runs_plot_writes_h_hat_when_the_entropy_is_a_proxy(exact):
    """Notebook 03's runs use a language model's cross-entropy for H: the legend must say H-hat - D."""
    from tvae_core.estimators import mi_bound_decomposition

    runs = {f"run {k}": mi_bound_decomposition(100.0, 90.0 + k, 8.0, 5.0, 3.0, entropy_is_exact=exact)
            for k in range(3)}
    fig, ax = plt.subplots()
    plotting.plot_mi_bounds_by_run(runs, ax=ax, ceiling=6.0)
    labels = set(ax.get_legend_handles_labels()[1])
    assert ("$H - D$" in labels) == exact and (r"$\hat H - D$" in labels) == (not exact)
    assert {"$I_q$", "$R$"} <= labels
    plt.close(fig)
