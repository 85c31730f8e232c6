"""The vocabulary the pages share when they judge a thesis finding: one on-target tolerance, so
every page calls the same runs "on target".
"""
from __future__ import annotations

# relative: a run's test rate R counts as on its target r when |R - r| <= ON_TARGET_TOLERANCE * r
ON_TARGET_TOLERANCE = 0.10


def relative_deviation(rate: float, target: float) -> float:
    """(R - r) / r: negative below the target, positive above it."""
    if not target > 0:
        raise ValueError(f"target={target!r} must be a rate > 0 (nats)")
    return (rate - target) / target


def on_target(rate: float, target: float, tolerance: float = ON_TARGET_TOLERANCE) -> bool:
    """Whether ``rate`` lies within ``(1 +- tolerance) * target``."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0 (relative)")
    return abs(relative_deviation(rate, target)) <= tolerance
