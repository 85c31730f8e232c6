"""Figures comparing estimators with exact answers, and the MI-bound decomposition."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .style import ESTIMATOR_COLOURS, OKABE_ITO, TERM_COLOURS, TERM_LABELS, new_figure

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
    h = "H" if d.entropy_is_exact else r"\hat H"      # a language model's cross-entropy stands in for H
    rows = [                                          # (row label, [(term, left, width)]), top first
        ("$H$" if d.entropy_is_exact else r"$\hat H$ (LM proxy)", [("entropy", 0.0, d.entropy)]),
        ("$-$ELBO", [("distortion", 0.0, d.distortion), ("rate", d.distortion, d.rate)]),
        ("MI bounds", [("lower_gap", d.lower_bound, d.lower_gap),
                       ("upper_gap", d.mutual_information, d.upper_gap)]),
        (f"$-$ELBO $- {h}$", [("lower_gap", 0.0, d.lower_gap), ("upper_gap", d.lower_gap, d.upper_gap)]),
    ]
    labels = TERM_LABELS if d.entropy_is_exact else {
        **TERM_LABELS, "entropy": r"entropy proxy $\hat H$ (LM cross-entropy)", "lower_bound": r"lower bound $\hat H - D$"}
    ends = [v for _, segs in rows for _, left, width in segs for v in (left, left + width)]
    span = max(max(ends) - min(ends + [0.0]), 1e-9)
    top = len(rows) - 1
    for row, (_, segments) in enumerate(rows):
        y = top - row
        for term, left, width in segments:
            ax.barh(y, width, left=left, color=TERM_COLOURS[term], edgecolor="white", height=0.6,
                    label=labels[term])
            if annotate and abs(width) > 0.15 * span:   # only where "123.45" fits inside the bar
                ax.text(left + width / 2, y, f"{width:.2f}", ha="center", va="center", fontsize=8,
                        color="white")
    y_mi = top - 2
    if d.lower_bound > 0:                             # the guaranteed part of I_q, from 0 to H - D
        ax.barh(y_mi, d.lower_bound, color=TERM_COLOURS["lower_bound"], height=0.3, alpha=0.7,
                label=labels["lower_bound"])
    ticks = [(d.lower_bound, f"${h}-D$", "lower_bound"), (d.mutual_information, "$I_q$", "mutual_information"),
             (d.upper_bound, "$R$", "rate")]
    for value, _, term in ticks:
        ax.plot([value, value], [y_mi - 0.38, y_mi + 0.38], color=TERM_COLOURS[term], lw=2.5)
    # a tick whose label would run into the previous label joins it, in order and true as written
    # ("$H-D$ = $I_q$ <= $R$"); every label sits above the row, left-aligned at its first tick
    axis_points = ax.get_position().width * ax.figure.get_size_inches()[0] * 72.0

    def width(text: str) -> float:   # a label's width as a fraction of the axis, roughly (8 pt text)
        visible = text.replace("$", "").replace(r"\leq", "<").replace(r"\hat ", "").replace("_", "")
        return 0.7 * 8.0 * (len(visible) + 2) / axis_points   # mathtext spaces its operators

    groups: list[list] = []   # [first value, text, last value]
    for value, label, _ in sorted(ticks):
        if groups and (value - groups[-1][0]) / span < width(groups[-1][1]) + 0.02:
            joiner = " = " if value - groups[-1][2] < 1e-3 else r" $\leq$ "
            groups[-1][1] += joiner + label
            groups[-1][2] = value
        else:
            groups.append([value, label, value])
    for start, text, _ in groups:
        ax.text(start, y_mi + 0.42, text, ha="left", va="bottom", fontsize=8)
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
    else:   # room on both sides: a value at 0 is not drawn on the spine, its label not outside
        low, high = ax.get_xlim()
        pad = 0.15 * max(high - low, 1.0)
        ax.set_xlim(low - pad, high + 2 * pad)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(f"{title} (exact {_fmt(exact)})")
    return ax


def _fmt(value: float) -> str:
    """Two decimals without a spurious minus sign on round-off (-1e-16 -> 0.00)."""
    return f"{round(float(value), 2) + 0.0:.2f}"
