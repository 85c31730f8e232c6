"""The thesis code's MI / marginal-KL estimators, reproduced ON PURPOSE, for teaching only.

DESIGN.md defect 4: the original numbers came from (a) minibatch-weighted sampling (MWS, Chen et
al. 2018) with the dataset size hard-coded to 10,000 whatever the split, and (b) an aggregate
posterior over 640 points with the self term included, which caps MI at log 640 = 6.46 nats.
Nothing in the book should use these except to show what goes wrong; use
:func:`~tvae_core.estimators.aggregate_posterior_terms` instead.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ._checks import check_int_at_least, check_loc_scale
from .aggregate import AggregatePosteriorTerms, _terms, aggregate_posterior_terms
from .bounds import LOG_2PI, standard_normal

THESIS_DATASET_SIZE = 10_000   # the hard-coded N of the original code
THESIS_NUM_POINTS = 640        # points in the original aggregate posterior


def minibatch_weighted_log_q_z(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                               dataset_size: int = THESIS_DATASET_SIZE) -> torch.Tensor:
    """Chen et al. (2018)'s minibatch-weighted sampling (MWS) estimate of log q(z_i), for teaching.

    log q(z_i) ~= logsumexp_j log q(z_i | x_j) - log(N M), over the M points of the minibatch
    (self term included) with N = ``dataset_size``.

    * bias: no fixed direction (``bias="unknown"`` in the result). In expectation over the
      minibatch the own term gets weight 1/(N M) instead of 1/N and the other points (M - 1)/(N M)
      instead of about 1 in all, so the estimate of q(z_i) is too small, and the log (Jensen)
      lowers it further. Against the MI of the N points themselves (at most log N) the MI is thus
      biased up at every informativeness: an uninformative encoder (q(z|x) = q(z)) gives log N
      instead of 0 (and marginal KL as KL - log N), a very informative one tends to log(N M),
      about log M above log N. Against a population MI above log(N M) (the exact high-MI model of
      notebook 00) it is biased down, being capped there. A wrong N (the hard-coded 10,000) shifts
      every value by log(N_true / N), up or down.
    * ceiling: MI <= log(N M) per term.
    * cost: O(M^2 D). ``z``, ``loc``, ``scale``: ``[M, D]`` (z_i ~ q(z|x_i)) -> ``[M]``.
    """
    check_loc_scale(loc, scale)
    check_int_at_least("dataset_size", dataset_size, 1)
    if z.shape != loc.shape:
        raise ValueError(f"z must have the shape of loc {tuple(loc.shape)}; got {tuple(z.shape)}")
    z, loc, scale = z.double(), loc.double(), scale.double()
    log_dens = (-0.5 * ((z[:, None] - loc[None]) / scale[None]).pow(2)
                - scale.log()[None] - 0.5 * LOG_2PI).sum(-1)                 # [M, M]
    return torch.logsumexp(log_dens, dim=1) - math.log(dataset_size * z.shape[0])


def thesis_minibatch_weighted_terms(loc: torch.Tensor, scale: torch.Tensor, *, batch_size: int = 64,
                                    dataset_size: int = THESIS_DATASET_SIZE,
                                    generator: torch.Generator | None = None,
                                    ceiling_tolerance: float = 0.1) -> AggregatePosteriorTerms:
    """MI and marginal KL the thesis way: MWS per minibatch of ``batch_size`` points, averaged.

    For teaching: see :func:`minibatch_weighted_log_q_z` for the bias. ``loc``/``scale`` ``[N, D]``
    are split into consecutive minibatches (a last partial batch is dropped, as a DataLoader with
    drop_last would). The reported MI ceiling is log(dataset_size x batch_size).
    """
    check_loc_scale(loc, scale, min_points=2)
    check_int_at_least("batch_size", batch_size, 2)
    loc, scale = loc.double(), scale.double()
    num_batches = loc.shape[0] // batch_size
    if num_batches == 0:
        raise ValueError(f"batch_size={batch_size} must be <= the number of points N={loc.shape[0]}")
    used = num_batches * batch_size
    z = loc[:used] + scale[:used] * standard_normal(loc[:used].shape, loc, generator)   # [N', D]
    log_q = torch.cat([minibatch_weighted_log_q_z(z[s:s + batch_size], loc[s:s + batch_size],
                                                  scale[s:s + batch_size], dataset_size)
                       for s in range(0, used, batch_size)])                            # [N']
    log_cond = (-0.5 * ((z - loc[:used]) / scale[:used]).pow(2) - scale[:used].log()
                - 0.5 * LOG_2PI).sum(-1)
    log_prior = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(-1)
    return _terms(log_cond, log_prior, log_q, None, None, num_points=used, num_samples=1,
                  leave_one_out=False, tolerance=ceiling_tolerance,
                  estimator=f"MWS (N hard-coded {dataset_size}, batch {batch_size})",
                  ceiling=math.log(dataset_size * batch_size), bias="unknown")


def thesis_aggregate_posterior_terms(loc: torch.Tensor, scale: torch.Tensor, *,
                                     num_points: int = THESIS_NUM_POINTS,
                                     generator: torch.Generator | None = None) -> AggregatePosteriorTerms:
    """The aggregate-posterior estimate on only the first ``num_points`` points with the self term
    included, as in the thesis code: MI cannot exceed log ``num_points`` (log 640 = 6.46 nats).
    For teaching; the fix is the whole split and a reported ceiling."""
    check_int_at_least("num_points", num_points, 2)
    if loc.shape[0] < num_points:
        raise ValueError(f"num_points={num_points} must be <= the number of points N={loc.shape[0]}")
    terms = aggregate_posterior_terms(loc[:num_points], scale[:num_points], leave_one_out=False,
                                      generator=generator)
    return replace(terms, estimator=f"thesis: {num_points} points, self term included")
