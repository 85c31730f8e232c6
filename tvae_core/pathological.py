"""Pathological directions of the ELBO, made exact on the linear-Gaussian VAE (thesis, slide 38).

The excess of the negative ELBO over the data entropy splits into two gaps (Hoffman & Johnson
2016; Alemi et al. 2018)::

    -ELBO - H = E_q(z) KL(q(x|z) || p(x|z))  +  KL(q(z) || p(z))
              =        lower gap             +    marginal KL

The ELBO sees only the sum, so a path in parameter space along which one gap grows exactly as the
other shrinks leaves the ELBO unchanged while the marginal KL goes from 0 to all of the excess.
Starting from a *fitted* :class:`~tvae_core.exact.LinearGaussianLVM` (q(z|x) = p(z|x), data =
the model's marginal, so q(z) = N(0, I) and both gaps are 0), two one-parameter moves open one
gap each, in closed form:

* **encoder gain** ``g`` (the upper-gap direction): ``A -> g A``, ``b -> g b``, ``s -> g^2 s`` and
  the decoder undoes it, ``W -> W / g``. z is rescaled by an invertible map, so I_q and the
  distortion are unchanged and q(x|z) still equals p(x|z) (lower gap 0), but
  ``q(z) = N(0, g^2 I)``: marginal KL = ``D/2 (g^2 - 1 - log g^2)``, added to the rate.
* **decoder noise scale** ``k`` (the lower-gap direction): ``Psi -> k Psi``. The encoder and q(z)
  are untouched (marginal KL 0) and
  lower gap = ``E_q(z) KL(N(Wz + c, Psi) || N(Wz + c, k Psi)) = d_x/2 (1/k - 1 + log k)``,
  added to the distortion.

:func:`constant_elbo_path` moves along ``t in [0, 1]`` with marginal KL = ``t * excess`` and lower
gap = ``(1 - t) * excess``: -ELBO = H + excess at every point, I_q is constant, and the rate rises
by exactly what the distortion loses. The closed forms above choose the parameters; every reported
quantity is then recomputed independently by :class:`~tvae_core.exact.LinearGaussianLVM`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .exact import LinearGaussianLVM

FITTED_TOLERANCE = 1e-8   # nats: how close to 0 both gaps of the base model must be


@contextmanager
def _single_thread():
    """One torch thread while many tiny (16 x 16) matrices are handled: on a busy 2-core machine
    two threads made the landscape below 7x slower (6.2 s vs 0.8 s for 225 models)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _solve_increasing(function, target: float, low: float, high: float, iterations: int = 200) -> float:
    """The x in [low, high] with function(x) = target, for an increasing ``function`` (bisection;
    200 halvings reach float64 resolution on any bracket used here)."""
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if function(middle) < target:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def gain_for_marginal_kl(marginal_kl_per_dim: float) -> float:
    """The encoder gain ``g >= 1`` with ``1/2 (g^2 - 1 - log g^2) = marginal_kl_per_dim``, i.e.
    KL(N(0, g^2) || N(0, 1)) per latent dimension (nats)."""
    if not (math.isfinite(marginal_kl_per_dim) and marginal_kl_per_dim >= 0):
        raise ValueError(f"marginal_kl_per_dim must be a finite float >= 0; got {marginal_kl_per_dim!r}")
    if marginal_kl_per_dim == 0:
        return 1.0

    def kl(gain: float) -> float:
        return 0.5 * (gain * gain - 1.0 - 2.0 * math.log(gain))

    high = 2.0
    while kl(high) < marginal_kl_per_dim:
        high *= 2.0
    return _solve_increasing(kl, marginal_kl_per_dim, 1.0, high)


def noise_scale_for_lower_gap(lower_gap_per_dim: float) -> float:
    """The decoder noise scale ``k >= 1`` with ``1/2 (1/k - 1 + log k) = lower_gap_per_dim``, i.e.
    KL(N(m, psi) || N(m, k psi)) per data dimension (nats)."""
    if not (math.isfinite(lower_gap_per_dim) and lower_gap_per_dim >= 0):
        raise ValueError(f"lower_gap_per_dim must be a finite float >= 0; got {lower_gap_per_dim!r}")
    if lower_gap_per_dim == 0:
        return 1.0

    def kl(scale: float) -> float:
        return 0.5 * (1.0 / scale - 1.0 + math.log(scale))

    high = 2.0
    while kl(high) < lower_gap_per_dim:
        high *= 2.0
    return _solve_increasing(kl, lower_gap_per_dim, 1.0, high)


def check_fitted(base: LinearGaussianLVM, tolerance: float = FITTED_TOLERANCE) -> None:
    """Fail unless ``base`` has both gaps 0 (q(z) = N(0, I) and q(x|z) = p(x|z)): only then do the
    two moves open exactly the gaps their closed forms say."""
    marginal_kl, lower_gap = base.marginal_kl(), base.lower_gap()
    if abs(marginal_kl) > tolerance or abs(lower_gap) > tolerance:
        raise ValueError(f"base must be a fitted model (both gaps 0, e.g. LinearGaussianLVM.fitted()); "
                         f"got marginal KL {marginal_kl:.3g} and lower gap {lower_gap:.3g} nats")


def move(base: LinearGaussianLVM, encoder_gain: float = 1.0, decoder_noise_scale: float = 1.0,
         name: str | None = None) -> LinearGaussianLVM:
    """``base`` with the encoder scaled by ``encoder_gain`` (decoder weights by its inverse) and the
    decoder covariance by ``decoder_noise_scale``; see the module docstring. Both must be > 0
    (values < 1 open the same gaps from the other side)."""
    for label, value in (("encoder_gain", encoder_gain), ("decoder_noise_scale", decoder_noise_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                 and value > 0):
            raise ValueError(f"{label} must be a finite float > 0; got {value!r}")
    g, k = float(encoder_gain), float(decoder_noise_scale)
    return LinearGaussianLVM(
        data_mean=base.data_mean, data_cov=base.data_cov,
        encoder_weight=g * base.encoder_weight, encoder_bias=g * base.encoder_bias,
        encoder_var=g * g * base.encoder_var,
        decoder_weight=base.decoder_weight / g, decoder_bias=base.decoder_bias,
        decoder_cov=k * base.decoder_cov,
        name=name or f"gain {g:.3g}, noise x{k:.3g}")


@dataclass(frozen=True)
class ConstantElboPath:
    """Models along a path of constant ELBO (see :func:`constant_elbo_path`).

    ``terms[name]`` is a ``[P]`` tensor of the exact value of ``name`` (a key of
    :meth:`LinearGaussianLVM.summary`, plus ``rate`` / ``distortion``) at each point, recomputed by
    :class:`LinearGaussianLVM` from the moved parameters, not from the closed forms used to choose
    them.
    """
    position: torch.Tensor             # t [P], 0 = all excess in the lower gap, 1 = all in marginal KL
    excess: float                      # -ELBO - H at every point (nats)
    encoder_gain: torch.Tensor         # g [P]
    decoder_noise_scale: torch.Tensor  # k [P]
    models: tuple[LinearGaussianLVM, ...]
    terms: dict[str, torch.Tensor]

    @property
    def elbo_spread(self) -> float:
        """max - min of the exact ELBO along the path (0 up to round-off)."""
        return float(self.terms["elbo"].max() - self.terms["elbo"].min())


def constant_elbo_path(base: LinearGaussianLVM, excess: float, num_points: int = 21) -> ConstantElboPath:
    """``num_points`` models from ``t = 0`` (lower gap = ``excess``, marginal KL 0) to ``t = 1``
    (marginal KL = ``excess``, lower gap 0), all with -ELBO = H + ``excess`` and the I_q of ``base``.

    ``base``: a fitted model (checked). ``excess``: nats > 0, split evenly over the latent
    dimensions (marginal KL) and the data dimensions (lower gap).
    """
    check_fitted(base)
    if isinstance(excess, bool) or not isinstance(excess, (int, float)) or not (math.isfinite(excess)
                                                                               and excess > 0):
        raise ValueError(f"excess must be a finite float > 0 (nats); got {excess!r}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2; got {num_points!r}")
    position = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    gains, scales, models = [], [], []
    with _single_thread():
        for t in position.tolist():
            gain = gain_for_marginal_kl(t * excess / base.latent_dim)
            scale = noise_scale_for_lower_gap((1.0 - t) * excess / base.data_dim)
            gains.append(gain)
            scales.append(scale)
            models.append(move(base, gain, scale, name=f"t = {t:.2f}"))
        terms = exact_terms(models)
    return ConstantElboPath(position=position, excess=float(excess),
                            encoder_gain=torch.tensor(gains, dtype=torch.float64),
                            decoder_noise_scale=torch.tensor(scales, dtype=torch.float64),
                            models=tuple(models), terms=terms)


def exact_terms(models) -> dict[str, torch.Tensor]:
    """Every exact scalar of each model (:meth:`LinearGaussianLVM.summary`): ``{name: [P]}``."""
    rows = [model.summary() for model in models]
    return {key: torch.tensor([row[key] for row in rows], dtype=torch.float64) for key in rows[0]}


@dataclass(frozen=True)
class ElboLandscape:
    """Exact ELBO, marginal KL and lower gap on a grid of (log encoder gain, log decoder noise
    scale) around a fitted model: each ``[len(log_noise_scales), len(log_gains)]`` (rows: noise)."""
    log_gains: torch.Tensor            # theta_1 [G1]
    log_noise_scales: torch.Tensor     # theta_2 [G2]
    elbo: torch.Tensor                 # [G2, G1]
    marginal_kl: torch.Tensor          # [G2, G1]
    lower_gap: torch.Tensor            # [G2, G1]
    entropy: float


def elbo_landscape(base: LinearGaussianLVM, log_gains, log_noise_scales) -> ElboLandscape:
    """The exact ELBO over a grid of the two moves (thesis slide 38's contour plot, exactly):
    theta_1 = log g opens the marginal KL, theta_2 = log k the lower gap; the optimum -ELBO = H
    sits at the origin and every contour is a set of models with equal ELBO."""
    check_fitted(base)
    log_gains = torch.as_tensor(log_gains, dtype=torch.float64)
    log_noise_scales = torch.as_tensor(log_noise_scales, dtype=torch.float64)
    shape = (log_noise_scales.numel(), log_gains.numel())
    elbo, marginal_kl, lower_gap = (torch.empty(shape, dtype=torch.float64) for _ in range(3))
    with _single_thread():
        for i, log_k in enumerate(log_noise_scales.tolist()):
            for j, log_g in enumerate(log_gains.tolist()):
                model = move(base, math.exp(log_g), math.exp(log_k))
                elbo[i, j], marginal_kl[i, j], lower_gap[i, j] = (model.elbo(), model.marginal_kl(),
                                                                 model.lower_gap())
    return ElboLandscape(log_gains=log_gains, log_noise_scales=log_noise_scales, elbo=elbo,
                         marginal_kl=marginal_kl, lower_gap=lower_gap, entropy=base.entropy())
