"""Figures of the latent space of trained runs and of the quantities measured on it.

* latent histograms: samples of q(z) per dimension against the prior N(0, 1), with a few
  individual posteriors q(z|x_n) drawn (thesis, slide 33);
* the mixed membership model: mixing-weight heatmaps (slide 34) and per-group estimates against
  the rate, one colour and marker per method (slide 35);
* per-run summaries: the MI bounds H - D <= I_q <= R with their gaps, and the marginal KL split
  into total correlation and dimension-wise KL;
* the exact ELBO landscape of a linear-Gaussian VAE along a pathological direction (slide 38).

Every function takes an ``ax`` (or ``axes``) and makes one with :func:`.new_figure` when None.
Functions that colour runs by method take ``methods`` (label -> the run, its ``RunConfig`` or its
method; see :func:`.training.run_styles`): a run's method is data, never parsed from its label.
The mixed membership model's prior groups (``"prior"``, ``"prior (calibration)"``) are no method
and have a colour of their own.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import seaborn as sns
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap

from .style import (COLUMN_WIDTH, METHOD_COLOURS, METHOD_MARKERS, OKABE_ITO, TERM_COLOURS, TERM_LABELS, finish_axes,
                    new_figure, symlog_axis)
from .training import _method_of_run

WEIGHT_COLOUR_MAP = "mako_r"       # mixing weights in [0, 1]: light = 0, dark = 1
LANDSCAPE_COLOUR_MAP = "viridis"   # ELBO contours
POSTERIOR_COLOUR = "#000000"       # individual posteriors q(z|x_n) drawn over a histogram
PRIOR_LINE = dict(color=METHOD_COLOURS["prior"], lw=1.5, ls="--")
_LINE_MARKERS = ("x", "+", "|", "_", "1", "2", "3", "4")


def _series_method(label: str, methods: Mapping[str, object] | None) -> str:
    """The method label of a run (:func:`.training.run_styles`' rule; ValueError for a label that
    names no method and is not in ``methods``), or ``"prior"`` for the mixed membership model's
    prior groups (``"prior"``, ``"prior (calibration)"``)."""
    return "prior" if label.startswith("prior") else _method_of_run(label, methods).label


def _colour(label: str, methods: Mapping[str, object] | None) -> str:
    return METHOD_COLOURS[_series_method(label, methods)]


def _marker(label: str, methods: Mapping[str, object] | None) -> str:
    return METHOD_MARKERS[_series_method(label, methods)]


def _colour_tick_labels(ticks, methods: Mapping[str, object] | None) -> None:
    # run names on an axis in their method's colour, when the runs' methods are given
    if methods is not None:
        for tick in ticks:
            tick.set_color(_colour(tick.get_text(), methods))


def _normal_density(grid: np.ndarray, loc: float, scale: float) -> np.ndarray:
    return np.exp(-0.5 * ((grid - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))


# ------------------------------------------------------------------------------ latent histograms
def plot_latent_histogram(samples, loc=None, scale=None, ax=None, num_posteriors: int = 4,
                          colour: str | None = None, bins: int = 40, title: str | None = None,
                          xlim: tuple[float, float] = (-4.0, 4.0), seed: int = 0):
    """One latent dimension: a density histogram of ``samples`` (z_d ~ q(z_d), ``[N]``), the prior
    N(0, 1) dashed, and ``num_posteriors`` individual posteriors N(loc_n, scale_n^2) drawn at their
    true density (``loc``, ``scale``: ``[N]``; posteriors chosen at random with ``seed``).

    The y-axis is set by the histogram and the prior, so a posterior much narrower than the prior
    runs off the top: its height is the point (a sharp q(z|x) is what a high rate looks like).
    Samples outside ``xlim`` are clipped into the outermost bins and their share is noted in the
    title.
    """
    if ax is None:
        ax = new_figure("panel")[1][0, 0]
    samples = np.asarray(samples, dtype=float).ravel()
    colour = colour or OKABE_ITO[0]
    low, high = xlim
    outside = float(np.mean((samples < low) | (samples > high))) if samples.size else 0.0
    heights, _, _ = ax.hist(np.clip(samples, low, high), bins=bins, range=xlim, density=True,
                            color=colour, alpha=0.55, edgecolor="none", label="$z \\sim q(z)$")
    grid = np.linspace(low, high, 400)
    prior = _normal_density(grid, 0.0, 1.0)
    ax.plot(grid, prior, label="prior $\\mathrm{N}(0, 1)$", **PRIOR_LINE)
    top = 1.25 * max(float(np.max(heights)) if heights.size else 0.0, float(prior.max()))
    if loc is not None and scale is not None and num_posteriors > 0:
        loc, scale = np.asarray(loc, dtype=float).ravel(), np.asarray(scale, dtype=float).ravel()
        chosen = np.random.default_rng(seed).choice(loc.size, size=min(num_posteriors, loc.size),
                                                    replace=False)
        for i, n in enumerate(chosen):
            ax.plot(grid, _normal_density(grid, loc[n], scale[n]), color=POSTERIOR_COLOUR, lw=0.8,
                    alpha=0.8, label="$q(z \\mid x_n)$" if i == 0 else None)
    ax.set_xlim(xlim)
    ax.set_ylim(0.0, top)
    ax.set_yticks([])
    if title or outside > 0:
        note = f" ({100 * outside:.0f}% outside)" if outside >= 0.005 else ""
        ax.set_title(f"{title or ''}{note}", fontsize=9)
    return ax


def plot_latent_histograms(latents: Mapping[str, tuple], dims: Mapping[str, Sequence[int]] | Sequence[int],
                           axes=None, num_posteriors: int = 4, bins: int = 40,
                           xlim: tuple[float, float] | None = None, seed: int = 0,
                           methods: Mapping[str, object] | None = None):
    """A grid of :func:`plot_latent_histogram`: one row per run, one column per latent dimension.

    ``latents``: ``{label: (samples [N, D], loc [N, D], scale [N, D])}`` (numpy or torch).
    ``dims``: the dimensions to draw, the same for every run or ``{label: dims}`` (e.g. each
    run's dimensions of highest KL); every row must have the same number. ``xlim``: the same
    range for every panel, or None for one symmetric range per run that covers the prior's
    [-4, 4] and 99.5% of the run's samples on the drawn dimensions (an autoencoder's codes can
    lie far outside the prior's range). Each row has its run's method colour (``methods``: label ->
    the run, its config or method). Returns the ``axes`` array ``[runs, dims]``; the figure is
    ``axes[0, 0].figure``.
    """
    labels = list(latents)
    per_run = {label: list(dims[label] if isinstance(dims, Mapping) else dims) for label in labels}
    num_cols = len(per_run[labels[0]])
    if any(len(d) != num_cols for d in per_run.values()):
        raise ValueError("every run must show the same number of dimensions")
    if axes is None:
        _, axes = new_figure("panel", ncols=num_cols, nrows=len(labels))
        # at most the text column wide: a wider figure is scaled down on the page, its text with it
        axes[0, 0].figure.set_size_inches(min(1.9 * num_cols, COLUMN_WIDTH), 1.6 * len(labels))
    for row, label in enumerate(labels):
        samples, loc, scale = (np.asarray(a, dtype=float) for a in latents[label])
        if xlim is None:
            reach = float(np.quantile(np.abs(samples[:, per_run[label]]), 0.995))
            limit = max(4.0, float(np.ceil(reach)))
            row_xlim = (-limit, limit)
        else:
            row_xlim = xlim
        for col, d in enumerate(per_run[label]):
            ax = axes[row, col]
            plot_latent_histogram(samples[:, d], loc[:, d], scale[:, d], ax=ax,
                                  num_posteriors=num_posteriors, colour=_colour(label, methods), bins=bins,
                                  title=f"$z_{{{d}}}$", xlim=row_xlim, seed=seed + 1000 * row + d)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(label, fontsize=9)
    return axes


# ------------------------------------------------------------------------------ mixed membership
def plot_mixing_weights(weights, group_names: Sequence[str], ax=None, title: str | None = None,
                        colorbar: bool = True, annotate: bool = False):
    """The mixing weights ``[G, T]`` of a mixed membership fit as a heatmap (thesis slide 34):
    one row per group (``group_names``), one column per shared component, colour in [0, 1]."""
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 2 or weights.shape[0] != len(group_names):
        raise ValueError(f"weights must be [G, T] with G = len(group_names) = {len(group_names)}; "
                         f"got shape {weights.shape}")
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    image = ax.imshow(weights, aspect="auto", cmap=WEIGHT_COLOUR_MAP, vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_yticks(range(len(group_names)), list(group_names), fontsize=8)
    ax.set_xticks(range(weights.shape[1]))
    ax.set_xlabel("component $t$")
    ax.grid(False)
    if annotate:
        for (g, t), value in np.ndenumerate(weights):
            if value >= 0.05:
                ax.text(t, g, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value > 0.5 else "black")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.04, label="mixing weight")
    if title:
        ax.set_title(title)
    return ax


def plot_versus_rate(rates, values, labels: Sequence[str], ax=None, errors=None, ylabel: str = "nats",
                     title: str | None = None, floor: tuple[float, float] | None = None,
                     diagonal: bool = False, legend: bool = True, symlog: bool = False,
                     hollow: Sequence[bool] | None = None, ranges=None, linthresh: float = 10.0,
                     methods: Mapping[str, object] | None = None):
    """One point per run or group at ``(rate, value)``, coloured and marked by method (after thesis
    slide 35). ``labels`` name the runs ("FB 16", "prior", ...); ``methods``: label -> the run, its
    config or method (a label that is itself a registry label, "VAE", or a prior group needs none).

    ``errors``: optional standard errors, drawn as vertical bars. ``floor``: ``(value, se)`` of a
    calibration group, drawn as a grey band (what the estimator reports when the truth is 0).
    ``diagonal``: draw y = rate (the upper bound I_q <= R). ``hollow``: per point, draw an open
    marker (e.g. an estimate at its ceiling). ``ranges``: ``[N, 2]`` (low, high) per point, drawn
    as a vertical line (e.g. two estimators that bracket the truth). ``symlog``: symmetric-log
    axes, linear within ``linthresh`` nats of 0 (one run 10x above the others would otherwise
    squeeze them all into a corner).
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    rates, values = np.asarray(rates, dtype=float), np.asarray(values, dtype=float)
    errors = None if errors is None else np.asarray(errors, dtype=float)
    hollow = [False] * len(labels) if hollow is None else list(hollow)
    ranges = None if ranges is None else np.asarray(ranges, dtype=float).reshape(len(labels), 2)
    if not (len(rates) == len(values) == len(labels) == len(hollow)):
        raise ValueError("rates, values, labels (and hollow) must have the same length")
    if floor is not None:
        centre, se = floor
        ax.axhspan(centre - 2 * se, centre + 2 * se, color=METHOD_COLOURS["prior"], alpha=0.25, lw=0,
                   label="calibration floor $\\pm 2$ SE")
        ax.axhline(centre, color=METHOD_COLOURS["prior"], lw=1)
    if diagonal:
        finite = rates[np.isfinite(rates)]
        top = float(finite.max()) if finite.size else 1.0
        line = np.linspace(0.0, top, 400)            # many points: straight on symlog axes too
        ax.plot(line, line, color="black", lw=0.8, ls=":", label="$y = R$")
    seen = set()
    for i, label in enumerate(labels):
        if not (np.isfinite(rates[i]) and np.isfinite(values[i])):
            continue
        method = _series_method(label, methods)
        colour = METHOD_COLOURS[method]
        if errors is not None and np.isfinite(errors[i]):
            ax.errorbar(rates[i], values[i], yerr=2 * errors[i], color=colour, lw=1, capsize=2, zorder=2)
        if ranges is not None and np.isfinite(ranges[i]).all():
            ax.plot([rates[i], rates[i]], ranges[i], color=colour, lw=2.5, alpha=0.5, zorder=2,
                    solid_capstyle="butt")
        marker = METHOD_MARKERS[method]
        if marker in _LINE_MARKERS:             # unfilled by nature: colour the lines
            style = dict(color=colour)
        else:
            style = dict(facecolors="none" if hollow[i] else colour, edgecolors=colour)
        # an open marker goes on top, a little larger: it rings a filled one at the same spot
        ax.scatter(rates[i], values[i], s=80 if hollow[i] else 55, marker=marker, zorder=4 if hollow[i] else 3,
                   linewidths=1.3, label=method if method not in seen else None, **style)
        seen.add(method)
    ax.axhline(0.0, color="black", lw=0.6)
    if symlog:
        # a rate is never negative: the axis starts just below 0, with no negative ticks
        symlog_axis(ax, "x", linthresh, lowest_tick=0.0)
        symlog_axis(ax, "y", linthresh)
        ax.set_xlim(left=-0.15 * linthresh)
    for collection in ax.collections:   # a marker at the edge (the AE, far right) is drawn whole
        collection.set_clip_on(False)
    ax.set_xlabel("rate $R$ (nats)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


# ------------------------------------------------------------------------------ per-run summaries
def plot_mi_bounds_by_run(decompositions: Mapping[str, object], ax=None, ceiling: float | None = None,
                          legend: bool = True, title: str | None = None,
                          xlim: tuple[float, float] | None = None,
                          methods: Mapping[str, object] | None = None):
    """The MI bounds of many runs on one number line each: ticks at H - D (H-hat - D when H is a
    language-model proxy), I_q and R, the lower gap (H - D to I_q) and the upper gap (I_q to R, the
    marginal KL) as bars between them.

    ``decompositions``: ``{label: MIBoundDecomposition}``. A lower gap that comes out negative
    (possible when H is a language-model proxy, an upper bound on the true entropy, or when I_q
    is an estimate capped at its ceiling) is drawn hatched. ``ceiling``: the estimator's MI
    ceiling (e.g. log N), a dashed vertical line. ``xlim``: the range shown; a run whose rate lies
    beyond it is cut at the edge and its rate written there (one outlier would squeeze the rest).
    ``methods`` (label -> the run, its config or method): run names in their method's colour.
    """
    labels = list(decompositions)
    # a language model's cross-entropy standing in for H is written H-hat, as in the single-run plot
    h = "H" if all(d.entropy_is_exact for d in decompositions.values()) else r"\hat H"
    if ax is None:
        ax = new_figure("bar")[1][0, 0]
        ax.figure.set_size_inches(7.0, 0.4 * len(labels) + 1.2)
    for row, label in enumerate(labels):
        d = decompositions[label]
        y = len(labels) - 1 - row
        for term, start, stop in (("lower_gap", d.lower_bound, d.mutual_information),
                                  ("upper_gap", d.mutual_information, d.upper_bound)):
            negative = stop < start
            ax.barh(y, stop - start, left=start, height=0.55, color=TERM_COLOURS[term],
                    alpha=0.5 if negative else 1.0, hatch="//" if negative else None, edgecolor="white",
                    label=TERM_LABELS[term])
        for value, term in ((d.lower_bound, "lower_bound"), (d.mutual_information, "mutual_information"),
                            (d.upper_bound, "rate")):
            ax.plot([value, value], [y - 0.32, y + 0.32], color=TERM_COLOURS[term], lw=2.2,
                    label={"lower_bound": f"${h} - D$", "mutual_information": "$I_q$",
                           "rate": "$R$"}[term])
        if xlim is not None and d.upper_bound > xlim[1]:
            ax.text(xlim[1], y, f"$R$ = {d.upper_bound:.1f} $\\rightarrow$", ha="right", va="center",
                    fontsize=7, bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
    if ceiling is not None and math.isfinite(ceiling):
        ax.axvline(ceiling, color="#7F7F7F", ls="--", lw=1, label=f"MI ceiling $\\log N$ = {ceiling:.2f}")
    ax.axvline(0.0, color="black", lw=0.8)
    if xlim is not None:
        ax.set_xlim(xlim)
    ax.set_yticks(range(len(labels)), list(reversed(labels)), fontsize=8)
    _colour_tick_labels(ax.get_yticklabels(), methods)
    ax.set_xlabel("nats")
    if title:
        ax.set_title(title)
    if legend:
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_kl_decomposition_by_run(labels: Sequence[str], total_correlation, dimensionwise_kl, ax=None,
                                 marginal_kl=None, title: str | None = None, legend: bool = True,
                                 symlog: bool = False, linthresh: float = 10.0,
                                 methods: Mapping[str, object] | None = None):
    """Total correlation and dimension-wise KL per run, side by side (and the marginal KL they
    add up to, Chen et al. 2018), as grouped horizontal bars; estimates may be negative.
    ``symlog``: symmetric-log x axis, linear within ``linthresh`` nats of 0. ``methods`` (label ->
    the run, its config or method): run names in their method's colour."""
    series = {"total correlation": np.asarray(total_correlation, dtype=float),
              "dimension-wise KL": np.asarray(dimensionwise_kl, dtype=float)}
    if marginal_kl is not None:
        series["marginal KL"] = np.asarray(marginal_kl, dtype=float)
    colours = {"total correlation": OKABE_ITO[0], "dimension-wise KL": OKABE_ITO[4],
               "marginal KL": TERM_COLOURS["upper_gap"]}
    if ax is None:
        ax = new_figure("bar")[1][0, 0]
        ax.figure.set_size_inches(7.0, 0.45 * len(labels) + 1.2)
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ys = np.arange(len(labels))[::-1] + (len(series) - 1) / 2 * height - i * height
        ax.barh(ys, values, height=height, color=colours[name], label=name)
    ax.axvline(0.0, color="black", lw=0.8)
    if symlog:
        symlog_axis(ax, "x", linthresh)
    ax.set_yticks(np.arange(len(labels))[::-1], list(labels), fontsize=8)
    _colour_tick_labels(ax.get_yticklabels(), methods)
    ax.set_xlabel("nats")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


# ------------------------------------------------------------------------------ pathological directions
def plot_elbo_landscape(landscape, ax=None, path: tuple | None = None,
                        points: Mapping[str, tuple[float, float]] | None = None, num_levels: int = 8,
                        highlight: float | None = None, title: str | None = None, colorbar: bool = True):
    """Contours of the exact ELBO over two parameters (thesis slide 38, exactly).

    ``landscape``: a :class:`tvae_core.pathological.ElboLandscape` (theta_1 = log encoder gain on
    x, theta_2 = log decoder noise scale on y); contours of -ELBO - H, labelled in nats.
    ``path``: ``(x, y, colour_values)`` drawn as a thick line coloured by ``colour_values`` (e.g.
    the marginal KL along a constant-ELBO path; ``colorbar`` adds its scale). ``points``:
    ``{label: (x, y)}`` markers. ``highlight``: one level of -ELBO - H drawn as a dashed black
    contour (the set of models with that ELBO).
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    x, y = np.asarray(landscape.log_gains), np.asarray(landscape.log_noise_scales)
    excess = -np.asarray(landscape.elbo) - landscape.entropy          # -ELBO - H >= 0
    contours = ax.contour(x, y, excess, levels=num_levels, cmap=LANDSCAPE_COLOUR_MAP, linewidths=1)
    ax.clabel(contours, fontsize=7, fmt="%g")
    if highlight is not None:
        ax.contour(x, y, excess, levels=[highlight], colors="black", linestyles="--", linewidths=1.2)
    if path is not None:
        px, py, values = (np.asarray(a, dtype=float) for a in path)
        segments = np.stack([np.column_stack([px[:-1], py[:-1]]), np.column_stack([px[1:], py[1:]])], axis=1)
        # the colour map's palest eighth left out: the path's low end stays visible on white
        palette = sns.color_palette("rocket_r", as_cmap=True)
        line = LineCollection(segments, cmap=ListedColormap(palette(np.linspace(0.15, 1.0, 256))), linewidths=4)
        line.set_array(0.5 * (values[:-1] + values[1:]))
        ax.add_collection(line)
        if colorbar:
            ax.figure.colorbar(line, ax=ax, fraction=0.05, pad=0.02, label="marginal KL on the path (nats)")
    for i, (label, (px, py)) in enumerate((points or {}).items()):
        ax.plot(px, py, marker="sD^v"[i % 4], ms=9, color="black", ls="none", label=label)
    ax.plot(0.0, 0.0, marker="+", ms=12, color="black", ls="none", label="fitted model ($-$ELBO $= H$)")
    ax.set_xlabel(r"$\theta_1 = \log$ encoder gain $g$")
    ax.set_ylabel(r"$\theta_2 = \log$ decoder noise scale $k$")
    ax.grid(False)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    return ax


_PATH_TERMS = {  # key -> (label, colour, style)
    "negative_elbo": (r"$-$ELBO", "#000000", "-"),
    "entropy": (TERM_LABELS["entropy"], TERM_COLOURS["entropy"], ":"),
    "rate": (TERM_LABELS["rate"], TERM_COLOURS["rate"], "-"),
    "distortion": (TERM_LABELS["distortion"], TERM_COLOURS["distortion"], "-"),
    "mutual_information": (TERM_LABELS["mutual_information"], TERM_COLOURS["mutual_information"], "-"),
    "marginal_kl": ("marginal KL (upper gap)", TERM_COLOURS["upper_gap"], "-"),
    "lower_gap": ("lower gap", TERM_COLOURS["lower_gap"], "-"),
    "log_likelihood": (r"$\mathrm{E}\log p(x)$", OKABE_ITO[5], "--"),
}


def plot_terms_along_path(position, terms: Mapping[str, object], ax=None, xlabel: str = "position $t$",
                          ylabel: str = "nats", title: str | None = None, legend: bool = True):
    """Exact terms along a path in parameter space, one line each. ``terms`` maps a key
    (negative_elbo, entropy, rate, distortion, mutual_information, marginal_kl, lower_gap,
    log_likelihood) to ``[P]`` values at ``position`` ``[P]``."""
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    position = np.asarray(position, dtype=float)
    for i, (key, values) in enumerate(terms.items()):
        label, colour, style = _PATH_TERMS.get(key, (key, OKABE_ITO[i % len(OKABE_ITO)], "-"))
        ax.plot(position, np.asarray(values, dtype=float), color=colour, ls=style, lw=2, label=label)
    return finish_axes(ax, xlabel, ylabel, title, legend)
