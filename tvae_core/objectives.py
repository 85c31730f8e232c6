"""Training objectives: small pure functions of the per-batch terms.

Every objective takes ``distortion`` [B] (nats, -log p(x|z) for z ~ q(z|x)), ``kl_per_dim``
[B, D] (analytic KL(q(z_d|x) || N(0, 1))) and the optimiser ``step``, and returns
``(loss, diagnostics)``: a scalar to minimise and a dict of floats (with ``read=False``, detached
0-d tensors instead, so that a training loop can read them back later without a host
synchronisation per value; the same numbers either way). ``rate`` in the diagnostics is
always the *raw* rate E_x KL(q(z|x)||p(z)); what the objective optimised instead (a clamped
free-bits term, a beta-weighted rate) is logged under its own name.

Beta schedules
--------------
* ``constant``: beta = 1 (or ``ObjectiveConfig.beta`` for ``beta_vae``).
* ``linear``: beta = min(1, step / warmup_steps) (Bowman et al., 2016).
* ``cyclical``: the run is split into ``num_cycles`` cycles *of optimiser steps*; within each,
  beta = 0 for ``cycle_zero_fraction``, ramps linearly to 1 over ``cycle_ramp_fraction``, then
  stays at 1 (defaults 0.25, 0.25). Fu et al. (2019)'s schedule is zero fraction 0, ramp 0.5; the
  thesis code's, after Optimus, ticked per batch with one cycle per epoch and fractions 0.5, 0.25.

Free bits, three named variants (target rate r nats per sequence, lambda = r / D per dimension)
-----------------------------------------------------------------------------------------------
* ``example_dim`` (Li et al., 2020, Optimus; the thesis): mean_b sum_d max(lambda, KL_bd)
* ``batch_dim`` (Kingma et al., 2016): sum_d max(lambda, mean_b KL_bd)
* ``total``: max(r, mean_b sum_d KL_bd)

Below the threshold the KL gradient is exactly zero, for the unit the variant clamps.

Minimum desired rate (Pelsmaeker & Aziz, 2019)
----------------------------------------------
    min_{theta,phi} max_{lambda >= 0}  D + R + lambda (r - R)

with lambda = softplus(u) updated by gradient *ascent* on u with its own optimiser
(:class:`LagrangeMultiplier`). lambda rises while R < r and falls when R > r; where the ELBO's own
optimum has R > r the constraint is slack and lambda -> 0, leaving the ELBO; at R = r (active) the
ascent step is zero and lambda stays where it is.

Plain gradient descent-ascent on this Lagrangian need not converge: with a strong decoder the
ELBO's slope dD/dR is ~0 near collapse, so the equilibrium multiplier is ~1, where the rate's
weight 1 - lambda changes sign. Above it the rate is *rewarded* and grows without bound; lambda
then falls, the rate collapses, lambda rises again: a limit cycle (measured on the default
profile). ``mdr_damping`` = c > 0 adds the damping term of the modified differential method of
multipliers (Platt & Barr, 1988) to the model's loss,

    D + R + lambda (r - R) + c/2 (r - R)^2,

which leaves the constrained optimum where the constraint is active (R = r, the case of every
text VAE whose decoder prefers a lower rate) unchanged and makes it a stable point of the
descent-ascent dynamics. The multiplier's own update is unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------ schedules
def scheduled_beta(step: int, schedule: str, config, max_steps: int, constant: float = 1.0) -> float:
    """The weight on the rate at optimiser step ``step`` (0-based) under ``schedule``
    (constant | linear | cyclical), with the schedule's settings read from ``config`` (an
    ``ObjectiveConfig``); ``constant`` is the weight of the constant schedule. Which schedule a
    method uses is its registry entry's business (:mod:`tvae_core.methods`)."""
    if schedule == "constant":
        return constant
    if schedule == "linear":
        if config.warmup_steps == 0:
            return 1.0
        return min(1.0, step / config.warmup_steps)
    cycle_length = max_steps / config.num_cycles
    position = (step % cycle_length) / cycle_length  # in [0, 1)
    if position < config.cycle_zero_fraction:
        return 0.0
    if config.cycle_ramp_fraction == 0:
        return 1.0
    return min(1.0, (position - config.cycle_zero_fraction) / config.cycle_ramp_fraction)


# ------------------------------------------------------------------------------ rate terms
def free_bits_rate(kl_per_dim: torch.Tensor, target_rate: float, variant: str) -> torch.Tensor:
    """The clamped rate term of free bits (see module docstring). kl_per_dim: [B, D] -> scalar."""
    latent_dim = kl_per_dim.shape[-1]
    per_dim = target_rate / latent_dim
    if variant == "example_dim":
        return torch.clamp(kl_per_dim, min=per_dim).sum(-1).mean()
    if variant == "batch_dim":
        return torch.clamp(kl_per_dim.mean(0), min=per_dim).sum()
    if variant == "total":
        return torch.clamp(kl_per_dim.sum(-1).mean(), min=target_rate)
    raise ValueError(f"free_bits_variant={variant!r} is not accepted; accepted values: "
                     "('example_dim', 'batch_dim', 'total')")


class LagrangeMultiplier(nn.Module):
    """lambda = softplus(u) >= 0 for the MDR constraint; ``u`` is trained by gradient ascent.

    ``rate_ema`` (optional) smooths the rate that the multiplier sees, a buffer so that it is
    saved in checkpoints and broadcast with the model state.
    """

    def __init__(self, lambda_init: float, rate_ema: float | None = None):
        super().__init__()
        if lambda_init <= 0:
            raise ValueError(f"mdr_lambda_init={lambda_init!r} must be > 0")
        u0 = lambda_init + math.log(-math.expm1(-lambda_init))  # softplus^{-1}(lambda_init)
        self.u = nn.Parameter(torch.tensor(float(u0)))
        self.rate_ema = rate_ema
        self.register_buffer("smoothed_rate", torch.tensor(float("nan")))

    @property
    def value(self) -> torch.Tensor:
        return F.softplus(self.u)

    def constraint_signal(self, rate: torch.Tensor) -> torch.Tensor:
        """The (detached) rate the multiplier reacts to: the batch rate, or its EMA."""
        rate = rate.detach()
        if self.rate_ema is None:
            return rate
        if torch.isnan(self.smoothed_rate):
            self.smoothed_rate.copy_(rate)
        else:
            self.smoothed_rate.mul_(self.rate_ema).add_((1 - self.rate_ema) * rate)
        return self.smoothed_rate.clone()

    @staticmethod
    def make_optimizer(multiplier: "LagrangeMultiplier", lr: float, kind: str = "sgd") -> torch.optim.Optimizer:
        if kind == "sgd":
            # plain SGD ascent: the step is lr * sigmoid(u) * (r - R), explicit and easy to reason about
            return torch.optim.SGD(multiplier.parameters(), lr=lr, maximize=True)
        if kind == "rmsprop":
            # the thesis code (pytorch-constrained-opt): RMSprop, torch's defaults alpha 0.99,
            # eps 1e-8, no momentum; the step is ~lr whatever the constraint's size
            return torch.optim.RMSprop(multiplier.parameters(), lr=lr, alpha=0.99, eps=1e-8, momentum=0.0,
                                       maximize=True)
        raise ValueError(f"mdr_optimizer={kind!r} is not accepted; accepted values: ('sgd', 'rmsprop')")


# ------------------------------------------------------------------------------ objectives
def _scalar(value: torch.Tensor, read: bool):
    """A diagnostic: a float (one host synchronisation) or, with ``read=False``, the detached tensor
    (every value passed here is a fresh result, never modified later, except the buffer below)."""
    return value.item() if read else value.detach()


def _base_diagnostics(distortion: torch.Tensor, kl_per_dim: torch.Tensor, read: bool = True) -> dict:
    rate = kl_per_dim.sum(-1).mean()
    d = distortion.mean()
    return {"distortion": _scalar(d, read), "rate": _scalar(rate, read), "elbo": _scalar(-(d + rate), read)}


def elbo_loss(distortion, kl_per_dim, beta: float = 1.0, *, read: bool = True):
    """-ELBO with a weight on the rate: D + beta R (Kingma & Welling 2014; Higgins et al. 2017)."""
    loss = distortion.mean() + beta * kl_per_dim.sum(-1).mean()
    return loss, {**_base_diagnostics(distortion, kl_per_dim, read), "beta": float(beta),
                  "loss": _scalar(loss, read)}


def free_bits_loss(distortion, kl_per_dim, target_rate: float, variant: str, beta: float = 1.0, *,
                   read: bool = True):
    """D + beta * FB(KL) with the named free-bits variant (Kingma et al. 2016; Li et al. 2020)."""
    clamped = free_bits_rate(kl_per_dim, target_rate, variant)
    loss = distortion.mean() + beta * clamped
    diagnostics = {**_base_diagnostics(distortion, kl_per_dim, read), "beta": float(beta),
                   "free_bits_rate": _scalar(clamped, read), "loss": _scalar(loss, read)}
    return loss, diagnostics


def mdr_loss(distortion, kl_per_dim, target_rate: float, multiplier: LagrangeMultiplier,
             damping: float = 0.0, *, read: bool = True):
    """D + R + lambda (r - R) (Pelsmaeker & Aziz 2019), plus c/2 (r - R)^2 when ``damping`` = c > 0.

    The model sees lambda as a constant; the multiplier sees the rate as a constant (or its EMA),
    so one ``backward`` gives both: descent for the model, ascent (``maximize=True``) for u.
    """
    rate = kl_per_dim.sum(-1).mean()
    lam = multiplier.value
    model_loss = distortion.mean() + rate + lam.detach() * (target_rate - rate)
    if damping > 0:
        model_loss = model_loss + 0.5 * damping * (target_rate - rate) ** 2
    multiplier_objective = lam * (target_rate - multiplier.constraint_signal(rate))
    loss = model_loss + multiplier_objective
    diagnostics = {**_base_diagnostics(distortion, kl_per_dim, read), "mdr_lambda": _scalar(lam, read),
                   "mdr_constraint": _scalar(target_rate - rate, read), "loss": _scalar(model_loss, read)}
    if multiplier.rate_ema is not None:  # a buffer updated in place: copied now, whatever `read` says
        diagnostics["mdr_smoothed_rate"] = _scalar(multiplier.smoothed_rate.clone(), read)
    return loss, diagnostics
