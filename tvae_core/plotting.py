"""The one plotting module of the book: one set of figure sizes, one colour per method and term.

Notebooks call :func:`set_style` once and draw every figure through the functions here, so the
same method has the same colour on every page. Sections: style and palettes; the MI-bound
decomposition; estimator-vs-exact plots. Add new figure functions under a section header of
their own; take an ``ax`` (create one with :func:`new_figure` when None) and return it.

Colours are the Okabe-Ito colour-blind-safe palette.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

# ------------------------------------------------------------------------------ style and palettes
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

FIGURE_SIZES = {                      # inches, for one panel (multi-panel figures scale by ncols/nrows)
    "single": (6.0, 4.0),             # one plot across the text column
    "wide": (10.0, 4.0),              # a row of 2-3 panels
    "panel": (3.6, 3.0),              # one panel of a grid
    "bar": (7.0, 3.0),                # horizontal bar charts (a few rows)
}

METHOD_COLOURS = {                    # one colour per training method, everywhere in the book
    "VAE": "#CC79A7", "AE": "#E69F00", "CYC": "#0072B2", "FB": "#D55E00", "MDR": "#009E73",
    "CYC-FB": "#56B4E9", "prior": "#999999", "LM": "#8C564B",
}
METHOD_MARKERS = {"VAE": "*", "AE": "s", "CYC": "^", "FB": "o", "MDR": "P", "CYC-FB": "d",
                  "prior": "x", "LM": "v"}

TERM_COLOURS = {                      # the quantities of the rate-distortion picture
    "entropy": "#999999", "distortion": "#0072B2", "rate": "#D55E00",
    "mutual_information": "#009E73", "lower_bound": "#56B4E9", "lower_gap": "#E69F00",
    "upper_gap": "#CC79A7",
}
TERM_LABELS = {
    "entropy": "data entropy $H$", "distortion": "distortion $D$", "rate": "rate $R$",
    "mutual_information": "index-code MI $I_q$", "lower_bound": "lower bound $H - D$",
    "lower_gap": r"lower gap $\mathbb{E}_{q(z)}\,\mathrm{KL}(q(x|z)\,\|\,p(x|z))$",
    "upper_gap": r"upper gap $\mathrm{KL}(q(z)\,\|\,p(z))$",
}

ESTIMATOR_COLOURS = {                 # estimators compared against exact answers
    "exact": "#000000", "self term": "#0072B2", "leave-one-out": "#D55E00", "IW": "#009E73",
    "ELBO": "#999999", "MWS": "#CC79A7", "thesis 640": "#E69F00", "ceiling": "#7F7F7F",
}


def set_style() -> None:
    """The book's matplotlib/seaborn style; call once per notebook before plotting."""
    sns.set_theme(style="whitegrid", context="notebook", palette=list(OKABE_ITO))
    plt.rcParams.update({
        "figure.figsize": FIGURE_SIZES["single"], "figure.dpi": 100, "savefig.dpi": 150,
        "savefig.bbox": "tight", "axes.titlesize": 12, "axes.labelsize": 11,
        "legend.fontsize": 9, "legend.frameon": False, "axes.spines.top": False,
        "axes.spines.right": False,
    })


def new_figure(kind: str = "single", ncols: int = 1, nrows: int = 1, **kwargs):
    """``plt.subplots`` with the book's size for ``kind`` (one of FIGURE_SIZES) per panel."""
    if kind not in FIGURE_SIZES:
        raise ValueError(f"kind={kind!r} is not a figure size; accepted values: {tuple(FIGURE_SIZES)}")
    width, height = FIGURE_SIZES[kind]
    if kind in ("panel", "bar"):
        width, height = width * ncols, height * nrows
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kwargs)


def method_colour(method: str) -> str:
    """The colour of a training method (VAE, AE, CYC, FB, MDR, CYC-FB, prior, LM)."""
    if method not in METHOD_COLOURS:
        raise KeyError(f"method={method!r} has no colour; accepted values: {tuple(METHOD_COLOURS)}")
    return METHOD_COLOURS[method]


# ------------------------------------------------------------------------------ MI-bound decomposition
def plot_bound_decomposition(decomposition, ax=None, title: str | None = None, annotate: bool = True,
                             legend: bool = True):
    """The bounds H - D <= I_q <= R and their gaps as horizontal bars (after the thesis slides).

    Rows, top to bottom: H; -ELBO = D + R (stacked); the MI bounds on a number line (ticks at
    H - D, I_q and R, the lower gap between the first two and the upper gap between the last
    two); and -ELBO - H = lower gap + upper gap (stacked), the identity made visible.
    ``decomposition``: a :class:`~tvae_core.estimators.MIBoundDecomposition`.
    """
    if ax is None:
        ax = new_figure("bar")[1][0, 0]
    d = decomposition
    rows = [                                          # (row label, [(term, left, width)]), top first
        ("$H$" if d.entropy_is_exact else "$H$ (LM proxy)", [("entropy", 0.0, d.entropy)]),
        ("$-$ELBO", [("distortion", 0.0, d.distortion), ("rate", d.distortion, d.rate)]),
        ("MI bounds", [("lower_gap", d.lower_bound, d.lower_gap),
                       ("upper_gap", d.mutual_information, d.upper_gap)]),
        ("$-$ELBO $- H$", [("lower_gap", 0.0, d.lower_gap), ("upper_gap", d.lower_gap, d.upper_gap)]),
    ]
    ends = [v for _, segs in rows for _, left, width in segs for v in (left, left + width)]
    span = max(max(ends) - min(ends + [0.0]), 1e-9)
    top = len(rows) - 1
    for row, (_, segments) in enumerate(rows):
        y = top - row
        for term, left, width in segments:
            ax.barh(y, width, left=left, color=TERM_COLOURS[term], edgecolor="white", height=0.6,
                    label=TERM_LABELS[term])
            if annotate and abs(width) > 0.08 * span:
                ax.text(left + width / 2, y, f"{width:.2f}", ha="center", va="center", fontsize=8,
                        color="white")
    y_mi = top - 2
    if d.lower_bound > 0:                             # the guaranteed part of I_q, from 0 to H - D
        ax.barh(y_mi, d.lower_bound, color=TERM_COLOURS["lower_bound"], height=0.3, alpha=0.7,
                label=TERM_LABELS["lower_bound"])
    ticks = [(d.lower_bound, "$H-D$", "lower_bound"), (d.mutual_information, "$I_q$", "mutual_information"),
             (d.upper_bound, "$R$", "rate")]
    for value, _, term in ticks:
        ax.plot([value, value], [y_mi - 0.38, y_mi + 0.38], color=TERM_COLOURS[term], lw=2.5)
    groups: list[list] = []                           # equal values share one label
    for value, label, _ in sorted(ticks):
        if groups and value - groups[-1][0] < 1e-3:
            groups[-1][1].append(label)
        else:
            groups.append([value, [label]])
    previous = -float("inf")
    for value, labels in groups:                      # labels of close ticks alternate above/below
        below = value - previous < 0.06 * span
        ax.text(value, y_mi - 0.42 if below else y_mi + 0.42, " = ".join(labels).replace("$ = $", " = "),
                ha="center", va="top" if below else "bottom", fontsize=8)
        previous = -float("inf") if below else value
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    ax.set_ylim(-0.6, top + 0.7)
    ax.set_xlabel("nats")
    if title:
        ax.set_title(title)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


# ------------------------------------------------------------------------------ estimators vs exact
def plot_estimator_convergence(sizes: Sequence[int], estimates: Mapping[str, np.ndarray],
                               exact: float | None = None, ceiling: Sequence[float] | None = None,
                               ax=None, xlabel: str = "number of points $N$", ylabel: str = "nats",
                               title: str | None = None, logx: bool = True,
                               ylim: tuple[float, float] | None = None, exact_label: str = "exact"):
    """Estimates against sample size, with the exact answer and (optionally) the estimator ceiling.

    ``estimates`` maps a label (a key of ESTIMATOR_COLOURS, or any text) to an array
    ``[num_repeats, len(sizes)]``: the mean is drawn as a line, +-1 sd over repeats as a band.
    ``ceiling``: one value per size (e.g. log N), drawn dashed. ``ylim`` keeps the exact answer
    readable when an estimator diverges; a series leaving it says "(off scale)" in the legend.
    """
    if ax is None:
        ax = new_figure("single")[1][0, 0]
    sizes = np.asarray(sizes)
    for i, (label, values) in enumerate(estimates.items()):
        values = np.atleast_2d(np.asarray(values, dtype=float))
        colour = ESTIMATOR_COLOURS.get(label, OKABE_ITO[i % len(OKABE_ITO)])
        mean, spread = values.mean(0), values.std(0)
        if ylim is not None and ((mean < ylim[0]).any() or (mean > ylim[1]).any()):
            label = f"{label} (off scale)"
        ax.plot(sizes, mean, marker="o", ms=4, color=colour, label=label)
        ax.fill_between(sizes, mean - spread, mean + spread, color=colour, alpha=0.2, lw=0)
    if ceiling is not None:
        ax.plot(sizes, ceiling, ls="--", color=ESTIMATOR_COLOURS["ceiling"], label=r"ceiling $\log N$")
    if exact is not None:
        ax.axhline(exact, color=ESTIMATOR_COLOURS["exact"], lw=1.5, label=f"{exact_label} ({_fmt(exact)})")
    if ylim is not None:
        ax.set_ylim(ylim)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_estimator_comparison(values: Mapping[str, tuple[float, float]], exact: float, ax=None,
                              xlabel: str = "nats", title: str | None = None,
                              xlim: tuple[float, float] | None = None):
    """Horizontal bars of several estimates of one quantity next to the exact value.

    ``values`` maps a label to ``(estimate, ceiling)`` (ceiling ``inf`` = none; a finite
    ceiling is drawn as a grey tick, and the bar is hatched when the estimate sits at it).
    With ``xlim``, bars beyond it are cut at the edge and labelled with their full value.
    """
    if ax is None:
        ax = new_figure("bar")[1][0, 0]
    labels = list(values)
    for y, label in enumerate(labels):
        estimate, ceiling = values[label]
        colour = next((c for key, c in ESTIMATOR_COLOURS.items() if label.startswith(key)),
                      OKABE_ITO[y % len(OKABE_ITO)])
        at_ceiling = np.isfinite(ceiling) and estimate >= ceiling - 0.1
        shown = estimate if xlim is None else float(np.clip(estimate, *xlim))
        ax.barh(y, shown, color=colour, height=0.6, hatch="//" if at_ceiling else None,
                edgecolor="white")
        if np.isfinite(ceiling):
            ax.plot([ceiling, ceiling], [y - 0.4, y + 0.4], color=ESTIMATOR_COLOURS["ceiling"], lw=2)
        clipped = shown != estimate
        ax.text(shown, y, f" {_fmt(estimate)}" + (" (off scale)" if clipped else ""), va="center",
                fontsize=8, ha="right" if clipped and shown == xlim[1] else "left")
    ax.axvline(exact, color=ESTIMATOR_COLOURS["exact"], lw=1.5, ls="-")
    if xlim is not None:
        ax.set_xlim(xlim)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(f"{title} (exact {_fmt(exact)})")
    return ax


def _fmt(value: float) -> str:
    """Two decimals without a spurious minus sign on round-off (-1e-16 -> 0.00)."""
    return f"{round(float(value), 2) + 0.0:.2f}"
