"""Input checks shared by the estimators: fail early, name the parameter and what it accepts."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def check_int_at_least(name: str, value, minimum: int) -> int:
    # bool is an int subclass: True as K was defect 3 of the original code
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return value


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite float > 0; got {value!r}")
    return float(value)


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} has {bad} non-finite entries (nan or inf); all entries must be finite")
    return tensor


def check_loc_scale(loc: torch.Tensor, scale: torch.Tensor, *, min_points: int = 1) -> None:
    """``loc``/``scale`` of N diagonal Gaussians: both ``[N, D]``, finite, ``scale > 0``."""
    check_finite("loc", loc)
    check_finite("scale", scale)
    if loc.dim() != 2:
        raise ValueError(f"loc must have shape [N, D] (num_points, latent_dim); got {tuple(loc.shape)}")
    if scale.shape != loc.shape:
        raise ValueError(f"scale must have the same shape as loc {tuple(loc.shape)}; "
                         f"got {tuple(scale.shape)}")
    if not (scale > 0).all():
        raise ValueError("scale must be > 0 everywhere (standard deviations, not log-variances)")
    if loc.shape[0] < min_points:
        raise ValueError(f"the number of points N = loc.shape[0] must be >= {min_points}; "
                         f"got N = {loc.shape[0]}")


def check_ladder(name: str, values: Sequence[int]) -> tuple[int, ...]:
    """A ladder of sample sizes: non-empty, ints >= 1, strictly increasing."""
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must be a non-empty increasing sequence of ints >= 1; got ()")
    for v in values:
        check_int_at_least(f"every entry of {name}", v, 1)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly increasing; got {values}")
    return values
