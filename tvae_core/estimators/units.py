"""Active units and per-dimension KL, from the posterior parameters of N sequences."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_loc_scale, check_positive_float


@dataclass(frozen=True)
class ActiveUnits:
    """Dimensions whose posterior mean moves with x: Var_x E_q[z_d] > ``threshold`` (Burda et al., 2016)."""
    num_active: int
    active: torch.Tensor              # [D] bool
    variance_of_means: torch.Tensor   # [D]
    threshold: float


def active_units(loc: torch.Tensor, threshold: float = 0.01) -> ActiveUnits:
    """Count active units: A_d = Var_x(E_q(z|x)[z_d]) over the N rows of ``loc`` [N, D].

    Bias: the sample variance (N - 1 denominator) is unbiased for Var_x; the threshold 0.01 is
    Burda et al.'s convention, not a test -- with small N a dimension near 0.01 can flip.
    Cost O(N D).
    """
    check_loc_scale(loc, torch.ones_like(loc), min_points=2)
    threshold = check_positive_float("threshold", threshold)
    variance = loc.double().var(dim=0, correction=1)                        # [D]
    active = variance > threshold
    return ActiveUnits(num_active=int(active.sum()), active=active, variance_of_means=variance,
                       threshold=threshold)


def kl_per_dimension(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rate per dimension, E_x KL(q(z_d|x) || N(0, 1)), analytic, averaged over the N rows: ``[D]``.

    KL_d = 1/2 (mu_d^2 + sigma_d^2 - 1 - log sigma_d^2); exact per point, so the only error is
    the sampling of x (standard error sd/sqrt(N)). Sums to the rate.
    """
    check_loc_scale(loc, scale)
    loc, scale = loc.double(), scale.double()
    return (0.5 * (loc.pow(2) + scale.pow(2) - 1.0 - 2.0 * scale.log())).mean(0)   # [D]
