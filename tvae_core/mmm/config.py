"""Configuration of the mixed membership model (MMM): one frozen dataclass, validated early."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check_choice

FAMILIES = ("R1", "RD")
GUIDES = ("map", "meanfield")
SCALE_PRIORS = ("lognormal", "halfcauchy")


@dataclass(frozen=True)
class MixedMembershipConfig:
    """Everything that identifies one MMM fit (frozen, hashable: usable as a cache key).

    Generative model, for groups ``g = 1..G`` and shared components ``t = 1..T``::

        v_{g,t}  ~ Beta(1, alpha)                    t < T   (truncated stick-breaking)
        w_{g,t}  = v_{g,t} prod_{j<t} (1 - v_{g,j}),  w_{g,T} = prod_{j<T} (1 - v_{g,j})
        mu_t     ~ Normal(0, loc_prior_scale)        [D] in RD, scalar in R1
        sigma_t  ~ LogNormal(0, scale_prior_scale)   (or HalfCauchy(scale_prior_scale))
        W_t      ~ Normal(0, factor_prior_scale)     [D, low_rank], RD only
        RD:  c_{g,n}   ~ Categorical(probs=w_g),  z_{g,n} | c ~ LowRankMVN(mu_c, W_c, sigma_c^2)
        R1:  c_{g,n,d} ~ Categorical(probs=w_g),  z_{g,n,d} | c ~ Normal(mu_c, sigma_c)

    The assignments ``c`` are enumerated out, never sampled. In R1 every scalar coordinate is an
    observation with its own assignment, so a group's density of a D-vector is the product over
    coordinates of one shared 1-D mixture: it ignores correlations and differences between
    coordinates, and its marginal KL is a looser lower bound than RD's.
    """

    # "R1": one set of 1-D components shared by all coordinates; "RD": low-rank-plus-diagonal MVNs
    family: str = "RD"
    num_components: int = 10         # T, the truncation level (the thesis' heatmaps show 10)
    # DP concentration. Beta(1, 1) sticks are uniform; alpha < 1 makes the Beta density unbounded
    # at v = 1, which a MAP fit can chase
    alpha: float = 1.0
    low_rank: int = 4                # rank of W_t (RD); at D = 32: 4 x 32 + 2 x 32 = 192 numbers
    loc_prior_scale: float = 5.0     # wide: autoencoder latents sit far from the origin
    scale_prior: str = "lognormal"   # prior on the component standard deviations sigma_t
    scale_prior_scale: float = 2.0   # LogNormal(0, 2): 95% of the prior mass in [0.02, 50]
    factor_prior_scale: float = 0.5  # small: shrinks W_t towards a diagonal covariance
    # SVI steps. From the k-means start, at 19 groups x 1000 x 32 dims, T = 10, marginal KLs move
    # < 0.03 nats between 200 and 600 steps (RD) and between 150 and 300 (R1)
    num_steps: int = 300
    learning_rate: float = 0.05      # Adam step size at step 0 (unconstrained space)
    final_lr_fraction: float = 0.1   # the step size decays geometrically to this fraction
    clip_norm: float = 10.0          # ClippedAdam gradient-norm clip; guards the first steps
    guide: str = "map"               # "map": AutoDelta point estimate; "meanfield": AutoNormal
    num_posterior_samples: int = 64  # meanfield: guide draws averaged in the predictive density
    heldout_fraction: float = 0.3    # of each group, used for evaluation only (never fitted)
    kmeans_iterations: int = 10      # Lloyd steps of the k-means initialisation
    kmeans_max_points: int = 20_000  # subsample for that initialisation (R1 pools G x N x D)
    seed: int = 0                    # split, initialisation and SVI noise

    def __post_init__(self) -> None:
        check_choice("family", self.family, FAMILIES)
        check_choice("guide", self.guide, GUIDES)
        check_choice("scale_prior", self.scale_prior, SCALE_PRIORS)
        for name in ("num_components", "low_rank", "num_steps", "num_posterior_samples",
                     "kmeans_max_points"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("kmeans_iterations", self.kmeans_iterations, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("alpha", "loc_prior_scale", "scale_prior_scale", "factor_prior_scale",
                     "learning_rate", "clip_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")
        for name in ("heldout_fraction", "final_lr_fraction"):
            value = getattr(self, name)
            low_ok = value > 0
            high_ok = value < 1 if name == "heldout_fraction" else value <= 1
            if not (isinstance(value, (int, float)) and low_ok and high_ok):
                bound = "(0, 1)" if name == "heldout_fraction" else "(0, 1]"
                raise ValueError(f"{name}={value!r} must lie in {bound}")

    @classmethod
    def from_profile(cls, mmm_size, **overrides) -> "MixedMembershipConfig":
        """Config from a profile's ``MixedMembershipSize`` (``get_profile(name).mmm``)."""
        values = dict(num_components=mmm_size.num_components, num_steps=mmm_size.num_steps,
                      low_rank=mmm_size.low_rank)
        values.update(overrides)
        return cls(**values)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
