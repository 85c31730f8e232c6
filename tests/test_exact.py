"""The analytic linear-Gaussian model: its closed forms agree with each other and with Monte Carlo.

Tolerances: identities between closed forms are checked to 1e-9 nats (float64 round-off is
~1e-13); Monte Carlo checks use fixed seeds and 5 standard errors.
"""
import math

import pytest
import torch

from tvae_core.exact import LinearGaussianLVM
from tvae_core.protocols import LatentVariableModel

CASES = {
    "fitted": lambda: LinearGaussianLVM.fitted(latent_dim=4, data_dim=8),
    "collapsed": lambda: LinearGaussianLVM.collapsed(latent_dim=4, data_dim=8),
    "high MI": lambda: LinearGaussianLVM.high_mutual_information(latent_dim=4, data_dim=8),
    "mismatched": lambda: LinearGaussianLVM.mismatched(latent_dim=4, data_dim=8),
}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("case", CASES)
def test_implements_the_protocol(case):
    model = CASES[case]()
    assert isinstance(model, LatentVariableModel)
    x = model.sample_data(5, generator())
    posterior = model.encode({"x": x})
    assert posterior.loc.shape == (5, model.latent_dim) and posterior.loc.dtype == torch.float64
    z = posterior.sample((3,))
    # log N(x; W z + c, Psi) with torch's full-covariance density
    decoder = torch.distributions.MultivariateNormal(z @ model.decoder_weight.T + model.decoder_bias,
                                                     model.decoder_cov)
    torch.testing.assert_close(model.log_likelihood({"x": x}, z), decoder.log_prob(x), atol=1e-10, rtol=0)
    assert torch.equal(model.num_predicted_tokens({"x": x}), torch.ones(5, dtype=torch.long))


@pytest.mark.parametrize("case", CASES)
def test_gaps_add_up_to_negative_elbo_minus_entropy(case):
    """lower gap (from q(x|z)) + marginal KL (from q(z)) = -ELBO - H (from D, R, H): three
    independently coded closed forms."""
    model = CASES[case]()
    assert model.lower_gap() + model.marginal_kl() == pytest.approx(-model.elbo() - model.entropy(), abs=1e-9)
    # and each gap against its definition in terms of the bounds
    assert model.lower_gap() == pytest.approx(model.mutual_information() - (model.entropy() - model.distortion()), abs=1e-9)
    assert model.rate() - model.mutual_information() == pytest.approx(model.marginal_kl(), abs=1e-9)
    assert model.total_correlation() + model.dimensionwise_kl() == pytest.approx(model.marginal_kl(), abs=1e-9)
    decomposition = model.bound_decomposition()
    assert decomposition.entropy_is_exact
    assert abs(decomposition.identity_discrepancy) < 1e-9
    assert abs(decomposition.upper_gap_discrepancy) < 1e-9
    assert decomposition.lower_gap == pytest.approx(model.lower_gap(), abs=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_log_marginal_is_elbo_plus_posterior_kl(case):
    """log p(x) = ELBO(x) + KL(q(z|x) || p(z|x)) per point, with the KL from torch's MVN formula."""
    model = CASES[case]()
    x = model.sample_data(50, generator(1))
    torch.testing.assert_close(model.log_marginal(x), model.elbo(x) + model.posterior_kl(x),
                               atol=1e-8, rtol=0)
    assert model.expected_log_marginal() == pytest.approx(float(model.log_marginal(model.sample_data(20_000, generator(2))).mean()), abs=0.1)


def test_fitted_model_is_consistent():
    model = CASES["fitted"]()
    x = model.sample_data(20, generator())
    assert model.posterior_kl(x).abs().max() < 1e-9              # q(z|x) is the true posterior
    assert model.lower_gap() == pytest.approx(0.0, abs=1e-9)
    assert model.marginal_kl() == pytest.approx(0.0, abs=1e-9)
    assert -model.elbo() == pytest.approx(model.entropy(), abs=1e-9)
    assert model.mutual_information() == pytest.approx(model.rate(), abs=1e-9)
    # the closed form of `fitted`: loadings lambda spread evenly over (0.5, 2), noise 1,
    # I_q = 1/2 sum_d log(1 + lambda_d^2)
    loadings = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    assert model.mutual_information() == pytest.approx(0.5 * float(torch.log1p(loadings ** 2).sum()), abs=1e-9)


def test_collapsed_model_has_no_information():
    model = CASES["collapsed"]()
    assert model.mutual_information() == 0.0 and model.rate() == 0.0
    assert model.marginal_kl() == pytest.approx(0.0, abs=1e-12)
    assert model.distortion() == pytest.approx(model.entropy(), abs=1e-9)


def test_high_mi_model_exceeds_any_feasible_log_n():
    model = CASES["high MI"]()
    assert model.mutual_information() > math.log(10 ** 6)
    assert model.encoder_var.max() < 0.01        # posterior std < 0.1 in every dimension


def test_mismatched_model_has_both_gaps():
    model = LinearGaussianLVM.mismatched(latent_dim=4, data_dim=8)
    assert model.marginal_kl() > 0.1 and model.lower_gap() > 0.1 and model.total_correlation() > 0.01


@pytest.mark.parametrize("case", ["mismatched", "high MI"])
def test_rate_and_distortion_match_monte_carlo(case):
    """The closed forms of R and D against sampling x and z and calling the protocol methods."""
    model = CASES[case]()
    x = model.sample_data(20_000, generator(3))
    batch = {"x": x}
    posterior = model.encode(batch)
    z = posterior.sample((1,))                                                     # [1, N, D]
    log_lik = model.log_likelihood(batch, z)[0]                                    # [N]
    mc_distortion = -log_lik
    assert float(mc_distortion.mean()) == pytest.approx(model.distortion(), abs=5 * float(mc_distortion.std()) / math.sqrt(x.shape[0]))
    torch.testing.assert_close(model.distortion(x).mean(), mc_distortion.mean(), atol=5 * float(mc_distortion.std()) / math.sqrt(x.shape[0]), rtol=0)
    rate = model.rate(x)
    assert float(rate.mean()) == pytest.approx(model.rate(), abs=5 * float(rate.std()) / math.sqrt(x.shape[0]))


def test_aggregate_posterior_matches_sample_moments():
    model = CASES["mismatched"]()
    x = model.sample_data(50_000, generator(4))
    z = model.encode({"x": x}).sample()
    q = model.aggregate_posterior()
    torch.testing.assert_close(z.mean(0), q.loc, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), q.covariance_matrix, atol=0.1, rtol=0.05)
    torch.testing.assert_close(model.encode({"x": x}).loc.var(0), model.active_unit_variances(), atol=0.05, rtol=0.05)


def test_bad_inputs_fail_early():
    model = CASES["fitted"]()
    with pytest.raises(ValueError, match="encoder_var"):
        LinearGaussianLVM(**{**_fields(model), "encoder_var": -torch.ones(4)})
    with pytest.raises(ValueError, match="decoder_weight must have shape"):
        LinearGaussianLVM(**{**_fields(model), "decoder_weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="data_cov must be symmetric positive definite"):
        LinearGaussianLVM(**{**_fields(model), "data_cov": -torch.eye(8)})
    with pytest.raises(ValueError, match=r"batch\['x'\] must have shape"):
        model.encode({"x": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="z must have shape"):
        model.log_likelihood({"x": torch.zeros(2, 8)}, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_points"):
        model.sample_data(0)
    with pytest.raises(ValueError, match="latent_dim <= data_dim"):
        LinearGaussianLVM.fitted(latent_dim=9, data_dim=8)


def _fields(model):
    return dict(data_mean=model.data_mean, data_cov=model.data_cov, encoder_weight=model.encoder_weight,
                encoder_bias=model.encoder_bias, encoder_var=model.encoder_var,
                decoder_weight=model.decoder_weight, decoder_bias=model.decoder_bias,
                decoder_cov=model.decoder_cov)
