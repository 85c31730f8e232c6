"""Style and palettes: one set of figure sizes, one colour per method and term, for every figure.

Colours are the Okabe-Ito colour-blind-safe palette.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
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


def finish_axes(ax, xlabel: str, ylabel: str, title: str | None = None, legend: bool = True):
    """The last step of every figure function: axis labels, optional title and legend; returns ``ax``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    return ax


def method_colour(method: str) -> str:
    """The colour of a training method (VAE, AE, CYC, FB, MDR, CYC-FB, prior, LM)."""
    if method not in METHOD_COLOURS:
        raise KeyError(f"method={method!r} has no colour; accepted values: {tuple(METHOD_COLOURS)}")
    return METHOD_COLOURS[method]


