"""The aggregate posterior q(z) = (1/N) sum_n q(z|x_n) and what is estimated from it.

From N posteriors q(z|x_n) = N(loc_n, diag(scale_n^2)) and z_i ~ q(z|x_i) (so z_i ~ q(z)):

* log q(z_i) ~= logmeanexp_n log q(z_i|x_n), computed in float64 and in chunks of rows so the
  N x N (x D) tensor is never materialised;
* index-code MI      I_q(X;Z) = E[log q(z_i|x_i) - log q(z_i)]           (Hoffman & Johnson, 2016)
* marginal KL        KL(q(z)||p(z)) = E[log q(z_i) - log p(z_i)]
* total correlation  TC = E[log q(z_i) - sum_d log q(z_id)]               (Chen et al., 2018)
* dimension-wise KL  sum_d E[log q(z_id) - log p(z_id)]

All four use the same samples, so (up to float rounding) MI + marginal KL = the Monte Carlo rate
and marginal KL = TC + dimension-wise KL hold *exactly* for the estimates.

The self term (n = i) decides the bias
--------------------------------------
* **self term included** (``leave_one_out=False``, the default): log q(z_i) >= log q(z_i|x_i) -
  log N, so every MI term is <= log N: the estimate cannot exceed the **ceiling log N** whatever
  the true MI. In expectation it is a *lower bound* on MI (InfoNCE with the optimal critic,
  Poole et al. 2019), so log q(z) is biased up, MI down, and marginal KL *up* (MI + KL = rate).
  Default because its bias directions are guaranteed: the MI is never over-claimed and a small
  marginal KL is a safe conclusion (the estimate is an upper bound in expectation); its failure
  mode (MI near log N) is flagged by ``at_ceiling``.
* **leave-one-out** (``leave_one_out=True``): log q(z_i) ~= logmeanexp over the N - 1 other
  points, an unbiased estimate of q(z_i) inside a log, so log q(z) is biased *down* (Jensen):
  MI is an *upper bound* in expectation (Poole et al.'s L1Out) with no ceiling, marginal KL is
  biased down and can come out negative.

Report both (:func:`self_and_leave_one_out_terms`, one pass): the truth lies between them in
expectation; when they disagree, N is too small for the information in the code.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ._checks import check_finite, check_int_at_least, check_loc_scale, check_positive_float
from .bounds import LOG_2PI, PosteriorParameters, _device_of, _iterate, _to_device, standard_normal

CHUNK_ELEMENTS = 2 ** 22   # float64 entries per chunk (32 MB): bounds memory whatever N is; a chunk
# at most the allocator's mmap threshold (tvae_core.allocator) is reused, not page-faulted in afresh


@dataclass(frozen=True)
class LimitedEstimate:
    """An estimate together with the range the estimator can return on this input.

    ``at_ceiling`` (``at_floor``) is True when ``value`` is within the tolerance of ``ceiling``
    (``floor``): the number then says "at least this" ("at most this") about the estimator's
    limit rather than about the model. ``bias`` is the direction of the estimator's bias in
    expectation ("down", "up" or "unknown").
    """
    value: float
    standard_error: float     # sd of the per-sample terms / sqrt(M); terms share the pool, so approximate
    ceiling: float            # math.inf when there is none
    floor: float              # -math.inf when there is none
    at_ceiling: bool
    at_floor: bool
    bias: str


@dataclass(frozen=True)
class AggregatePosteriorTerms:
    """Index-code MI, marginal KL and Chen et al.'s decomposition from one set of samples.

    ``rate`` is the Monte Carlo rate on the same samples, so ``mutual_information.value +
    marginal_kl.value == rate`` and ``marginal_kl.value == total_correlation +
    dimensionwise_kl`` up to float rounding (``decomposition_discrepancy``).
    """
    mutual_information: LimitedEstimate
    marginal_kl: LimitedEstimate
    rate: float
    total_correlation: float | None              # None when decompose=False
    dimensionwise_kl: float | None
    dimensionwise_kl_per_dimension: torch.Tensor | None   # [D]
    decomposition_discrepancy: float | None      # marginal_kl - (TC + dimension-wise KL)
    num_points: int                              # N posteriors in the mixture
    num_samples: int                             # z samples per sampled point (M = num_samples * N_s)
    leave_one_out: bool
    estimator: str                               # a label for tables and plots
    sampled_points: int | None = None            # N_s points whose z form the Monte Carlo average (None: all N)


# ------------------------------------------------------------------------------ kernels
# log N(z; mu, s^2) = -z^2/(2 s^2) + z mu/s^2 - mu^2/(2 s^2) - log s - log(2 pi)/2 is linear in the
# features (z^2, z, 1), so the log-densities of a chunk of rows against all N components are ONE
# matmul (BLAS, float64); that and an in-place logsumexp are the whole cost. Rounding: at most
# ~1e-16 * mu^2 / s^2 per entry, far below Monte Carlo noise; the self term is computed directly.
def _features(z: torch.Tensor) -> torch.Tensor:
    """(z^2, z, 1) per dimension: ``[M, D]`` -> ``[D, M, 3]``."""
    return torch.stack([z.pow(2), z, torch.ones_like(z)], dim=-1).permute(1, 0, 2)


def _weights(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The matching coefficients per component and dimension: ``[N, D]`` -> ``[D, 3, N]``."""
    precision = scale.pow(-2)
    const = -0.5 * loc.pow(2) * precision - scale.log() - 0.5 * LOG_2PI
    return torch.stack([-0.5 * precision, loc * precision, const], dim=1).permute(2, 1, 0)


def _logsumexp_(values: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that reuses ``values`` as scratch (it is overwritten): one allocation less."""
    peak = values.amax(dim, keepdim=True)
    return values.sub_(peak).exp_().sum(dim).log_().add_(peak.squeeze(dim))


def _self_log_density(z, loc, scale, point_index):
    """log q(z_m | x_{point_index[m]}) per dimension, computed directly (exact): ``[M, D]``."""
    standardised = (z - loc[point_index]) / scale[point_index]
    return -0.5 * standardised.pow(2) - scale[point_index].log() - 0.5 * LOG_2PI


def _log_sum_exp_over_points(z, point_index, loc, scale, *, per_dimension: bool,
                             chunk_size: int | None, progress: bool = False):
    """logsumexp_n log q(z_m | x_n) over the N mixture components, *excluding* each row's own
    component when ``point_index`` is given (the caller adds the exact self term back with
    logaddexp, so one pass serves both estimators). Joint density: ``[M]``; per dimension
    (``per_dimension=True``, D times the cost): ``[M, D]``.
    """
    num_rows, num_points, dim = z.shape[0], loc.shape[0], loc.shape[1]
    row_elements = num_points * (dim if per_dimension else 1)
    step = chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // row_elements)
    features, weights = _features(z), _weights(loc, scale)                 # [D, M, 3], [D, 3, N]
    if not per_dimension:                                                  # sum over dimensions
        features = features.permute(1, 0, 2).reshape(num_rows, 3 * dim)    # [M, 3D]
        weights = weights.reshape(3 * dim, num_points)                     # [3D, N]
    # one buffer for every chunk: a fresh chunk-sized tensor per chunk is fresh memory to fault in
    buffer = torch.empty(min(step, num_rows) * row_elements, dtype=features.dtype, device=features.device)
    out = []
    starts = range(0, num_rows, step)
    for start in tqdm(starts, disable=not progress, leave=False,
                      desc="log q(z_d)" if per_dimension else "log q(z)"):
        stop = min(start + step, num_rows)
        if per_dimension:
            log_dens = buffer[:dim * (stop - start) * num_points].view(dim, stop - start, num_points)
            torch.bmm(features[:, start:stop], weights, out=log_dens)      # [D, c, N]
        else:
            log_dens = buffer[:(stop - start) * num_points].view(stop - start, num_points)
            torch.mm(features[start:stop], weights, out=log_dens)          # [c, N]
        if point_index is not None:
            rows = torch.arange(stop - start)
            log_dens[..., rows, point_index[start:stop]] = -math.inf       # drop the self term
        out.append(_logsumexp_(log_dens, dim=-1))                          # [c] or [D, c]
    return torch.cat(out, dim=-1).T if per_dimension else torch.cat(out)   # [M, D] or [M]


# ------------------------------------------------------------------------------ public API
def sample_aggregate_posterior(loc: torch.Tensor, scale: torch.Tensor, num_samples: int = 1,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """z[s, n] ~ q(z|x_n): ``num_samples`` draws per point, ``[S, N, D]``; together, draws from q(z)."""
    check_loc_scale(loc, scale)
    check_int_at_least("num_samples", num_samples, 1)
    return loc + scale * standard_normal((num_samples, *loc.shape), loc, generator)


def log_aggregate_posterior(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, *,
                            leave_one_out: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """log q(z) = logmeanexp_n log q(z | x_n) at the rows of ``z``.

    ``z``: ``[M, D]`` anywhere (with ``leave_one_out=False``), or ``[N, D]`` / ``[S, N, D]`` with
    ``z[..., i, :] ~ q(z|x_i)`` -- then the self term n = i is known: kept (mean over N) or, with
    ``leave_one_out=True``, dropped (mean over the N - 1 others). See the module docstring for the
    bias of each. Cost O(M N D) in float64, memory O(chunk_size x N). Returns ``z.shape[:-1]``.
    """
    check_loc_scale(loc, scale, min_points=2 if leave_one_out else 1)
    check_finite("z", z)
    num_points, dim = loc.shape
    if z.shape[-1] != dim:
        raise ValueError(f"z must have latent_dim = {dim} as its last axis; got shape {tuple(z.shape)}")
    loc64, scale64, z64 = loc.double(), scale.double(), z.double().reshape(-1, dim)  # [M, D]
    aligned = z.dim() in (2, 3) and z.shape[-2] == num_points
    if leave_one_out and not aligned:
        raise ValueError(f"leave_one_out=True needs z of shape [N, D] or [S, N, D] aligned with loc "
                         f"(N = {num_points}); got {tuple(z.shape)}")
    if not aligned:
        lse = _log_sum_exp_over_points(z64, None, loc64, scale64, per_dimension=False,
                                       chunk_size=chunk_size)
        return (lse - math.log(num_points)).reshape(z.shape[:-1])
    point_index = torch.arange(num_points).repeat(z64.shape[0] // num_points)   # [M]
    others = _log_sum_exp_over_points(z64, point_index, loc64, scale64, per_dimension=False,
                                      chunk_size=chunk_size)
    if leave_one_out:
        return (others - math.log(num_points - 1)).reshape(z.shape[:-1])
    self_term = _self_log_density(z64, loc64, scale64, point_index).sum(-1)
    return (torch.logaddexp(others, self_term) - math.log(num_points)).reshape(z.shape[:-1])


def _limited(terms: torch.Tensor, ceiling: float, floor: float, tolerance: float, bias: str):
    value = float(terms.mean())
    se = float(terms.std(correction=1) / math.sqrt(terms.numel())) if terms.numel() > 1 else math.nan
    return LimitedEstimate(value=value, standard_error=se, ceiling=ceiling, floor=floor,
                           at_ceiling=value >= ceiling - tolerance, at_floor=value <= floor + tolerance,
                           bias=bias)


def _terms(log_cond, log_prior, log_q, log_q_dims, log_prior_dims, *, num_points, num_samples,
           leave_one_out, tolerance, estimator, ceiling=None, bias=None, sampled_points=None):
    """Assemble the result from per-sample log densities (all ``[M]``, or ``[M, D]`` per dimension).
    ``ceiling`` / ``bias`` override log N and the self-term bias directions (for thesis_style)."""
    rate_terms = log_cond - log_prior                                       # [M]
    rate = float(rate_terms.mean())
    if leave_one_out:
        mi_ceiling, kl_floor, mi_bias, kl_bias = math.inf, -math.inf, "up", "down"
    else:
        mi_ceiling = math.log(num_points) if ceiling is None else ceiling
        kl_floor, mi_bias, kl_bias = rate - mi_ceiling, "down", "up"
    if bias is not None:
        mi_bias = kl_bias = bias
    mi = _limited(log_cond - log_q, mi_ceiling, -math.inf, tolerance, mi_bias)
    kl = _limited(log_q - log_prior, math.inf, kl_floor, tolerance, kl_bias)
    tc = dimwise = per_dim = discrepancy = None
    if log_q_dims is not None:
        tc = float((log_q - log_q_dims.sum(-1)).mean())
        per_dim = (log_q_dims - log_prior_dims).mean(0)                     # [D]
        dimwise = float(per_dim.sum())
        discrepancy = kl.value - (tc + dimwise)
    return AggregatePosteriorTerms(
        mutual_information=mi, marginal_kl=kl, rate=rate, total_correlation=tc,
        dimensionwise_kl=dimwise, dimensionwise_kl_per_dimension=per_dim,
        decomposition_discrepancy=discrepancy, num_points=num_points, num_samples=num_samples,
        leave_one_out=leave_one_out, estimator=estimator, sampled_points=sampled_points)


def self_and_leave_one_out_terms(loc: torch.Tensor, scale: torch.Tensor, *, num_samples: int = 1,
                                 generator: torch.Generator | None = None, decompose: bool = False,
                                 ceiling_tolerance: float = 0.1, chunk_size: int | None = None,
                                 progress: bool = False, sampled_points: int | None = None
                                 ) -> tuple[AggregatePosteriorTerms, AggregatePosteriorTerms]:
    """Both aggregate-posterior estimators from the same samples and the same pass.

    Returns ``(self_term_included, leave_one_out)``; see :func:`aggregate_posterior_terms`.

    ``sampled_points`` = N_s < N draws z only for N_s points chosen at random without replacement
    (``generator``): the outer Monte Carlo average runs over their M = S N_s samples while every
    log q(z) still mixes all N components. The expectation of each estimate, its bias, the MI
    ceiling log N and the marginal-KL floor are those of the full estimator; only the Monte Carlo
    error grows (``standard_error`` ~ 1/sqrt(M)), and the cost falls by N / N_s. None: all N.
    """
    check_loc_scale(loc, scale, min_points=2)
    check_int_at_least("num_samples", num_samples, 1)
    tolerance = check_positive_float("ceiling_tolerance", ceiling_tolerance)
    loc64, scale64 = loc.double(), scale.double()
    num_points, dim = loc64.shape
    if sampled_points is None or sampled_points >= num_points:
        sampled_points, points = None, torch.arange(num_points)
    else:
        check_int_at_least("sampled_points", sampled_points, 2)
        points = torch.randperm(num_points, generator=generator)[:sampled_points].sort().values
    z = sample_aggregate_posterior(loc64[points], scale64[points], num_samples,
                                   generator).reshape(-1, dim)                                 # [M, D]
    point_index = points.repeat(num_samples)                                                   # [M]
    self_dims = _self_log_density(z, loc64, scale64, point_index)                           # [M, D]
    log_cond = self_dims.sum(-1)                                                             # [M]
    log_prior_dims = -0.5 * z.pow(2) - 0.5 * LOG_2PI                                         # [M, D]
    log_prior = log_prior_dims.sum(-1)
    others = _log_sum_exp_over_points(z, point_index, loc64, scale64, per_dimension=False,
                                      chunk_size=chunk_size, progress=progress)            # [M]
    log_q_self = torch.logaddexp(others, log_cond) - math.log(num_points)
    log_q_loo = others - math.log(num_points - 1)
    dims_self = dims_loo = None
    if decompose:
        others_dims = _log_sum_exp_over_points(z, point_index, loc64, scale64, per_dimension=True,
                                               chunk_size=chunk_size, progress=progress)  # [M, D]
        dims_self = torch.logaddexp(others_dims, self_dims) - math.log(num_points)
        dims_loo = others_dims - math.log(num_points - 1)
    common = dict(num_points=num_points, num_samples=num_samples, tolerance=tolerance,
                  sampled_points=sampled_points)
    sizes = f"N={num_points}" + (f", z from {sampled_points} of them" if sampled_points else "")
    with_self = _terms(log_cond, log_prior, log_q_self, dims_self, log_prior_dims,
                       leave_one_out=False, estimator=f"self term included ({sizes})", **common)
    without = _terms(log_cond, log_prior, log_q_loo, dims_loo, log_prior_dims,
                     leave_one_out=True, estimator=f"leave-one-out ({sizes})", **common)
    return with_self, without


def aggregate_posterior_terms(loc: torch.Tensor, scale: torch.Tensor, *, leave_one_out: bool = False,
                              num_samples: int = 1, generator: torch.Generator | None = None,
                              decompose: bool = False, ceiling_tolerance: float = 0.1,
                              chunk_size: int | None = None, progress: bool = False,
                              sampled_points: int | None = None) -> AggregatePosteriorTerms:
    """Index-code MI, marginal KL, total correlation and dimension-wise KL of q(z).

    Inputs: ``loc``, ``scale`` ``[N, D]`` of q(z|x_n) for N >= 2 held-out sequences (use the whole
    split: the MI ceiling is log N). ``num_samples`` z per point (M = S N samples of q(z)).

    * MI ceiling: log N with the self term (``mutual_information.at_ceiling`` flags estimates
      within ``ceiling_tolerance`` nats of it); none for leave-one-out.
    * marginal-KL floor: rate - log N with the self term (the mirror image of the MI ceiling).
    * bias: see the module docstring (self term: MI down / KL up; leave-one-out: the opposite).
    * cost: one float64 matmul of M x 3D by 3D x N plus a logsumexp over the M x N result, in
      chunks of CHUNK_ELEMENTS entries (memory stays ~O(CHUNK_ELEMENTS) whatever N is); about
      1 s for N = M = 10,000 on 2 CPU cores. ``decompose=True`` adds TC and dimension-wise KL,
      which need the D one-dimensional marginals q(z_d): D times that cost, hence off by default.
    * ``sampled_points`` = N_s < N: z from N_s random points only, each log q(z) still over all N
      components (same expectation, ceiling and floor; Monte Carlo error ~ 1/sqrt(S N_s); cost
      N_s / N of the full pass). For large N, where the N x N pass dominates.
    """
    with_self, without = self_and_leave_one_out_terms(
        loc, scale, num_samples=num_samples, generator=generator, decompose=decompose,
        ceiling_tolerance=ceiling_tolerance, chunk_size=chunk_size, progress=progress,
        sampled_points=sampled_points)
    return without if leave_one_out else with_self


@torch.no_grad()
def collect_posterior_parameters(model, batches: Iterable[Mapping[str, torch.Tensor]],
                                 max_points: int | None = None, progress: bool = True,
                                 device=None) -> PosteriorParameters:
    """Encode up to ``max_points`` sequences (None = all) and keep loc/scale as float64 ``[N, D]``."""
    if max_points is not None:
        check_int_at_least("max_points", max_points, 1)
    device = _device_of(model, device)
    locs, scales, count = [], [], 0
    for batch in _iterate(batches, progress, "encode"):
        posterior = model.encode(_to_device(batch, device))
        locs.append(posterior.loc.double().cpu())
        scales.append(posterior.scale.double().cpu())
        count += locs[-1].shape[0]
        if max_points is not None and count >= max_points:
            break
    if not locs:
        raise ValueError("batches is empty: nothing to encode")
    loc, scale = torch.cat(locs)[:max_points], torch.cat(scales)[:max_points]
    check_loc_scale(loc, scale)
    return PosteriorParameters(loc=loc, scale=scale)
