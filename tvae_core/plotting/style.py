"""Style and palettes: one set of figure sizes, one colour per method and term, for every figure.

Colours are the Okabe-Ito colour-blind-safe palette.
"""
from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.ticker import Locator

from ..methods import METHODS

# ------------------------------------------------------------------------------ style and palettes
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

# The book's text column is ~7.5 in wide at 100 dpi (sphinx-book-theme, a 1,400 px window): a
# figure up to COLUMN_WIDTH is shown at 100 % and its 9-11 pt text stays readable; a 16 in wide
# figure was shrunk to 48 %.
COLUMN_WIDTH = 7.5
FIGURE_SIZES = {                      # inches, for one panel (multi-panel figures scale by ncols/nrows)
    "single": (6.0, 4.0),             # one plot across the text column
    "wide": (7.5, 3.4),               # a row of 2-3 panels
    "panel": (3.6, 3.0),              # one panel of a grid (the grid is capped at COLUMN_WIDTH)
    "bar": (7.0, 3.0),                # horizontal bar charts (a few rows)
}



class _MethodStyle(Mapping):
    """Method label -> one style attribute of its registry entry (:data:`tvae_core.methods.METHODS`),
    read at every access so that a method registered later has its colour too; plus the prior."""

    def __init__(self, attribute: str, prior: str):
        self._attribute, self._prior = attribute, prior

    def _table(self) -> dict[str, str]:
        return {**{m.label: getattr(m, self._attribute) for m in METHODS.values()}, "prior": self._prior}

    def __getitem__(self, method: str) -> str:
        return self._table()[method]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


METHOD_COLOURS = _MethodStyle("colour", prior="#999999")  # one colour per training method, everywhere
METHOD_MARKERS = _MethodStyle("marker", prior="x")

TERM_COLOURS = {                      # the quantities of the rate-distortion picture
    "entropy": "#999999", "distortion": "#0072B2", "rate": "#D55E00",
    "mutual_information": "#009E73", "lower_bound": "#56B4E9", "lower_gap": "#E69F00",
    "upper_gap": "#CC79A7",
}
TERM_LABELS = {
    "entropy": "data entropy $H$", "distortion": "distortion $D$", "rate": "rate $R$",
    "mutual_information": "index-code MI $I_q$", "lower_bound": "lower bound $H - D$",
    "lower_gap": r"lower gap $\mathrm{E}_{q(z)}\,\mathrm{KL}(q(x|z)\,\|\,p(x|z))$",
    "upper_gap": r"upper gap $\mathrm{KL}(q(z)\,\|\,p(z))$",
}

ESTIMATOR_COLOURS = {                 # estimators compared against exact answers
    "exact": "#000000", "self term": "#0072B2", "leave-one-out": "#D55E00", "IW": "#009E73",
    "ELBO": "#999999", "MWS": "#CC79A7", "thesis 640": "#E69F00", "ceiling": "#7F7F7F",
}


def _format_number(value: float) -> str:
    """Tables show 4 significant digits: 129.499384 -> 129.5, 3.831112e-03 -> 0.003831; round-off
    residues (|x| < 1e-9, e.g. 1.776357e-14) are shown as 0."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if abs(value) < 1e-9:
        return "0"
    if abs(value) < 1e-4 or abs(value) >= 1e6:
        return f"{value:.2e}"
    return f"{value:.4g}"


def set_style() -> None:
    """The book's output style; call once per notebook before plotting: the matplotlib/seaborn
    style, figures as SVG (sharp at any zoom; the book's renderer prefers SVG to PNG) and
    pandas tables rounded to 4 significant digits."""
    import pandas as pd

    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("svg")
    except ImportError:  # no IPython display machinery (a plain script): nothing to configure
        pass
    pd.set_option("display.float_format", _format_number)
    sns.set_theme(style="whitegrid", context="notebook", palette=list(OKABE_ITO))
    plt.rcParams.update({
        "figure.figsize": FIGURE_SIZES["single"], "figure.dpi": 100, "savefig.dpi": 150,
        "savefig.bbox": "tight", "axes.titlesize": 12, "axes.labelsize": 11,
        "legend.fontsize": 9, "legend.frameon": False, "axes.spines.top": False,
        "axes.spines.right": False,
        # text stays text in the SVG: searchable, and smaller files. So labels write math with
        # \mathrm, never \mathbb or \mathcal, whose glyphs only matplotlib's own fonts have
        "svg.fonttype": "none",
    })


def new_figure(kind: str = "single", ncols: int = 1, nrows: int = 1, **kwargs):
    """``plt.subplots`` with the book's size for ``kind`` (one of FIGURE_SIZES) per panel."""
    if kind not in FIGURE_SIZES:
        raise ValueError(f"kind={kind!r} is not a figure size; accepted values: {tuple(FIGURE_SIZES)}")
    width, height = FIGURE_SIZES[kind]
    if kind in ("panel", "bar"):
        width, height = width * ncols, height * nrows
        if width > COLUMN_WIDTH:   # a grid wider than the column: shrink the panels, not the text
            # a panel keeps its shape; a bar chart keeps its height, which its rows and labels need
            width, height = COLUMN_WIDTH, height * (COLUMN_WIDTH / width if kind == "panel" else 1.0)
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


# symmetric-log tick candidates in the order they are kept: 0, then +-10^e, then +-5 x 10^e, then
# +-2 x 10^e (e = -4..5)
_SYMLOG_CANDIDATES = np.array([0.0] + [sign * m * 10.0 ** e for m in (1, 5, 2) for e in range(-4, 6) for sign in (1, -1)])


class SymlogTicks(Locator):
    """Ticks for a symmetric-log axis that never crowd: from the candidates (0 first, then powers
    of ten, then 5s and 2s; ``_SYMLOG_CANDIDATES``) keep each one clear of every tick already
    kept, by at least ``min_separation`` of the axis length (in the axis's own scale) and by
    enough for the two labels not to touch (their widths on an x axis, a line of text on a y
    axis, at the axes' size in the figure). A linear region of a few units around 0 then shows 0
    and a tick or two, not a pile of 0.1, 0.2, 0.5 labels; a span of many decades shows the
    powers of ten only; a narrow panel drops the 50 between 20 and 100. No tick below
    ``lowest`` (e.g. 0 on an axis of rates, which cannot be negative, padded below 0)."""

    def __init__(self, min_separation: float = 0.08, lowest: float | None = None):
        self.min_separation = min_separation
        self.lowest = lowest

    def __call__(self):
        low, high = self.axis.get_view_interval()
        return self.tick_values(low, high)

    def _label_room(self) -> tuple[float, float, bool]:
        """(axis length, tick label font size) in points, and whether the axis is horizontal."""
        from matplotlib.font_manager import FontProperties

        horizontal = self.axis.axis_name == "x"
        axes = self.axis.axes
        width, height = axes.figure.get_size_inches() * axes.get_position().size * 72.0
        size = FontProperties(size=plt.rcParams[f"{self.axis.axis_name}tick.labelsize"]).get_size_in_points()
        return (width if horizontal else height), size, horizontal

    def _apart(self, a: float, b: float, distance: float, room: tuple[float, float, bool]) -> bool:
        length, size, horizontal = room
        if horizontal:   # half of each label, at ~0.6 em per character, and a gap of half an em
            need = 0.3 * size * (len(f"{a:g}") + len(f"{b:g}")) + 0.5 * size
        else:
            need = 1.3 * size
        return distance >= max(self.min_separation, need / length if length > 0 else 0.0)

    def tick_values(self, vmin, vmax):
        low, high = min(vmin, vmax), max(vmin, vmax)
        scale = self.axis.get_transform()
        start, end = scale.transform(np.array([low, high], dtype=float))
        if not end > start:
            return [low]
        room = self._label_room()
        shown = _SYMLOG_CANDIDATES[(_SYMLOG_CANDIDATES >= max(low, -np.inf if self.lowest is None else self.lowest))
                                   & (_SYMLOG_CANDIDATES <= high)]
        kept, places = [], []
        for value, place in zip(shown, (scale.transform(shown) - start) / (end - start)):
            if all(self._apart(value, other, abs(place - where), room) for other, where in zip(kept, places)):
                kept.append(float(value))
                places.append(place)
        return sorted(kept)


def symlog_axis(ax, which: str = "x", linthresh: float = 10.0, min_separation: float = 0.08,
                lowest_tick: float | None = None):
    """A symmetric-log axis (linear within ``linthresh`` of 0) with plain-number ticks that never
    crowd (:class:`SymlogTicks`: 0, powers of ten, then 5s and 2s where there is room; none below
    ``lowest_tick``); returns ``ax``."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("symlog", linthresh=linthresh)
    axis.set_major_locator(SymlogTicks(min_separation, lowest_tick))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    return ax


def method_colour(method: str) -> str:
    """The colour of a training method (a registry label: VAE, AE, CYC, FB, MDR, CYC-FB, LM ...; or prior)."""
    if method not in METHOD_COLOURS:
        raise KeyError(f"method={method!r} has no colour; accepted values: {tuple(METHOD_COLOURS)}")
    return METHOD_COLOURS[method]


