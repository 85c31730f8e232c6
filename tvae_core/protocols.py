"""The one interface every estimator is written against.

Both the TransformerVAE (``tvae_core.model``) and the analytic linear-Gaussian model
(``tvae_core.exact``) implement :class:`LatentVariableModel`, so every estimator in
``tvae_core.estimators`` can be validated on a model whose answers are known in closed form
before it is trusted on a transformer.

Conventions (the same everywhere in the package):

* the prior is ``p(z) = N(0, I)`` in ``latent_dim`` dimensions;
* a *batch* is a ``dict`` of tensors whose first dimension is the batch size ``B``
  (text: ``input_ids``/``attention_mask``; the linear-Gaussian model: ``x``);
* all log-densities are in nats **per sequence** (summed over predicted tokens for text).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.distributions import Normal


@runtime_checkable
class LatentVariableModel(Protocol):
    latent_dim: int

    def encode(self, batch: dict[str, torch.Tensor]) -> Normal:
        """Approximate posterior q(z|x): a ``Normal`` with batch shape ``[B, D]``."""
        ...

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sequence. ``z``: ``[S, B, D]`` -> returns ``[S, B]``."""
        ...

    def num_predicted_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Number of predicted tokens per sequence, ``[B]`` (1 per example for vector data)."""
        ...


def standard_normal_prior(latent_dim: int, dtype=torch.float32, device=None) -> Normal:
    """p(z) = N(0, I) with batch shape ``[D]`` (sum ``log_prob`` over the last axis)."""
    zeros = torch.zeros(latent_dim, dtype=dtype, device=device)
    return Normal(zeros, torch.ones_like(zeros), validate_args=False)  # valid by construction; no host read
