"""Estimators of the quantities the thesis reports, each validated against exact answers.

* :mod:`.bounds` -- rate (analytic and Monte Carlo KL), distortion, ELBO, per-token numbers,
  perplexity, and the importance-weighted bound on log p(x) (with a ladder over K);
* :mod:`.aggregate` -- the aggregate posterior q(z): index-code MI, marginal KL, total
  correlation and dimension-wise KL, each with its ceiling and bias direction;
* :mod:`.decomposition` -- the bounds H - D <= I_q <= R and their two gaps;
* :mod:`.mmd` -- the kernel two-sample test between samples of q(z) and p(z);
* :mod:`.units` -- active units and per-dimension KL;
* :mod:`.thesis_style` -- the original code's flawed estimators, reproduced for teaching only.

Every estimator is checked against the analytic linear-Gaussian model of :mod:`tvae_core.exact`
(tests/test_estimators.py, notebooks/00_exact_vae.ipynb).
"""
from .aggregate import (
    AggregatePosteriorTerms,
    LimitedEstimate,
    PosteriorParameters,
    aggregate_posterior_terms,
    collect_posterior_parameters,
    log_aggregate_posterior,
    sample_aggregate_posterior,
    self_and_leave_one_out_terms,
)
from .bounds import (
    BoundTerms,
    LogLikelihoodEstimate,
    analytic_kl,
    bound_terms,
    distortion,
    evaluate_bounds,
    evaluate_log_likelihood,
    evaluate_log_likelihood_ladder,
    iw_log_likelihood,
    iw_log_likelihood_ladder,
    monte_carlo_kl,
    perplexity,
    sample_posterior,
)
from .decomposition import MIBoundDecomposition, mi_bound_decomposition
from .mmd import MMDTestResult, median_heuristic_bandwidth, mmd2_unbiased, mmd_permutation_test
from .thesis_style import (
    THESIS_DATASET_SIZE,
    THESIS_NUM_POINTS,
    minibatch_weighted_log_q_z,
    thesis_aggregate_posterior_terms,
    thesis_minibatch_weighted_terms,
)
from .units import ActiveUnits, active_units, kl_per_dimension

__all__ = [
    "ActiveUnits", "AggregatePosteriorTerms", "BoundTerms", "LimitedEstimate",
    "LogLikelihoodEstimate", "MIBoundDecomposition", "MMDTestResult", "PosteriorParameters",
    "THESIS_DATASET_SIZE", "THESIS_NUM_POINTS",
    "active_units", "aggregate_posterior_terms", "analytic_kl", "bound_terms",
    "collect_posterior_parameters", "distortion", "evaluate_bounds", "evaluate_log_likelihood",
    "evaluate_log_likelihood_ladder", "iw_log_likelihood", "iw_log_likelihood_ladder",
    "kl_per_dimension", "log_aggregate_posterior", "median_heuristic_bandwidth",
    "mi_bound_decomposition", "minibatch_weighted_log_q_z", "mmd2_unbiased",
    "mmd_permutation_test", "monte_carlo_kl", "perplexity", "sample_aggregate_posterior",
    "sample_posterior", "self_and_leave_one_out_terms", "thesis_aggregate_posterior_terms",
    "thesis_minibatch_weighted_terms",
]
