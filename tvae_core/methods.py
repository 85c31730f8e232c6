"""The training methods (objectives) of the book, named once: one :class:`Method` entry each.

An entry holds everything that differs between methods: the name configs use
(``ObjectiveConfig.name``), the label the book uses, whether it takes a target rate, the
config fields only it reads, its beta schedule, its own trainable state (the MDR multiplier) and
that state's optimiser, its loss, and its colour and marker in figures. Config validation,
training, the book's run builders (:mod:`tvae_core.experiments`), the command line and the
figures all read :data:`METHODS`; a run carries its method as data (``config.objective.name``,
see :func:`method_of`), never parsed back from its label.

Adding an objective is one :func:`register_method` call (tests/test_methods.py registers a toy
one and trains it). The losses themselves are the pure functions of :mod:`tvae_core.objectives`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .objectives import LagrangeMultiplier, elbo_loss, free_bits_loss, mdr_loss, scheduled_beta

# (distortion [B], kl_per_dim [B, D], objective config, beta, state, read) -> (loss, diagnostics)
LossFunction = Callable[..., tuple]


def configured_schedule(step: int, config, max_steps: int) -> float:
    """The schedule the config names (``objective.beta_schedule``), at weight 1."""
    return scheduled_beta(step, config.beta_schedule, config, max_steps)


def cyclical_schedule(step: int, config, max_steps: int) -> float:
    """Cyclical annealing (Fu et al. 2019) whatever ``beta_schedule`` says."""
    return scheduled_beta(step, "cyclical", config, max_steps)


@dataclass(frozen=True)
class Method:
    name: str                   # ObjectiveConfig.name and --objective ("cyc_fb")
    label: str                  # the book's name, the first word of run labels ("CYC-FB")
    loss: LossFunction
    colour: str                 # in every figure (Okabe-Ito where the palette has room)
    marker: str
    takes_target: bool = False  # objective.target_rate is required (and read)
    reads: tuple[str, ...] = ()  # ObjectiveConfig fields only this method reads (the CLI refuses them elsewhere)
    schedule: Callable[[int, Any, int], float] = configured_schedule  # (step, config, max_steps) -> beta
    new_state: Callable[[Any], torch.nn.Module] | None = None  # config -> the method's trainable state
    state_optimizer: Callable[[torch.nn.Module, Any], torch.optim.Optimizer] | None = None  # (state, config)
    injection: str | None = None  # the model.injection the method needs (None: any)

    def beta(self, step: int, config, max_steps: int) -> float:
        return self.schedule(step, config, max_steps)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS`; its name and label must be new."""
    for other in METHODS.values():
        if method.name in (other.name, other.label) or method.label in (other.name, other.label):
            raise ValueError(f"method {method.name!r} / {method.label!r} clashes with {other.name!r} / {other.label!r}")
    if (method.new_state is None) != (method.state_optimizer is None):
        raise ValueError(f"method {method.name!r}: new_state and state_optimizer come together")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The entry of a method by its config name (``"cyc_fb"``) or its label (``"CYC-FB"``);
    ValueError naming the accepted values otherwise."""
    if name in METHODS:
        return METHODS[name]
    for method in METHODS.values():
        if method.label == name:
            return method
    raise ValueError(f"objective.name={name!r} is not a method of the registry; accepted values: {tuple(METHODS)} "
                     f"(or their labels {tuple(m.label for m in METHODS.values())})")


def method_of(run) -> Method:
    """The method of a run: from a ``RunConfig`` or an ``ObjectiveConfig``, anything with a
    ``.config`` (a trained ``Run``), an entry, or a registry name or label."""
    if isinstance(run, Method):
        return run
    if isinstance(run, str):
        return get_method(run)
    config = getattr(run, "config", run)
    objective = getattr(config, "objective", config)
    return get_method(objective.name)


def beta_at(step: int, config, max_steps: int) -> float:
    """The weight on the rate at optimiser step ``step`` (0-based) under ``config.name``'s schedule."""
    return get_method(config.name).beta(step, config, max_steps)


def compute_loss(terms: dict[str, torch.Tensor], config, step: int, max_steps: int,
                 state: torch.nn.Module | None = None, *, read: bool = True):
    """The loss of ``config.name``'s method at optimiser step ``step``: ``(loss, diagnostics)``
    (``read=False``: the diagnostics that are tensors stay detached 0-d tensors on the terms'
    device). ``state``: the method's own state (:attr:`Method.new_state`), e.g. the multiplier."""
    method = get_method(config.name)
    beta = beta_at(step, config, max_steps)
    if method.new_state is not None and state is None:
        raise ValueError(f"objective.name={config.name!r} needs its state ({method.label}: Method.new_state)")
    return method.loss(terms["distortion"], terms["kl_per_dim"], config, beta, state, read)


# ------------------------------------------------------------------------------ the losses of the entries
def _elbo(distortion, kl_per_dim, config, beta, state, read):
    return elbo_loss(distortion, kl_per_dim, beta, read=read)


def _language_model(distortion, kl_per_dim, config, beta, state, read):
    return elbo_loss(distortion, torch.zeros_like(kl_per_dim), 0.0, read=read)


def _free_bits(distortion, kl_per_dim, config, beta, state, read):
    return free_bits_loss(distortion, kl_per_dim, config.target_rate, config.free_bits_variant, beta, read=read)


def _mdr(distortion, kl_per_dim, config, beta, state, read):
    return mdr_loss(distortion, kl_per_dim, config.target_rate, state, config.mdr_damping, read=read)


def _multiplier(config) -> LagrangeMultiplier:
    return LagrangeMultiplier(config.mdr_lambda_init, config.mdr_rate_ema)


def _multiplier_optimizer(multiplier: LagrangeMultiplier, config) -> torch.optim.Optimizer:
    return LagrangeMultiplier.make_optimizer(multiplier, config.mdr_lr, config.mdr_optimizer)


_FREE_BITS_READS = ("target_rate", "free_bits_variant")
_MDR_READS = ("target_rate", "mdr_lambda_init", "mdr_lr", "mdr_rate_ema", "mdr_damping", "mdr_optimizer")

for _method in (
    Method("vae", "VAE", _elbo, "#CC79A7", "*"),
    Method("ae", "AE", _elbo, "#E69F00", "s", schedule=lambda step, config, max_steps: 0.0),
    Method("cyc", "CYC", _elbo, "#0072B2", "^", schedule=cyclical_schedule),
    Method("fb", "FB", _free_bits, "#D55E00", "o", takes_target=True, reads=_FREE_BITS_READS),
    Method("mdr", "MDR", _mdr, "#009E73", "P", takes_target=True, reads=_MDR_READS,
           new_state=_multiplier, state_optimizer=_multiplier_optimizer),
    Method("cyc_fb", "CYC-FB", _free_bits, "#56B4E9", "d", takes_target=True, reads=_FREE_BITS_READS,
           schedule=cyclical_schedule),
    # the constant schedule at objective.beta (Higgins et al. 2017); other schedules ramp to 1
    Method("beta_vae", "beta-VAE", _elbo, "#F0E442", "h", reads=("beta",),
           schedule=lambda step, config, max_steps: (config.beta if config.beta_schedule == "constant"
                                                     else configured_schedule(step, config, max_steps))),
    Method("lm", "LM", _language_model, "#8C564B", "v", injection="none"),
):
    register_method(_method)
