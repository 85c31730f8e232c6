"""Estimates at their estimator's limit, drawn as bounds.

An aggregate-posterior MI estimate with the self term cannot exceed log N, and the marginal KL of
the same samples cannot go below rate - log N (:mod:`tvae_core.estimators.aggregate`). A point at
that limit says "at least" (MI) or "at most" (marginal KL), so it gets an arrow from the marker
towards where the truth can lie, and a legend entry that says so.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.lines import Line2D

_ARROWS = {"up": (0, 1, r"$\uparrow$"), "down": (0, -1, r"$\downarrow$"), "right": (1, 0, r"$\rightarrow$")}


def mark_at_limit(ax, xs, ys, at_limit: Sequence[bool], direction: str, label: str, *,
                  length: float = 16.0, colour: str = "black"):
    """An arrow of ``length`` points from each ``(xs[i], ys[i])`` with ``at_limit[i]``, pointing
    ``direction`` ("up": a lower bound, "down": an upper bound, "right": a lower bound on a
    horizontal axis), and one legend entry ``label`` (none when no point is at its limit).
    Works on linear and symmetric-log axes alike (the arrow's length is in points). Returns ``ax``."""
    if direction not in _ARROWS:
        raise ValueError(f"direction={direction!r}; accepted values: {tuple(_ARROWS)}")
    dx, dy, symbol = _ARROWS[direction]
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    flags = list(at_limit)
    if not (len(xs) == len(ys) == len(flags)):
        raise ValueError("xs, ys and at_limit must have the same length")
    for x, y, flag in zip(xs, ys, flags):
        if flag and np.isfinite(x) and np.isfinite(y):
            # arrowstyle "<-": the head sits at xytext, the far end of the arrow from the point
            ax.annotate("", xy=(x, y), xytext=(dx * length, dy * length), textcoords="offset points",
                        arrowprops=dict(arrowstyle="<-", color=colour, lw=1.1, shrinkA=0, shrinkB=4),
                        annotation_clip=False, zorder=4)
    if any(flags):
        ax.add_line(Line2D([], [], ls="none", marker=symbol, markersize=9, color=colour, label=label))
    return ax
