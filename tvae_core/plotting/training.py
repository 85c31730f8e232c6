"""Figures of trained runs: training curves, the rate-distortion plane, achieved vs target rate,
MDR multiplier trajectories, KL per latent dimension and per-run dot plots.

Runs are identified by their label (``"VAE"``, ``"FB 16"``, ``"CYC-FB 4 (total)"``,
``"VAE, word dropout 1"``), but a label is never parsed: each run's method comes as data, from
``methods`` (label -> the run, its ``RunConfig`` or its method; :func:`tvae_core.methods.method_of`)
or a table's ``method`` column, and only a label that is itself a registry label or name
(``"VAE"``, ``"mdr"``) needs neither. The method's colour (:data:`~.style.METHOD_COLOURS`) and
marker are used everywhere. Several runs of one method (the target rates of FB, or word-dropout
variants of the VAE) get shades of that colour, light for low targets and dark for high ones
(:func:`run_styles`).

Tables of runs are ``pandas.DataFrame`` objects with one row per run and the columns named
below (``method``, ``rate``, ``distortion``, ``target_rate`` ...); histories are the
``Run.history`` dicts written by :func:`tvae_core.train.train`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.colors import to_hex, to_rgb
from matplotlib.ticker import MaxNLocator

from ..analysis import smooth
from ..methods import Method, get_method, method_of
from .style import METHOD_COLOURS, METHOD_MARKERS, finish_axes, new_figure, symlog_axis

__all__ = [
    "shades", "run_styles", "smooth", "plot_training_curves",
    "plot_rate_distortion_plane", "plot_elbo_vs_rate", "plot_achieved_vs_target",
    "plot_multiplier_trajectories", "plot_rate_against_target", "plot_kl_per_dimension",
    "plot_run_dots",
]


# ------------------------------------------------------------------------------ methods and colours
def _method_of_run(label: str, methods: Mapping[str, object] | None) -> Method:
    """The method of the run called ``label``: ``method_of(methods[label])`` when ``methods`` has
    the label, else the registry entry the label itself names exactly (``"VAE"``, ``"mdr"``);
    ValueError otherwise (a label is never parsed)."""
    if methods is not None and label in methods:
        return method_of(methods[label])
    try:
        return get_method(label)
    except ValueError:
        raise ValueError(f"run label {label!r} names no method: pass methods={{label: its run, config or method}}") from None


def _table_methods(table, methods: Mapping[str, object] | None) -> dict[str, object]:
    """Label -> method of every row of a run table: its ``method`` column when it has one (a
    registry label, name or entry per row), else ``methods``."""
    if "method" in table:
        return table["method"].to_dict()
    return {label: _method_of_run(label, methods) for label in table.index}


def shades(colour: str, n: int, lightest: float = 0.45, darkest: float = 0.4) -> list[str]:
    """``n`` shades of ``colour`` from light (mixed with white) to dark (mixed with black).

    With ``n == 1`` the colour itself. ``lightest``/``darkest``: the share of white/black in the
    two extreme shades.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if n == 1:
        return [to_hex(colour)]
    base = np.array(to_rgb(colour))
    out = []
    for t in np.linspace(-lightest, darkest, n):  # < 0: towards white, > 0: towards black
        rgb = base + (-t) * (1.0 - base) if t < 0 else base * (1.0 - t)
        out.append(to_hex(np.clip(rgb, 0.0, 1.0)))
    return out


_MEMBER_FILLS = ("full", "none", "left", "bottom", "right", "top")   # matplotlib's marker fill styles


def run_styles(labels: Sequence[str], colours: Mapping[str, str] | None = None,
               methods: Mapping[str, object] | None = None) -> dict[str, dict]:
    """Line/marker style per run label: the method's colour (shaded when a method has several
    runs, in the order given) and marker. ``colours`` overrides the colour of given labels.
    ``methods``: label -> the run's method as data (a ``Run``, a ``RunConfig``, a registry entry,
    name or label; :func:`tvae_core.methods.method_of`). A label not in ``methods`` must itself be
    a registry label or name (``"VAE"``, ``"AE"``, ``"mdr"``); any other raises ValueError naming
    it (labels are never parsed: ``"FB 16"`` needs ``methods``).

    Returns ``{label: {"color": ..., "marker": ..., "fillstyle": ..., "method": ...}}`` (``method``:
    the registry label; ``fillstyle``: full for a method's first run, then open, half-filled, ...,
    so that runs of one method differ by more than a shade where markers are drawn).
    """
    labels = list(labels)
    by_method: dict[str, list[str]] = {}
    entries: dict[str, Method] = {}
    for label in labels:
        method = _method_of_run(label, methods)
        entries[method.label] = method
        by_method.setdefault(method.label, []).append(label)
    styles = {}
    for name, members in by_method.items():
        method = entries[name]
        for i, (label, colour) in enumerate(zip(members, shades(method.colour, len(members)))):
            styles[label] = {"color": colour, "marker": method.marker, "method": name,
                             "fillstyle": _MEMBER_FILLS[i % len(_MEMBER_FILLS)]}
    for label, colour in (colours or {}).items():
        if label in styles:
            styles[label]["color"] = colour
    return styles


# ------------------------------------------------------------------------------ training curves
def _train_series(history: Mapping, quantity: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in history.get("train", []) if quantity in r]
    return (np.array([r["step"] + 1 for r in rows], dtype=float),  # after step t, t + 1 steps are done
            np.array([r[quantity] for r in rows], dtype=float))


def _valid_series(history: Mapping, quantity: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in history.get("valid", []) if quantity in r]
    return np.array([r["step"] for r in rows], dtype=float), np.array([r[quantity] for r in rows], dtype=float)


def plot_training_curves(histories: Mapping[str, Mapping], quantity: str = "rate", ax=None,
                         window: int = 25, show_train: bool = True, show_valid: bool = True,
                         colours: Mapping[str, str] | None = None, ylabel: str | None = None,
                         title: str | None = None, logy: bool = False, legend: bool = True,
                         targets: Mapping[str, float] | None = None, methods: Mapping[str, object] | None = None):
    """One quantity over training, one colour per run.

    Training values (one minibatch per step) are drawn thin, smoothed with a ``window``-step
    moving average; validation values (the held-out validation subset, every ``eval_every``
    steps) are drawn as a line with markers. ``targets`` (label -> target rate) adds a dashed
    horizontal line per run. ``histories``: label -> ``Run.history``; ``methods``: label -> the
    run's config (or method), see :func:`run_styles`.
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    styles = run_styles(list(histories), colours, methods)
    for label, history in histories.items():
        style = styles[label]
        if show_train:
            steps, values = _train_series(history, quantity)
            if steps.size:
                ax.plot(steps, smooth(values, window), color=style["color"], lw=1.0,
                        alpha=0.55 if show_valid else 1.0,
                        label=None if show_valid else label)
        if show_valid:
            steps, values = _valid_series(history, quantity)
            if steps.size:
                ax.plot(steps, values, color=style["color"], lw=1.8, marker=style["marker"], ms=6,
                        fillstyle=style["fillstyle"], markerfacecoloralt="white", label=label)
        if targets and label in targets:
            ax.axhline(targets[label], color=style["color"], ls="--", lw=1.0)
    if logy:
        symlog_axis(ax, "y", linthresh=0.1)
        ax.margins(y=0.08)          # a validation marker at the top is drawn whole
        ax.set_ylim(bottom=0.0)
    return finish_axes(ax, "optimiser step", ylabel or quantity, title, legend)


# ------------------------------------------------------------------------------ the rate-distortion plane
def _annotate_targets(ax, table, x: str, y: str, styles: Mapping[str, dict]) -> None:
    if "target_rate" not in table:
        return
    # each method writes its targets on its own side of the points: FB and CYC-FB runs at one
    # target land almost on the same spot, and one offset for all made their labels overprint
    offsets = ((4, 4), (4, -11), (-13, 4), (-13, -11))
    methods = list(dict.fromkeys(styles[label]["method"] for label in table.index))
    for label, row in table.iterrows():
        target = row.get("target_rate")
        if target is None or not np.isfinite(target):
            continue
        offset = offsets[methods.index(styles[label]["method"]) % len(offsets)]
        ax.annotate(f"{target:g}", (row[x], row[y]), xytext=offset, textcoords="offset points",
                    fontsize=8, color=styles[label]["color"])


def _scatter_runs(ax, table, x: str, y: str, colours, marker_size: float,
                  methods: Mapping[str, object] | None = None) -> dict[str, dict]:
    # each run's method as data: the table's ``method`` column, else ``methods`` (label -> run)
    styles = run_styles(list(table.index), colours, _table_methods(table, methods))
    seen = []
    for label, row in table.iterrows():
        style = styles[label]
        if style["method"] not in seen:
            seen.append(style["method"])
        size = marker_size * (2.0 if style["marker"] == "*" else 1.0)  # a star reads smaller than a disc
        ax.scatter(row[x], row[y], color=style["color"], marker=style["marker"], s=size,
                   edgecolor="white", linewidth=0.5, zorder=4 if style["marker"] == "*" else 3)
    for method in seen:  # one legend entry per method, in the method's own (unshaded) colour
        marker = METHOD_MARKERS[method]
        ax.scatter([], [], color=METHOD_COLOURS[method], marker=marker,
                   s=marker_size * (2.0 if marker == "*" else 1.0), label=method)
    return styles


def plot_rate_distortion_plane(table, ax=None, iso_elbo: int = 6, reference: str | None = None,
                               colours: Mapping[str, str] | None = None, annotate: bool = True,
                               marker_size: float = 60.0, title: str | None = None, legend: bool = True,
                               methods: Mapping[str, object] | None = None):
    """Distortion against rate, one point per run, with iso-ELBO lines D + R = const.

    ``table``: DataFrame indexed by run label with columns ``rate`` and ``distortion`` (nats per
    sentence) and optionally ``target_rate`` (annotated next to the point) and ``method`` (each
    run's method; without it ``methods``, label -> run, config or method, see :func:`run_styles`). Every point on one
    dashed line of slope -1 has the same ELBO; moving down-right along a line trades distortion
    for rate at no cost in ELBO. ``iso_elbo`` lines are spread over the plotted range;
    ``reference`` (a label) draws the line through that run in its colour (the thesis' slide
    draws it through the VAE).
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    styles = _scatter_runs(ax, table, "rate", "distortion", colours, marker_size, methods)
    if annotate:
        _annotate_targets(ax, table, "rate", "distortion", styles)
    rates, distortions = table["rate"].to_numpy(float), table["distortion"].to_numpy(float)
    r_lo, r_hi = min(0.0, rates.min()), rates.max()
    r_pad = 0.05 * max(r_hi - r_lo, 1.0)
    d_lo, d_hi = distortions.min(), distortions.max()
    d_pad = 0.08 * max(d_hi - d_lo, 1.0)
    xlim, ylim = (r_lo - r_pad, r_hi + r_pad), (d_lo - d_pad, d_hi + d_pad)
    totals = rates + distortions
    xs = np.array(xlim)
    if iso_elbo > 0:
        for total in np.linspace(totals.min(), totals.max(), iso_elbo) if np.ptp(totals) > 0 else totals[:1]:
            ax.plot(xs, total - xs, color="#BBBBBB", ls=":", lw=0.9, zorder=1)
    if reference is not None and reference in table.index:
        row = table.loc[reference]
        ax.plot(xs, row["rate"] + row["distortion"] - xs, color=styles[reference]["color"], ls="--", lw=1.2,
                zorder=2, label=f"$D + R$ of {reference}")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    return finish_axes(ax, "rate $R$ (nats)", "distortion $D$ (nats)", title, legend)


def plot_elbo_vs_rate(table, ax=None, reference: str | None = None, colours: Mapping[str, str] | None = None,
                      annotate: bool = True, marker_size: float = 60.0, column: str = "elbo",
                      ylabel: str = "ELBO (nats)", title: str | None = None, legend: bool = True,
                      methods: Mapping[str, object] | None = None):
    """ELBO (or another ``column``, e.g. the IW log-likelihood) against rate, one point per run.

    ``reference`` (a label) draws a horizontal line at that run's value (the VAE in the thesis).
    Each run's method: the table's ``method`` column, else ``methods`` (see :func:`run_styles`).
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    styles = _scatter_runs(ax, table, "rate", column, colours, marker_size, methods)
    if annotate:
        _annotate_targets(ax, table, "rate", column, styles)
    if reference is not None and reference in table.index:
        ax.axhline(table.loc[reference, column], color=styles[reference]["color"], ls="--", lw=1.2,
                   label=f"{reference}")
    ax.margins(x=0.06, y=0.12)
    return finish_axes(ax, "rate $R$ (nats)", ylabel, title, legend)


def plot_achieved_vs_target(table, ax=None, colours: Mapping[str, str] | None = None,
                            reference: Mapping[str, Mapping[float, float]] | None = None,
                            marker_size: float = 60.0, title: str | None = None, legend: bool = True,
                            clip: float | None = 1.5, methods: Mapping[str, object] | None = None):
    """Achieved rate against target rate, one line per method, with the diagonal R = r.

    ``table``: DataFrame indexed by label with columns ``target_rate``, ``rate`` and ``method``
    (without it, each run's method comes from ``methods``: label -> run, config or method;
    runs without a target are skipped). ``reference``: method -> {target: rate} of another
    source (the thesis' numbers), drawn as hollow markers in the method's colour. ``clip``: the
    y axis ends at ``clip`` x the largest target; runs above it are drawn at the edge as
    triangles labelled with their rate (None: no clipping).
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    table = table.assign(method=[method_of(m).label for m in _table_methods(table, methods).values()])
    targeted = table[np.isfinite(table["target_rate"].astype(float))]
    colours = dict(colours or {})
    max_target = float(targeted["target_rate"].max()) if len(targeted) else 1.0
    top = clip * max_target if clip is not None else np.inf
    for method, group in targeted.groupby("method", sort=False):
        colour = colours.get(method, METHOD_COLOURS[method])
        group = group.sort_values("target_rate")
        shown = np.minimum(group["rate"].to_numpy(float), top)
        above = group["rate"].to_numpy(float) > top
        ax.plot(group["target_rate"], shown, color=colour, lw=1.2, alpha=0.8)
        ax.scatter(group["target_rate"][~above], shown[~above], color=colour,
                   marker=METHOD_MARKERS[method], s=marker_size, edgecolor="white", linewidth=0.5,
                   zorder=3, label=method)
        for target, rate in zip(group["target_rate"][above], group["rate"][above]):
            ax.scatter(target, top, color=colour, marker="^", s=marker_size, zorder=3, clip_on=False)
            ax.annotate(f"{rate:.0f} nats", (target, top), xytext=(-7, -2), textcoords="offset points",
                        fontsize=8, color=colour, va="top", ha="right")
        if reference and method in reference:
            ref = sorted(reference[method].items())
            ax.scatter([t for t, _ in ref], [r for _, r in ref], facecolor="none", edgecolor=colour,
                       marker=METHOD_MARKERS[method], s=marker_size, linewidth=1.2, zorder=2,
                       label=f"{method} (thesis)")
    hi = max(max_target, float(np.minimum(targeted["rate"].max(), top))) if len(targeted) else 1.0
    if reference:
        hi = max([hi] + [r for ref in reference.values() for r in ref.values()])
    line = np.array([0.0, 1.05 * hi])
    ax.plot(line, line, color="black", ls="--", lw=0.9, label="achieved = target")
    ax.set_xlim(0.0, 1.08 * (hi if clip is None else max_target))
    ax.set_ylim(0.0, 1.05 * hi)
    return finish_axes(ax, "target rate $r$ (nats)", "achieved rate $R$ (nats)", title, legend)


# ------------------------------------------------------------------------------ MDR
def plot_multiplier_trajectories(histories: Mapping[str, Mapping], ax=None, window: int = 1,
                                 colours: Mapping[str, str] | None = None, title: str | None = None,
                                 legend: bool = True, quantity: str = "mdr_lambda",
                                 ylabel: str = r"multiplier $\lambda_t$", methods: Mapping[str, object] | None = None):
    """The MDR Lagrange multiplier lambda_t (logged at every optimiser step) for several runs.

    The MDR loss D + R + lambda (r - R) weighs the rate by 1 - lambda: lambda = 0 is the plain
    ELBO (constraint slack), lambda = 1 leaves the rate unpenalised, lambda > 1 rewards rate.
    Both levels are drawn as dotted reference lines. ``methods``: label -> the run's config (or
    method), see :func:`run_styles`.
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    styles = run_styles(list(histories), colours, methods)
    for label, history in histories.items():
        steps, values = _train_series(history, quantity)
        if steps.size:
            ax.plot(steps, smooth(values, window), color=styles[label]["color"], lw=1.5, label=label)
    ax.axhline(1.0, color="#777777", lw=0.9, ls=":", label=r"$\lambda = 1$: rate unpenalised")
    ax.axhline(0.0, color="black", lw=0.9, ls=":", label=r"$\lambda = 0$: the ELBO")
    return finish_axes(ax, "optimiser step", ylabel, title, legend)


def plot_rate_against_target(histories: Mapping[str, Mapping], targets: Mapping[str, float], ax=None,
                             window: int = 25, colours: Mapping[str, str] | None = None,
                             title: str | None = None, legend: bool = True, logy: bool = False,
                             methods: Mapping[str, object] | None = None):
    """Training rate (smoothed batch values) and validation rate per run, each with its target
    as a dashed line of the same colour (``logy``: symmetric-log axis, for rates that swing
    over orders of magnitude). ``methods``: label -> the run's config (or method), see
    :func:`run_styles`."""
    return plot_training_curves(histories, "rate", ax=ax, window=window, colours=colours,
                                ylabel="rate $R$ (nats)", title=title, legend=legend, targets=targets,
                                logy=logy, methods=methods)


# ------------------------------------------------------------------------------ latent dimensions
def plot_kl_per_dimension(kl: Mapping[str, Sequence[float]], ax=None, sort: bool = True,
                          colours: Mapping[str, str] | None = None, active: Mapping[str, int] | None = None,
                          title: str | None = None, logy: bool = False, legend: bool = True,
                          methods: Mapping[str, object] | None = None):
    """Grouped bars of E_x KL(q(z_d|x) || N(0, 1)) per latent dimension d, one colour per run.

    With ``sort`` each run's dimensions are sorted in decreasing order (the x axis is then a
    rank, not a dimension index), so how many dimensions carry the rate is visible at a glance.
    ``active`` (label -> number of active units) is added to the legend. ``methods``: label -> the
    run's config (or method), see :func:`run_styles`.
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    styles = run_styles(list(kl), colours, methods)
    n_runs = len(kl)
    width = 0.8 / max(n_runs, 1)
    for i, (label, values) in enumerate(kl.items()):
        values = np.asarray(values, dtype=float)
        if sort:
            values = np.sort(values)[::-1]
        x = np.arange(values.size) + (i - (n_runs - 1) / 2) * width
        name = label if not active or label not in active else f"{label} ({active[label]} active)"
        ax.bar(x, values, width=width, color=styles[label]["color"], label=name)
    if logy:   # linear only below 1e-4 nats: a collapsed run's dimensions stay visible
        symlog_axis(ax, "y", linthresh=1e-4)
        ax.set_ylim(bottom=0.0)
    xlabel = "latent dimension (sorted by KL)" if sort else "latent dimension $d$"
    # \mathrm, not \mathbb or \mathcal: the SVG keeps text as text, and a browser has no font for
    # matplotlib's private-use glyphs of blackboard and calligraphic letters
    ylabel = r"$\mathrm{E}_x\,\mathrm{KL}(q(z_d|x)\,\|\,p(z_d))$ (nats)"
    return finish_axes(ax, xlabel, ylabel, title, legend)


# ------------------------------------------------------------------------------ per-run numbers
def plot_run_dots(values: Mapping[str, Mapping[str, float]], ax=None, errors: Mapping[str, Mapping[str, float]] | None = None,
                  reference: tuple[float, str] | None = None, xlabel: str = "nats per sentence",
                  title: str | None = None, legend: bool = True, series_markers: Mapping[str, str] | None = None,
                  colours: Mapping[str, str] | None = None, methods: Mapping[str, object] | None = None):
    """A dot plot: one row per run, one marker per series (e.g. ELBO and IW log-likelihood).

    ``values``: series name -> {run label -> value}; ``errors``: the same shape, drawn as
    horizontal error bars (e.g. 2 standard errors); ``reference``: (value, label) drawn as a
    vertical line (e.g. the language model's exact log-likelihood). Rows are coloured by run (its
    method from ``methods``: label -> the run's config or method, see :func:`run_styles`), series
    are told apart by their marker.
    """
    if ax is None:
        ax = new_figure("bar")[1][0, 0]
    labels: list[str] = []
    for series in values.values():
        labels += [label for label in series if label not in labels]
    styles = run_styles(labels, colours, methods)
    markers = dict(series_markers or {})
    default_markers = iter([m for m in ("o", "D", "s", "^", "v", "P") if m not in markers.values()])
    n_series = len(values)
    offsets = np.linspace(-0.15, 0.15, n_series) if n_series > 1 else [0.0]
    for offset, (name, series) in zip(offsets, values.items()):
        marker = markers.get(name) or next(default_markers)
        for row, label in enumerate(labels):
            if label not in series:
                continue
            y = len(labels) - 1 - row + offset
            err = (errors or {}).get(name, {}).get(label)
            ax.errorbar(series[label], y, xerr=err, color=styles[label]["color"], marker=marker, ms=7,
                        capsize=3, lw=1.2, ls="none")
        if n_series > 1:
            ax.scatter([], [], color="#444444", marker=marker, label=name)  # legend entry per series
    if reference is not None:
        ax.axvline(reference[0], color="black", ls="--", lw=1.0, label=reference[1])
    ax.set_yticks(range(len(labels)), list(reversed(labels)))
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.margins(x=0.15)   # a dot (or its error bar's cap) at either end stays clear of the frame
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
