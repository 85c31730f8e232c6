"""Pathological directions: the closed forms that choose the moves agree with the exact model.

Every quantity is recomputed by LinearGaussianLVM from the moved parameters, so these tests check
the module's closed forms (marginal KL of the gain move, lower gap of the noise move) against an
independent implementation. Tolerances: 1e-9 nats (float64 round-off is ~1e-13).
"""
import math

import pytest
import torch

from tvae_core.exact import LinearGaussianLVM
from tvae_core.pathological import (
    check_fitted,
    constant_elbo_path,
    elbo_landscape,
    gain_for_marginal_kl,
    move,
    noise_scale_for_lower_gap,
)

TOL = 1e-9


@pytest.fixture(scope="module")
def base():
    return LinearGaussianLVM.fitted(latent_dim=3, data_dim=5, seed=1)


@pytest.mark.parametrize("target", [0.0, 1e-6, 0.3, 2.0, 50.0])
def test_solvers_hit_their_targets(target):
    g = gain_for_marginal_kl(target)
    k = noise_scale_for_lower_gap(target)
    assert g >= 1.0 and k >= 1.0
    assert abs(0.5 * (g * g - 1 - 2 * math.log(g)) - target) < TOL
    assert abs(0.5 * (1 / k - 1 + math.log(k)) - target) < TOL


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_solvers_reject_bad_targets(bad):
    with pytest.raises(ValueError, match="per_dim"):
        gain_for_marginal_kl(bad)
    with pytest.raises(ValueError, match="per_dim"):
        noise_scale_for_lower_gap(bad)


@pytest.mark.parametrize("gain", [0.5, 1.0, 1.7])
def test_gain_move_opens_only_the_marginal_kl(base, gain):
    moved = move(base, encoder_gain=gain)
    expected = base.latent_dim * 0.5 * (gain ** 2 - 1 - 2 * math.log(gain))
    assert abs(moved.marginal_kl() - expected) < TOL
    assert abs(moved.lower_gap()) < TOL
    assert abs(moved.mutual_information() - base.mutual_information()) < TOL
    assert abs(moved.distortion() - base.distortion()) < TOL
    assert abs(moved.rate() - (base.rate() + expected)) < TOL


@pytest.mark.parametrize("scale", [0.6, 1.0, 2.5])
def test_noise_move_opens_only_the_lower_gap(base, scale):
    moved = move(base, decoder_noise_scale=scale)
    expected = base.data_dim * 0.5 * (1 / scale - 1 + math.log(scale))
    assert abs(moved.lower_gap() - expected) < TOL
    assert abs(moved.marginal_kl()) < TOL
    assert abs(moved.rate() - base.rate()) < TOL
    assert abs(moved.distortion() - (base.distortion() + expected)) < TOL


def test_path_keeps_the_elbo_and_moves_the_excess_between_the_gaps(base):
    excess = 3.0
    path = constant_elbo_path(base, excess, num_points=7)
    terms = path.terms
    assert path.elbo_spread < TOL
    assert torch.allclose(-terms["elbo"] - terms["entropy"], torch.full((7,), excess, dtype=torch.float64), atol=TOL, rtol=0)
    assert torch.allclose(terms["marginal_kl"], path.position * excess, atol=TOL, rtol=0)
    assert torch.allclose(terms["lower_gap"], (1 - path.position) * excess, atol=TOL, rtol=0)
    assert float(terms["mutual_information"].max() - terms["mutual_information"].min()) < TOL
    # the rate gains exactly what the distortion loses
    assert torch.allclose(terms["rate"] - terms["rate"][0], terms["distortion"][0] - terms["distortion"],
                          atol=TOL, rtol=0)
    assert path.models[0].name == "t = 0.00" and len(path.models) == 7


def test_landscape_peaks_at_the_fitted_model_and_splits_its_excess(base):
    grid = torch.linspace(-1.0, 1.0, 5)
    landscape = elbo_landscape(base, grid, grid)
    centre = landscape.elbo[2, 2]
    assert abs(float(centre) + landscape.entropy) < TOL
    assert bool((landscape.elbo <= centre + TOL).all())
    excess = -landscape.elbo - landscape.entropy
    assert torch.allclose(excess, landscape.marginal_kl + landscape.lower_gap, atol=TOL, rtol=0)
    # separable: the marginal KL depends on the gain only, the lower gap on the noise scale only
    assert torch.allclose(landscape.marginal_kl, landscape.marginal_kl[:1].expand(5, 5), atol=TOL, rtol=0)
    assert torch.allclose(landscape.lower_gap, landscape.lower_gap[:, :1].expand(5, 5), atol=TOL, rtol=0)


def test_inputs_are_checked(base):
    with pytest.raises(ValueError, match="fitted model"):
        check_fitted(LinearGaussianLVM.mismatched(latent_dim=3, data_dim=5))
    with pytest.raises(ValueError, match="fitted model"):
        constant_elbo_path(LinearGaussianLVM.mismatched(latent_dim=3, data_dim=5), 1.0)
    with pytest.raises(ValueError, match="excess"):
        constant_elbo_path(base, 0.0)
    with pytest.raises(ValueError, match="num_points"):
        constant_elbo_path(base, 1.0, num_points=1)
    with pytest.raises(ValueError, match="encoder_gain"):
        move(base, encoder_gain=-1.0)
    with pytest.raises(ValueError, match="decoder_noise_scale"):
        move(base, decoder_noise_scale=math.nan)
