"""Fitting the mixed membership model with SVI and evaluating it on held-out samples."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value
from pyro.optim import ClippedAdam
from tqdm import tqdm  # plain text bars: notebooks have no widget frontend

from ..protocols import standard_normal_prior
from .config import MixedMembershipConfig
from .model import (GLOBAL_SITES, MAX_PLATE_NESTING, group_log_density, initial_values,
                    mmm_model, stick_breaking)
from .result import MixedMembershipResult


def validate_samples(samples: Mapping[str, torch.Tensor]) -> int:
    """Fail early on anything the MMM cannot use; returns the latent dimension ``D``."""
    if not isinstance(samples, Mapping) or len(samples) == 0:
        raise ValueError("samples must be a non-empty dict {group_name: tensor [N_g, D]}")
    latent_dim, first = None, None
    for name, z in samples.items():
        if not isinstance(name, str):
            raise ValueError(f"samples: group names must be str, got {name!r}")
        if not isinstance(z, torch.Tensor) or z.dim() != 2:
            raise ValueError(f"samples[{name!r}] must be a 2-D tensor [N, D], got "
                             f"{getattr(z, 'shape', type(z))}")
        if z.shape[0] == 0:
            raise ValueError(f"samples[{name!r}] is an empty group (0 samples)")
        if z.shape[0] < 2:
            raise ValueError(f"samples[{name!r}] has 1 sample; need >= 2 (fit + held-out)")
        if not torch.isfinite(z).all():
            raise ValueError(f"samples[{name!r}] contains non-finite values (NaN or inf)")
        if latent_dim is None:
            latent_dim, first = z.shape[1], name
        elif z.shape[1] != latent_dim:
            raise ValueError(f"samples[{name!r}] has latent_dim {z.shape[1]} but "
                             f"samples[{first!r}] has {latent_dim}; all groups must agree")
    return latent_dim


def split_heldout(samples: Mapping[str, torch.Tensor], heldout_fraction: float,
                  seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random split of each group: ``{name: (fit_index, heldout_index)}``, disjoint,
    together covering the group; at least one sample on each side."""
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for name, z in samples.items():
        n = z.shape[0]
        num_heldout = min(n - 1, max(1, round(heldout_fraction * n)))
        order = torch.randperm(n, generator=generator)
        splits[name] = (order[num_heldout:].sort().values, order[:num_heldout].sort().values)
    return splits


def _pad(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[N_g, ...]`` tensors into ``[G, N_max, ...]`` plus a ``[G, N_max]`` bool mask."""
    n_max = max(len(g) for g in groups)
    data = torch.zeros((len(groups), n_max) + tuple(groups[0].shape[1:]))
    mask = torch.zeros(len(groups), n_max, dtype=torch.bool)
    for i, g in enumerate(groups):
        data[i, :len(g)], mask[i, :len(g)] = g, True
    return data, mask


def fit_mixed_membership(samples: Mapping[str, torch.Tensor],
                         config: MixedMembershipConfig = MixedMembershipConfig(), *,
                         rates: Mapping[str, float] | None = None,
                         calibration_group: str | None = None,
                         progress: bool = True,
                         num_threads: int | None = 1) -> MixedMembershipResult:
    """Fit the MMM on a seeded split of every group and evaluate it on the other split.

    ``samples``: ``{group_name: z [N_g, D]}`` (prior samples, and z ~ q(z|x) per model; groups
    may differ in size). ``rates``: optional ``{group_name: R_g}`` (nats) for the index-code MI
    ``R_g - KL_hat_g`` (Hoffman & Johnson 2016); missing groups get NaN. ``calibration_group``:
    a group of N(0, I) samples whose marginal KL is the estimator's floor. ``progress``: tqdm
    bar over SVI steps. ``num_threads``: torch CPU threads during the call (restored after);
    None leaves torch's setting. Default 1: the per-step tensors are small, and on the 2-core
    target 2 threads were no faster (21.5 vs 21.0 s, RD) and, with other processes running,
    up to 4.5x slower (benchmarks/bench_mmm.py).

    Returns a :class:`MixedMembershipResult`; its per-group numbers use held-out samples only:
    KL_hat_g = mean over held-out z of [log q_hat_g(z) - log p(z)], an estimate of
    KL(q_g(z) || p(z)) biased down by KL(q_g || q_hat_g) in expectation (the formula and its bias
    are in the result's docstring); a ``calibration_group``'s value is its floor.
    """
    if num_threads is not None and (isinstance(num_threads, bool)
                                    or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads={num_threads!r} must be None or an integer >= 1")
    if num_threads is None:
        return _fit(samples, config, rates, calibration_group, progress)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _fit(samples, config, rates, calibration_group, progress)
    finally:
        torch.set_num_threads(previous)


def _fit(samples, config, rates, calibration_group, progress) -> MixedMembershipResult:
    latent_dim = validate_samples(samples)
    names = tuple(samples)
    if rates is not None:
        for name, rate in rates.items():
            if name not in samples:
                raise ValueError(f"rates[{name!r}]: not a group; accepted keys: {names}")
            if not math.isfinite(float(rate)):
                raise ValueError(f"rates[{name!r}]={rate!r} must be finite")
    if calibration_group is not None and calibration_group not in samples:
        raise ValueError(f"calibration_group={calibration_group!r} is not a group; accepted "
                         f"values: {names}")
    if config.family == "RD" and config.low_rank > latent_dim:
        raise ValueError(f"low_rank={config.low_rank} exceeds the latent dimension {latent_dim}")

    samples = {k: v.detach().to("cpu", torch.float32) for k, v in samples.items()}
    splits = split_heldout(samples, config.heldout_fraction, config.seed)
    fit_groups = [samples[k][splits[k][0]] for k in names]
    heldout_groups = [samples[k][splits[k][1]] for k in names]

    start = time.perf_counter()
    guide, site_shapes, model_args, losses = _run_svi(fit_groups, config, progress)
    sites = list(site_shapes)
    fit_seconds = time.perf_counter() - start

    num_draws = 1 if config.guide == "map" else config.num_posterior_samples
    with torch.no_grad():
        draws = Predictive(guide, num_samples=num_draws, return_sites=sites)(*model_args)
        # Predictive may keep singleton plate dims on the left; drop them: [S, *site_shape]
        posterior = {k: draws[k].detach().reshape((num_draws,) + shape)
                     for k, shape in site_shapes.items()}
        if config.num_components == 1:
            posterior_weights = torch.ones(num_draws, len(names), 1)
        else:
            posterior_weights = stick_breaking(posterior["sticks"])    # [S, G, T]
        marginal_kl, marginal_kl_se = _heldout_marginal_kl(posterior_weights, posterior,
                                                           heldout_groups, config.family)

    rate_tensor = index_code_mi = None
    if rates is not None:
        rate_tensor = torch.tensor([float(rates.get(k, math.nan)) for k in names])
        index_code_mi = rate_tensor - marginal_kl
    return MixedMembershipResult(
        group_names=names, weights=posterior_weights.mean(0), marginal_kl=marginal_kl,
        marginal_kl_se=marginal_kl_se, index_code_mi=index_code_mi, rates=rate_tensor,
        loss_trace=torch.tensor(losses), fit_seconds=fit_seconds,
        num_fit=tuple(len(g) for g in fit_groups),
        num_heldout=tuple(len(g) for g in heldout_groups),
        posterior=posterior, posterior_weights=posterior_weights, config=config,
        calibration_group=calibration_group)


def _run_svi(fit_groups: list[torch.Tensor], config: MixedMembershipConfig, progress: bool):
    """Seeded SVI of the global variables (assignments enumerated out). Returns the guide,
    ``{global site: shape}``, the model arguments and the loss per step."""
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    latent_dim = fit_groups[0].shape[1]
    init = initial_values(fit_groups, config, torch.Generator().manual_seed(config.seed))
    data, mask = _pad(fit_groups)                                      # [G, N, D], [G, N]
    if config.family == "R1":  # every scalar coordinate is an observation
        data = data.reshape(len(fit_groups), -1)                       # [G, N * D]
        mask = mask.repeat_interleave(latent_dim, dim=1)               # [G, N * D]
    if bool(mask.all()):
        mask = None  # equal group sizes: skip a masking pass over the [T, G, N] table

    sites = [s for s in GLOBAL_SITES[config.family] if s in init]      # no sticks when T = 1
    global_model = poutine.block(mmm_model, expose=sites)
    guide_class = AutoDelta if config.guide == "map" else AutoNormal
    guide_kwargs = {} if config.guide == "map" else {"init_scale": 0.01}  # start near the init
    guide = guide_class(global_model, init_loc_fn=init_to_value(values=init), **guide_kwargs)
    optim = ClippedAdam({"lr": config.learning_rate, "clip_norm": config.clip_norm,
                         "lrd": config.final_lr_fraction ** (1 / config.num_steps)})
    svi = SVI(mmm_model, guide, optim, TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING))
    model_args = (data, mask, config)
    losses = [svi.step(*model_args)
              for _ in tqdm(range(config.num_steps), desc=f"MMM {config.family}",
                            disable=not progress)]
    return guide, {k: init[k].shape for k in sites}, model_args, losses


def _heldout_marginal_kl(weights: torch.Tensor, posterior: dict[str, torch.Tensor],
                         heldout_groups: list[torch.Tensor], family: str):
    """``KL_hat_g = mean_z [log q_hat_g(z) - log p(z)]`` over held-out z, and its standard error
    ``std / sqrt(N_heldout)``; ``weights`` ``[S, G, T]``. Returns two ``[G]`` tensors."""
    prior = standard_normal_prior(heldout_groups[0].shape[1])
    kl, se = [], []
    for g, z in enumerate(heldout_groups):
        log_ratio = (group_log_density(weights[:, g], posterior, family, z)
                     - prior.log_prob(z).sum(-1))                      # [N_heldout]
        kl.append(log_ratio.mean())
        se.append(log_ratio.std() / math.sqrt(len(z)) if len(z) > 1 else torch.tensor(math.nan))
    return torch.stack(kl), torch.stack(se)

def prior_samples(num_samples: int, latent_dim: int, seed: int) -> torch.Tensor:
    """``[num_samples, latent_dim]`` draws of p(z) = N(0, I) (a prior / calibration group)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_samples, latent_dim, generator=generator)
