"""Pyro models of the mixed membership model, their initialisation, and the fitted densities.

Shapes: ``G`` groups, ``N`` samples per group (padded to the largest group, with a mask),
``D`` latent dimensions, ``T`` components, ``r`` the low rank, ``S`` posterior draws.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from .config import MixedMembershipConfig

#: The global latent variables of each family (what the guide covers; assignments are enumerated).
GLOBAL_SITES = {
    "R1": ("sticks", "component_loc", "component_scale"),
    "RD": ("sticks", "component_loc", "component_scale", "component_cov_factor"),
}
MAX_PLATE_NESTING = 2  # groups x samples


def stick_breaking(sticks: torch.Tensor) -> torch.Tensor:
    """Truncated stick-breaking: ``[..., T-1]`` fractions ``v`` -> ``[..., T]`` weights.

    ``w_t = v_t prod_{j<t}(1 - v_j)`` for ``t < T`` and ``w_T = prod_{j<T}(1 - v_j)``, so every
    row sums to one exactly (no mass is lost to the truncation).
    """
    remaining = torch.cumprod(1 - sticks, dim=-1)                      # [..., T-1]
    return F.pad(sticks, (0, 1), value=1.0) * F.pad(remaining, (1, 0), value=1.0)  # [..., T]


def sticks_from_weights(weights: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Inverse of :func:`stick_breaking`, clamped into ``(eps, 1-eps)``:
    ``[..., T]`` -> ``[..., T-1]``."""
    # mass left before stick t, summed from the tail (1 - cumsum would cancel catastrophically)
    before = weights.flip(-1).cumsum(-1).flip(-1)[..., :-1]           # [..., T-1]
    return (weights[..., :-1] / before.clamp_min(1e-30)).clamp(eps, 1 - eps)


def _scale_prior(config: MixedMembershipConfig) -> dist.Distribution:
    if config.scale_prior == "lognormal":
        return dist.LogNormal(torch.tensor(0.0), torch.tensor(config.scale_prior_scale))
    return dist.HalfCauchy(torch.tensor(config.scale_prior_scale))


def _mixing_weights(config: MixedMembershipConfig, groups_plate: pyro.plate) -> torch.Tensor:
    """Per-group weights ``[G, T]`` from Beta(1, alpha) sticks (no sticks when ``T = 1``)."""
    T = config.num_components
    if T == 1:
        return torch.ones(groups_plate.size, 1)
    with groups_plate, pyro.plate("stick_index", T - 1, dim=-1):
        sticks = pyro.sample("sticks", dist.Beta(torch.tensor(1.0), torch.tensor(config.alpha)))
    return stick_breaking(sticks)                                      # [G, T]


def mmm_model(data: torch.Tensor, mask: torch.Tensor | None,
              config: MixedMembershipConfig) -> None:
    """The MMM as a Pyro model; the assignment ``c`` is enumerated in parallel.

    R1: ``data`` ``[G, M]`` scalars (``M = N * D``: every coordinate is an observation).
    RD: ``data`` ``[G, N, D]``. ``mask`` (``[G, M]`` / ``[G, N]``, bool, or None when no group is
    padded) hides padding; it is applied to the observation only, so a padded slot contributes
    ``log sum_t w_t = 0``.
    """
    T, G = config.num_components, data.shape[0]
    D = data.shape[-1] if config.family == "RD" else 1
    zero = torch.tensor(0.0)
    with pyro.plate("components", T, dim=-1):
        loc = pyro.sample("component_loc", dist.Normal(zero, config.loc_prior_scale)
                          .expand([T, D]).to_event(1))                  # [T, D]
        scale = pyro.sample("component_scale", _scale_prior(config).expand([T, D]).to_event(1))
        if config.family == "RD":
            factor = pyro.sample("component_cov_factor",
                                 dist.Normal(zero, config.factor_prior_scale)
                                 .expand([T, D, config.low_rank]).to_event(2))  # [T, D, r]
    groups_plate = pyro.plate("groups", G, dim=-2)  # one object, entered twice
    weights = _mixing_weights(config, groups_plate)                    # [G, T]
    params = {"component_loc": loc, "component_scale": scale}
    if config.family == "RD":
        params["component_cov_factor"] = factor
    with groups_plate, pyro.plate("samples", data.shape[1], dim=-1):
        c = pyro.sample("assignment", dist.Categorical(probs=weights.unsqueeze(-2)),
                        infer={"enumerate": "parallel"})               # [T, 1, 1] when enumerated
        likelihood = AssignedComponent(config.family, params, c)
        pyro.sample("obs", likelihood if mask is None else likelihood.mask(mask), obs=data)


def component_log_prob_table(family: str, params: dict[str, torch.Tensor],
                             value: torch.Tensor) -> torch.Tensor:
    """``log N(value; theta_t)`` for every component: ``[T, *batch]`` for ``value`` ``[*batch]``
    (R1, scalars) or ``[*batch, D]`` (RD); params ``[T, D]`` / ``[T, D, r]`` (one draw).

    RD uses the Woodbury identity with ``Sigma_t = W_t W_t^T + diag(sigma_t^2)``,
    ``C_t = I_r + W_t^T diag(sigma_t^-2) W_t = L_t L_t^T``::

        log N = -1/2 [D log 2pi + 2 sum_d log sigma_td + 2 log|L_t|
                      + sum_d (x - mu_t)_d^2 / sigma_td^2
                      - ||L_t^-1 W_t^T diag(sigma_t^-2) (x - mu_t)||^2]

    with one batched matmul over components, rather than torch's ``LowRankMultivariateNormal``,
    whose ``[T, 1, 1]``-vs-``[G, N]`` broadcasting copies ``W_t`` for every sample.
    """
    loc, scale = params["component_loc"], params["component_scale"]
    T = loc.shape[0]
    if family == "R1":
        view = (T,) + (1,) * value.dim()
        return dist.Normal(loc.reshape(view), scale.reshape(view)).log_prob(value)  # [T, *batch]
    factor = params["component_cov_factor"]                            # [T, D, r]
    batch, D = value.shape[:-1], value.shape[-1]
    precision = scale.pow(-2)                                          # [T, D]
    scaled_factor = factor * precision.unsqueeze(-1)                   # [T, D, r] = D^-1 W
    capacitance = torch.eye(factor.shape[-1]) + factor.mT @ scaled_factor  # [T, r, r]
    chol = torch.linalg.cholesky(capacitance)
    diff = value.reshape(1, -1, D) - loc.unsqueeze(1)                  # [T, M, D]
    maha_diag = (diff.pow(2) * precision.unsqueeze(1)).sum(-1)         # [T, M]
    projected = torch.linalg.solve_triangular(chol, (diff @ scaled_factor).mT, upper=False)
    maha = maha_diag - projected.pow(2).sum(-2)                        # [T, M]
    log_det = 2 * scale.log().sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [T]
    log_prob = -0.5 * (D * math.log(2 * math.pi) + log_det.unsqueeze(-1) + maha)
    return log_prob.reshape((T,) + batch)                              # [T, *batch]


class AssignedComponent(TorchDistribution):
    """``p(value | c)``: the ``c``-th shared component, for an assignment tensor ``c``.

    ``log_prob`` builds the ``[T, ...]`` table of all components once and picks entries by
    ``c``. Under parallel enumeration Pyro passes ``c = arange(T)`` shaped ``[T, 1, 1]``, and the
    table is the answer as is (no gather).
    """

    arg_constraints = {}

    def __init__(self, family: str, params: dict[str, torch.Tensor], assignment: torch.Tensor,
                 batch_shape: torch.Size | None = None):
        self.family, self.params, self.assignment = family, params, assignment
        event_shape = params["component_loc"].shape[-1:] if family == "RD" else torch.Size()
        batch_shape = assignment.shape if batch_shape is None else torch.Size(batch_shape)
        super().__init__(batch_shape, event_shape, validate_args=False)

    @property
    def support(self):
        return constraints.real_vector if self.family == "RD" else constraints.real

    def expand(self, batch_shape, _instance=None):
        return AssignedComponent(self.family, self.params, self.assignment, batch_shape)

    def _selected(self) -> dist.Distribution:
        c = self.assignment.expand(self.batch_shape)
        if self.family == "R1":
            return dist.Normal(self.params["component_loc"][c, 0],
                               self.params["component_scale"][c, 0])
        return dist.LowRankMultivariateNormal(self.params["component_loc"][c],
                                              self.params["component_cov_factor"][c],
                                              self.params["component_scale"][c] ** 2)

    def sample(self, sample_shape=torch.Size()):
        return self._selected().sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        table = component_log_prob_table(self.family, self.params, value)  # [T, *value_batch]
        T, value_batch = table.shape[0], table.shape[1:]
        shape = torch.broadcast_shapes(self.batch_shape, value_batch)
        c = self.assignment
        enumerated = (c.dim() == len(shape) > len(value_batch) and c.shape[0] == T
                      and c.numel() == T and bool((c.reshape(-1) == torch.arange(T)).all()))
        if enumerated:  # table[t] is already log p(value | c = t), t on c's leftmost dim
            pad = (1,) * (len(shape) - 1 - len(value_batch))
            return table.reshape((T,) + pad + value_batch).expand(shape)
        pad = (1,) * (len(shape) - len(value_batch))
        table = table.reshape((T,) + pad + value_batch).expand((T,) + shape)
        return table.gather(0, c.expand(shape).unsqueeze(0)).squeeze(0)


# ----------------------------------------------------------------------------- initialisation
def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations; ``x`` ``[M, D]`` -> centroids ``[k, D]``."""
    first = torch.randint(len(x), (1,), generator=generator)
    centroids = x[first]
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).min(dim=1).values ** 2          # [M]
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=generator)]])
    for _ in range(iterations):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        for t in range(k):  # an emptied cluster keeps its old centroid
            members = x[assign == t]
            if len(members):
                centroids[t] = members.mean(0)
    return centroids


def initial_values(fit_groups: list[torch.Tensor], config: MixedMembershipConfig,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Start SVI near a good optimum: k-means over the pooled fit samples gives the locs,
    per-cluster spreads give the scales, and each group's cluster fractions give its sticks."""
    T = config.num_components
    if config.family == "R1":
        points = [g.reshape(-1, 1) for g in fit_groups]                 # scalars
    else:
        points = list(fit_groups)
    pooled = torch.cat(points)
    if len(pooled) > config.kmeans_max_points:
        pooled = pooled[torch.randperm(len(pooled), generator=generator)[:config.kmeans_max_points]]
    centroids = kmeans(pooled, T, config.kmeans_iterations, generator)   # [T, Dc]
    assign = torch.cdist(pooled, centroids).argmin(dim=1)
    overall_std = pooled.std(0).clamp_min(1e-2)
    scale = torch.stack([pooled[assign == t].std(0) if (assign == t).sum() > 1 else overall_std
                         for t in range(T)]).nan_to_num(1.0).clamp_min(1e-2)  # [T, Dc]
    values = {"component_loc": centroids, "component_scale": scale}
    if config.family == "RD":
        D = pooled.shape[1]
        # W = 0 is a stationary point of the likelihood; start slightly off it
        values["component_cov_factor"] = 0.1 * torch.randn(T, D, config.low_rank,
                                                           generator=generator)
    if T > 1:
        weights = torch.stack([torch.bincount(torch.cdist(g, centroids).argmin(1), minlength=T)
                               .float() for g in points])               # [G, T] counts
        weights = (weights + 1.0) / (weights + 1.0).sum(-1, keepdim=True)  # add-one smoothing
        values["sticks"] = sticks_from_weights(weights)
    return values


# ----------------------------------------------------------------------------- fitted density
def component_distribution(params: dict[str, torch.Tensor], family: str):
    """Components with batch shape ``[S, T]`` from posterior draws (each param ``[S, T, ...]``)."""
    if family == "R1":
        return dist.Normal(params["component_loc"][..., 0], params["component_scale"][..., 0])
    return dist.LowRankMultivariateNormal(params["component_loc"],
                                          params["component_cov_factor"],
                                          params["component_scale"] ** 2)


def group_log_density(weights: torch.Tensor, params: dict[str, torch.Tensor], family: str,
                      z: torch.Tensor) -> torch.Tensor:
    """``log q_hat_g(z)`` for one group: ``weights`` ``[S, T]`` (probabilities), ``z`` ``[N, D]``
    -> ``[N]``.

    ``q_hat_g(z) = (1/S) sum_s sum_t w_{s,t} N(z; theta_{s,t})`` in RD; in R1 the density of a
    D-vector is the product over coordinates of the 1-D mixture, as in the model. The weights
    are passed as ``probs`` (the original code passed them as logits). Averaging densities
    over the S posterior draws (not log densities) makes q_hat_g the posterior predictive
    density; S identical draws give the density of one (tests/test_mmm.py).
    """
    mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights),
                                     component_distribution(params, family))  # batch [S]
    if family == "R1":
        log_q = mixture.log_prob(z.unsqueeze(-1)).sum(-2)             # [N, D, S] -> [N, S]
    else:
        log_q = mixture.log_prob(z.unsqueeze(-2))                     # [N, S]
    return torch.logsumexp(log_q, dim=-1) - math.log(weights.shape[0])  # [N]
