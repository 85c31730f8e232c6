"""The MMM's groups of latent samples for a set of trained runs: one recipe, so that notebooks 04
and 09 and the budget study (:func:`tvae_core.budget.budget_mmm`) fit the same groups from the
same posteriors and report the same numbers."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..estimators import kl_per_dimension, sample_aggregate_posterior
from .fit import prior_samples

PRIOR = "prior"
CALIBRATION = "prior (calibration)"   # a second prior group: what the estimator reports for KL 0


def latent_sample_groups(posteriors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], samples_per_group: int,
                         seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Groups for :func:`tvae_core.mmm.fit_mixed_membership` and their rates.

    ``posteriors``: label -> ``(loc, scale)``, each ``[N, D]``, of q(z|x) on the test sentences
    (:func:`tvae_core.evaluation.posterior_parameters`). Per run, in the mapping's order, one
    shared generator seeded with ``seed`` picks ``n = min(samples_per_group, N)`` sentences at
    random and draws one z ~ q(z|x) for each: together, draws from the aggregate posterior q(z).
    Its rate is the mean KL(q(z|x) || p(z)) of the picked sentences, in nats. Two groups of n
    prior draws come first: :data:`PRIOR` (seed ``10_000 + seed``) and :data:`CALIBRATION`
    (``20_000 + seed``), both with rate 0.

    Returns ``(samples, rates)``: label -> ``[n, D]`` float32 samples, label -> rate.
    """
    if not posteriors:
        raise ValueError("posteriors is empty: the MMM needs at least one run's (loc, scale)")
    if samples_per_group < 2:
        raise ValueError(f"samples_per_group={samples_per_group}: accepted values are integers >= 2")
    shapes = {label: tuple(loc.shape) for label, (loc, _) in posteriors.items()}
    num_points, latent_dim = next(iter(shapes.values()))
    if any(shape != (num_points, latent_dim) for shape in shapes.values()):
        raise ValueError(f"posteriors have different shapes {shapes}: the groups need the same sentences")
    n = min(samples_per_group, num_points)
    generator = torch.Generator().manual_seed(seed)
    samples = {PRIOR: prior_samples(n, latent_dim, seed=10_000 + seed),
               CALIBRATION: prior_samples(n, latent_dim, seed=20_000 + seed)}
    rates = {PRIOR: 0.0, CALIBRATION: 0.0}
    for label, (loc, scale) in posteriors.items():
        if label in samples:
            raise ValueError(f"a run is labelled {label!r}, the name of a prior group; rename it")
        chosen = torch.randperm(num_points, generator=generator)[:n]
        z = sample_aggregate_posterior(loc[chosen], scale[chosen], 1, generator)   # [1, n, D]
        samples[label] = z.reshape(n, latent_dim).float()
        rates[label] = float(kl_per_dimension(loc[chosen], scale[chosen]).sum())
    return samples, rates
