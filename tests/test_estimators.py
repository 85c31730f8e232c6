"""Every estimator against a known answer (tvae_core.exact), with the tolerance stated.

Seeds are fixed, so each test is deterministic; tolerances are set at ~4-5 standard errors of the
estimate (or at the size of the estimator's known bias where one is being measured), so a real
bug (a wrong sign, a missing term, a log N offset) fails while Monte Carlo noise does not.
"""
import math

import pytest
import torch
from scipy import stats
from torch.distributions import Normal

from tvae_core.estimators import (
    THESIS_DATASET_SIZE,
    active_units,
    aggregate_posterior_terms,
    analytic_kl,
    collect_posterior_parameters,
    evaluate_bounds,
    evaluate_log_likelihood,
    evaluate_log_likelihood_ladder,
    iw_log_likelihood,
    iw_log_likelihood_ladder,
    kl_per_dimension,
    log_aggregate_posterior,
    median_heuristic_bandwidth,
    mi_bound_decomposition,
    minibatch_weighted_log_q_z,
    mmd2_unbiased,
    mmd_permutation_test,
    monte_carlo_kl,
    self_and_leave_one_out_terms,
    thesis_aggregate_posterior_terms,
    thesis_minibatch_weighted_terms,
)
from tvae_core.exact import LinearGaussianLVM


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def posterior_parameters(model, num_points, seed=0):
    x = model.sample_data(num_points, generator(seed))
    posterior = model.encode({"x": x})
    return posterior.loc, posterior.scale


# ------------------------------------------------------------------------------ rate / distortion
def test_analytic_kl_matches_monte_carlo():
    """Closed-form KL vs 20k-sample Monte Carlo on random posteriors, within 5 standard errors."""
    g = generator(1)
    loc = torch.randn(6, 5, generator=g, dtype=torch.float64)
    scale = torch.rand(6, 5, generator=g, dtype=torch.float64) + 0.1
    posterior = Normal(loc, scale)
    exact = analytic_kl(posterior)
    torch.testing.assert_close(exact, torch.distributions.kl_divergence(
        posterior, Normal(torch.zeros_like(loc), torch.ones_like(scale))).sum(-1))
    per_sample = torch.stack([monte_carlo_kl(posterior, 1, g) for _ in range(20_000)])   # [S, B]
    standard_error = per_sample.std(0) / math.sqrt(per_sample.shape[0])
    assert ((per_sample.mean(0) - exact).abs() < 5 * standard_error).all()


def test_analytic_kl_is_the_exact_rate_per_point():
    model = LinearGaussianLVM.mismatched(latent_dim=3, data_dim=6)
    x = model.sample_data(10, generator())
    torch.testing.assert_close(analytic_kl(model.encode({"x": x})), model.rate(x))


def test_evaluate_bounds_recovers_exact_rate_distortion_elbo():
    model = LinearGaussianLVM.mismatched(latent_dim=3, data_dim=6)
    x = model.sample_data(4000, generator(2))
    result = evaluate_bounds(model, model.batches(x, 500), num_samples=2, generator=generator(3),
                             progress=False)
    for name in ("rate", "distortion", "elbo"):
        exact = getattr(model, name)()
        assert abs(getattr(result, name) - exact) < 5 * getattr(result, f"{name}_standard_error"), name
    assert result.num_sequences == 4000 and result.num_tokens == 4000 and result.num_samples == 2
    assert result.elbo == pytest.approx(-(result.rate + result.distortion))
    assert result.elbo_per_token == pytest.approx(result.elbo)      # one "token" per example
    assert result.perplexity == pytest.approx(math.exp(-result.elbo_per_token))
    assert result.posterior is None


def test_evaluate_bounds_keeps_the_posterior_of_its_own_encoder_pass():
    """keep_posterior returns what collect_posterior_parameters would, without encoding again,
    and leaves the bounds (and the generator's stream) as they were."""
    model = LinearGaussianLVM.mismatched(latent_dim=3, data_dim=6)
    x = model.sample_data(1000, generator(2))
    plain = evaluate_bounds(model, model.batches(x, 300), generator=generator(3), progress=False)
    counting = _CountingModel(model)
    kept = evaluate_bounds(counting, model.batches(x, 300), generator=generator(3), progress=False,
                           keep_posterior=True)
    assert counting.encode_calls == 4  # one per batch
    assert (kept.rate, kept.distortion, kept.elbo) == (plain.rate, plain.distortion, plain.elbo)
    collected = collect_posterior_parameters(model, model.batches(x, 300), progress=False)
    assert torch.equal(kept.posterior.loc, collected.loc) and torch.equal(kept.posterior.scale, collected.scale)
    assert kept.posterior.loc.dtype == torch.float64 and kept.posterior.loc.shape == (1000, 3)


class _CountingModel:
    """Wraps a model and records encoder calls and the largest sample chunk seen by the decoder."""

    def __init__(self, model):
        self.model, self.latent_dim, self.encode_calls, self.max_chunk = model, model.latent_dim, 0, 0

    def encode(self, batch):
        self.encode_calls += 1
        return self.model.encode(batch)

    def log_likelihood(self, batch, z):
        self.max_chunk = max(self.max_chunk, z.shape[0])
        return self.model.log_likelihood(batch, z)

    def num_predicted_tokens(self, batch):
        return self.model.num_predicted_tokens(batch)


# ------------------------------------------------------------------------------ IW bound
def test_iw_bound_is_exact_for_the_true_posterior():
    """With q = p(z|x) every importance weight equals p(x): L_K = log p(x) for all K and chunkings."""
    model = LinearGaussianLVM.fitted(latent_dim=4, data_dim=8)
    x = model.sample_data(16, generator())
    ladder = iw_log_likelihood_ladder(model, {"x": x}, (1, 3, 10), chunk_size=4, generator=generator())
    torch.testing.assert_close(ladder, model.log_marginal(x).expand(3, -1), atol=1e-9, rtol=0)


def test_iw_bound_is_between_elbo_and_log_marginal_and_converges():
    """E[ELBO] = E[L_1] <= E[L_K] <= E[L_2K] <= log p(x), and L_K -> log p(x): on 200 points,
    paired differences within 3 standard errors; |L_256 - log p(x)| < 0.03 nats (4 SE ~ 0.015)."""
    model = LinearGaussianLVM.mismatched(latent_dim=2, data_dim=4, encoder_var_scale=2.0,
                                         encoder_gain=1.2, encoder_shift=0.3)
    x = model.sample_data(200, generator(5))
    counting = _CountingModel(model)
    ladder = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    bounds = iw_log_likelihood_ladder(counting, {"x": x}, ladder, chunk_size=50, generator=generator(6))
    assert counting.encode_calls == 1 and counting.max_chunk <= 50
    log_marginal, elbo = model.log_marginal(x), model.elbo(x)

    def paired(a, b):        # mean and standard error of a - b
        d = a - b
        return float(d.mean()), float(d.std() / math.sqrt(d.numel()))

    mean, se = paired(bounds[0], elbo)
    assert abs(mean) < 3 * se                                    # L_1 is unbiased for the ELBO
    for small, large in zip(bounds[:-1], bounds[1:]):
        mean, se = paired(large, small)
        assert mean > -3 * se                                    # L_2K >= L_K in expectation
    mean, se = paired(log_marginal, bounds[-1])
    assert mean > -3 * se and abs(mean) < 0.03                   # below log p(x), and close
    assert float((log_marginal - elbo).mean()) > 0.5             # the test is not vacuous


def test_evaluate_log_likelihood_result():
    model = LinearGaussianLVM.fitted(latent_dim=2, data_dim=4)
    x = model.sample_data(30, generator())
    result = evaluate_log_likelihood(model, model.batches(x, 8), num_samples=5, chunk_size=2,
                                     generator=generator(), progress=False)
    torch.testing.assert_close(result.log_likelihood, model.log_marginal(x), atol=1e-9, rtol=0)
    assert result.num_samples == 5 and result.num_sequences == 30 and result.num_tokens == 30
    assert result.perplexity == pytest.approx(math.exp(-float(model.log_marginal(x).sum()) / 30))
    assert result.standard_error == pytest.approx(float(model.log_marginal(x).std() / math.sqrt(30)))


def test_evaluate_log_likelihood_on_threads_draws_the_same_samples_in_the_same_order():
    """workers > 1: same numbers as one batch at a time (the draws stay on the calling thread, in
    batch order), results in batch order, torch's thread count and grad mode left as they were."""
    model = LinearGaussianLVM.mismatched(latent_dim=2, data_dim=4, encoder_var_scale=2.0,
                                         encoder_gain=1.2, encoder_shift=0.3)
    x = model.sample_data(37, generator(8))
    threads = torch.get_num_threads()
    results = [evaluate_log_likelihood_ladder(model, model.batches(x, 4), (1, 5, 20), chunk_size=3,
                                              generator=generator(9), progress=False, workers=workers)
               for workers in (1, 3)]
    for one, many in zip(*results):
        torch.testing.assert_close(many.log_likelihood, one.log_likelihood, atol=1e-12, rtol=0)
        assert (many.num_sequences, many.num_tokens) == (one.num_sequences, one.num_tokens) == (37, 37)
    assert float((results[0][2].log_likelihood - model.elbo(x)).mean()) > 0.1   # samples matter
    assert torch.get_num_threads() == threads and torch.is_grad_enabled()
    with pytest.raises(ValueError, match="workers"):
        evaluate_log_likelihood(model, model.batches(x, 4), num_samples=2, workers=0, progress=False)


# ------------------------------------------------------------------------------ aggregate posterior
def test_log_aggregate_posterior_matches_brute_force_and_is_chunk_invariant():
    g = generator(7)
    loc = torch.randn(50, 3, generator=g, dtype=torch.float64)
    scale = torch.rand(50, 3, generator=g, dtype=torch.float64) + 0.05
    z = loc + scale * torch.randn(50, 3, generator=g, dtype=torch.float64)
    pairwise = Normal(loc[None], scale[None]).log_prob(z[:, None]).sum(-1)           # [M, N]
    brute_self = torch.logsumexp(pairwise, 1) - math.log(50)
    brute_loo = torch.logsumexp(pairwise.fill_diagonal_(-math.inf), 1) - math.log(49)
    torch.testing.assert_close(log_aggregate_posterior(z, loc, scale), brute_self, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_aggregate_posterior(z, loc, scale, chunk_size=7), brute_self, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_aggregate_posterior(z, loc, scale, leave_one_out=True), brute_loo, atol=1e-10, rtol=0)
    z3 = torch.stack([z, z])                                                           # [S, N, D]
    assert log_aggregate_posterior(z3, loc, scale).shape == (2, 50)


def test_collapsed_encoder_gives_exactly_zero_mi_and_marginal_kl():
    """A = 0: every q(z|x_n) is N(0, I) = p(z), so log q(z) = log p(z) for any N, both estimators."""
    loc, scale = posterior_parameters(LinearGaussianLVM.collapsed(latent_dim=4, data_dim=8), 300)
    for terms in self_and_leave_one_out_terms(loc, scale, generator=generator(), decompose=True):
        assert abs(terms.mutual_information.value) < 1e-9
        assert abs(terms.marginal_kl.value) < 1e-9
        assert abs(terms.total_correlation) < 1e-9 and abs(terms.dimensionwise_kl) < 1e-9
        assert not terms.mutual_information.at_ceiling


@pytest.mark.parametrize("latent_dim,num_points,tolerance", [(1, 1000, 0.08), (2, 2000, 0.08), (4, 2000, 0.15)])
@pytest.mark.parametrize("case", ["fitted", "mismatched"])
def test_aggregate_estimators_recover_exact_mi_and_marginal_kl(case, latent_dim, num_points, tolerance):
    """Low-dimensional codes with N >> e^I: both estimators within ``tolerance`` nats of the exact
    MI, marginal KL, TC and dimension-wise KL, and the truth bracketed (self term below,
    leave-one-out above, up to 3 standard errors)."""
    model = getattr(LinearGaussianLVM, case)(latent_dim=latent_dim, data_dim=2 * latent_dim)
    loc, scale = posterior_parameters(model, num_points, seed=latent_dim)
    with_self, loo = self_and_leave_one_out_terms(loc, scale, generator=generator(latent_dim), decompose=True)
    exact_mi, exact_kl = model.mutual_information(), model.marginal_kl()
    for terms in (with_self, loo):
        assert abs(terms.mutual_information.value - exact_mi) < tolerance
        assert abs(terms.marginal_kl.value - exact_kl) < tolerance
        assert abs(terms.total_correlation - model.total_correlation()) < tolerance
        assert abs(terms.dimensionwise_kl - model.dimensionwise_kl()) < tolerance
        # exact identities on the estimates (same samples)
        assert terms.mutual_information.value + terms.marginal_kl.value == pytest.approx(terms.rate, abs=1e-9)
        assert abs(terms.decomposition_discrepancy) < 1e-9
    assert with_self.mutual_information.value - 3 * with_self.mutual_information.standard_error <= exact_mi
    assert exact_mi <= loo.mutual_information.value + 3 * loo.mutual_information.standard_error
    assert with_self.mutual_information.value <= loo.mutual_information.value   # always, same samples
    assert with_self.mutual_information.ceiling == pytest.approx(math.log(num_points))
    assert loo.mutual_information.ceiling == math.inf
    assert with_self.mutual_information.bias == "down" and loo.mutual_information.bias == "up"


def test_eight_dimensional_code_is_bracketed_by_the_two_estimators():
    """D = 8, I = 7.8 nats, N = 2000 (log N = 7.6): the self-term estimate is far below the truth
    and leave-one-out above; the truth lies between, and marginal KL is bracketed the other way."""
    model = LinearGaussianLVM.mismatched(latent_dim=8, data_dim=16)
    loc, scale = posterior_parameters(model, 2000, seed=8)
    with_self, loo = self_and_leave_one_out_terms(loc, scale, generator=generator(8))
    assert with_self.mutual_information.value < model.mutual_information() < loo.mutual_information.value
    assert loo.marginal_kl.value < model.marginal_kl() < with_self.marginal_kl.value
    assert with_self.total_correlation is None     # decompose=False by default


def test_z_from_a_subset_of_points_has_the_full_estimators_expectation_and_limits():
    """``sampled_points``: z from N_s of the N points, q(z) over all N. Exact answers of the fitted
    linear-Gaussian model (D = 2, N = 4,000) are recovered within 0.08 nats plus 3 standard
    errors from 500 sampled points; the ceiling stays log N; None and N_s >= N are the full pass,
    bit for bit; the high-MI case still sits at log N, flagged."""
    model = LinearGaussianLVM.fitted(latent_dim=2, data_dim=4)
    loc, scale = posterior_parameters(model, 4000, seed=2)
    full, _ = self_and_leave_one_out_terms(loc, scale, generator=generator(3))
    part, part_loo = self_and_leave_one_out_terms(loc, scale, generator=generator(3), sampled_points=500)
    same, _ = self_and_leave_one_out_terms(loc, scale, generator=generator(3), sampled_points=4000)
    assert same == full and full.sampled_points is None and part.sampled_points == 500
    assert part.num_points == 4000 and part.mutual_information.ceiling == pytest.approx(math.log(4000))
    for terms in (part, part_loo):
        mi, kl = terms.mutual_information, terms.marginal_kl
        assert abs(mi.value - model.mutual_information()) < 0.08 + 3 * mi.standard_error
        assert abs(kl.value - model.marginal_kl()) < 0.08 + 3 * kl.standard_error
        assert mi.value + kl.value == pytest.approx(terms.rate, abs=1e-9)
    assert part.mutual_information.standard_error > full.mutual_information.standard_error
    assert "z from 500 of them" in part.estimator
    high = LinearGaussianLVM.high_mutual_information(latent_dim=8, data_dim=16)
    loc, scale = posterior_parameters(high, 2048)
    capped, _ = self_and_leave_one_out_terms(loc, scale, generator=generator(), sampled_points=256)
    assert capped.mutual_information.at_ceiling and capped.mutual_information.value <= math.log(2048) + 1e-9
    with pytest.raises(ValueError, match="sampled_points"):
        self_and_leave_one_out_terms(loc, scale, sampled_points=1)


@pytest.mark.parametrize("num_points", [256, 2048])
def test_high_mi_estimate_is_capped_at_log_n_and_flagged(num_points):
    """I = 32 nats >> log N: the self-term MI sits at log N (flagged at_ceiling), marginal KL at its
    floor R - log N (flagged at_floor); leave-one-out is not capped (it overshoots log N)."""
    model = LinearGaussianLVM.high_mutual_information(latent_dim=8, data_dim=16)
    loc, scale = posterior_parameters(model, num_points)
    with_self, loo = self_and_leave_one_out_terms(loc, scale, generator=generator())
    mi = with_self.mutual_information
    assert mi.value <= math.log(num_points) + 1e-9
    assert mi.value == pytest.approx(math.log(num_points), abs=0.05)
    assert mi.at_ceiling and with_self.marginal_kl.at_floor
    assert not loo.mutual_information.at_ceiling
    assert loo.mutual_information.value > math.log(num_points) + 5
    assert model.mutual_information() > 30


def test_num_samples_per_point_and_leave_one_out_flag():
    model = LinearGaussianLVM.mismatched(latent_dim=2, data_dim=4)
    loc, scale = posterior_parameters(model, 500)
    terms = aggregate_posterior_terms(loc, scale, num_samples=4, generator=generator(), leave_one_out=True)
    assert terms.num_samples == 4 and terms.num_points == 500 and terms.leave_one_out
    assert abs(terms.mutual_information.value - model.mutual_information()) < 0.1


def test_mi_bound_decomposition_identity_on_estimates_and_exact_model():
    model = LinearGaussianLVM.mismatched(latent_dim=2, data_dim=4)
    loc, scale = posterior_parameters(model, 2000)
    terms = aggregate_posterior_terms(loc, scale, generator=generator())
    estimated = mi_bound_decomposition(model.entropy(), model.distortion(), terms.rate,
                                       terms.mutual_information.value, terms.marginal_kl.value)
    assert not estimated.entropy_is_exact and "proxy" in estimated.entropy_note
    assert abs(estimated.identity_discrepancy) < 1e-9           # MC rate = MI + KL on the same samples
    assert estimated.lower_gap == pytest.approx(model.lower_gap(), abs=0.15)
    exact = model.bound_decomposition()
    assert exact.gaps_sum == pytest.approx(-model.elbo() - model.entropy(), abs=1e-9)
    assert exact.upper_gap == pytest.approx(model.marginal_kl(), abs=1e-9)
    assert exact.lower_bound <= exact.mutual_information <= exact.upper_bound


# ------------------------------------------------------------------------------ thesis-style
def test_minibatch_weighted_sampling_reports_log_n_for_a_collapsed_encoder():
    """MWS with q(z|x) = q(z) returns log q(z) - log N, so MI = log N_hard exactly (truth: 0)."""
    loc, scale = posterior_parameters(LinearGaussianLVM.collapsed(latent_dim=4, data_dim=8), 640)
    terms = thesis_minibatch_weighted_terms(loc, scale, batch_size=64, generator=generator())
    assert terms.mutual_information.value == pytest.approx(math.log(THESIS_DATASET_SIZE), abs=1e-9)
    z = loc[:8] + scale[:8]
    log_q = minibatch_weighted_log_q_z(z, loc[:8], scale[:8], dataset_size=100)
    torch.testing.assert_close(log_q, Normal(0.0, 1.0).log_prob(z).sum(-1).double() - math.log(100))


def test_minibatch_weighted_sampling_overstates_the_n_point_mi_and_caps_a_larger_one_at_log_nm():
    """With the right N: above the leave-one-out estimate (itself >= the N-point MI in expectation)
    for a moderately informative encoder; for a very informative one it tends to log(N M), about
    log M above the N-point MI's ceiling log N and far below the population MI of 32 nats."""
    n, batch = 2048, 64
    fitted = LinearGaussianLVM.fitted(latent_dim=4, data_dim=8)
    loc, scale = posterior_parameters(fitted, n)
    mws = thesis_minibatch_weighted_terms(loc, scale, batch_size=batch, dataset_size=n, generator=generator())
    loo = aggregate_posterior_terms(loc, scale, generator=generator(), leave_one_out=True)
    assert mws.mutual_information.value > loo.mutual_information.value + 5.0   # LOO: ~3.7, the exact MI
    assert loo.mutual_information.value == pytest.approx(fitted.mutual_information(), abs=0.2)
    strong = LinearGaussianLVM.high_mutual_information(latent_dim=8, data_dim=16)
    loc, scale = posterior_parameters(strong, n)
    mws = thesis_minibatch_weighted_terms(loc, scale, batch_size=batch, dataset_size=n, generator=generator())
    assert mws.mutual_information.value == pytest.approx(math.log(n * batch), abs=0.05)
    assert mws.mutual_information.value > math.log(n) + 0.9 * math.log(batch)
    assert mws.mutual_information.value < strong.mutual_information() - 10.0


def test_thesis_640_point_estimate_is_capped_at_log_640():
    loc, scale = posterior_parameters(LinearGaussianLVM.high_mutual_information(latent_dim=8, data_dim=16), 1000)
    terms = thesis_aggregate_posterior_terms(loc, scale, generator=generator())
    assert terms.num_points == 640 and terms.mutual_information.at_ceiling
    assert terms.mutual_information.value == pytest.approx(math.log(640), abs=0.05)


# ------------------------------------------------------------------------------ MMD
def test_mmd_permutation_test_is_calibrated_under_the_null():
    """Two prior samples, 60 repeats: p-values ~ uniform (KS p > 0.01), rejections at 5% <= 15%."""
    g = generator(11)
    p_values = [mmd_permutation_test(torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g),
                                     num_permutations=100, generator=g).p_value for _ in range(60)]
    assert stats.kstest(p_values, "uniform").pvalue > 0.01
    assert sum(p < 0.05 for p in p_values) / len(p_values) <= 0.15


def test_mmd_detects_a_shift_and_the_mismatched_aggregate_posterior():
    g = generator(12)
    shifted = mmd_permutation_test(torch.randn(200, 8, generator=g) + 0.4, torch.randn(200, 8, generator=g),
                                   num_permutations=200, generator=g)
    assert shifted.p_value < 0.01 and shifted.mmd2 > 0
    assert len(shifted.bandwidths) == 3 and shifted.bandwidths[1] == pytest.approx(shifted.median_bandwidth)
    # q(z) vs p(z): exactly equal for the fitted model, KL = 1.4 nats apart for the mismatched one
    for model, rejects in ((LinearGaussianLVM.fitted(8, 16), False), (LinearGaussianLVM.mismatched(8, 16), True)):
        x = model.sample_data(300, g)
        z_q = model.encode({"x": x}).sample()
        result = mmd_permutation_test(z_q, torch.randn(300, 8, generator=g, dtype=torch.float64),
                                      num_permutations=200, generator=g)
        assert (result.p_value < 0.01) == rejects


def test_mmd2_unbiased_is_near_zero_under_the_null():
    g = generator(13)
    values = [mmd2_unbiased(torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g), (2.0,))
              for _ in range(200)]
    values = torch.tensor(values)
    assert abs(float(values.mean())) < 4 * float(values.std()) / math.sqrt(200)


# ------------------------------------------------------------------------------ units
@pytest.mark.parametrize("case,expected_active", [("fitted", 4), ("collapsed", 0)])
def test_active_units_and_per_dimension_kl(case, expected_active):
    model = getattr(LinearGaussianLVM, case)(latent_dim=4, data_dim=8)
    params = collect_posterior_parameters(model, model.batches(model.sample_data(5000, generator()), 1000),
                                          progress=False)
    units = active_units(params.loc)
    assert units.num_active == expected_active
    torch.testing.assert_close(units.variance_of_means, model.active_unit_variances(), atol=0.02, rtol=0.05)
    torch.testing.assert_close(kl_per_dimension(params.loc, params.scale), model.rate_per_dimension(),
                               atol=0.03, rtol=0.05)


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_fail_early_with_the_parameter_name():
    model = LinearGaussianLVM.fitted(latent_dim=2, data_dim=4)
    batch = {"x": model.sample_data(4)}
    loc, scale = posterior_parameters(model, 10)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        iw_log_likelihood(model, batch, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        iw_log_likelihood(model, batch, num_samples=True)           # defect 3: a bool passed as K
    with pytest.raises(ValueError, match="num_samples_ladder must be strictly increasing"):
        iw_log_likelihood_ladder(model, batch, (4, 2))
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        iw_log_likelihood(model, batch, num_samples=4, chunk_size=0)
    with pytest.raises(ValueError, match="N = loc.shape"):
        aggregate_posterior_terms(loc[:1], scale[:1])
    with pytest.raises(ValueError, match="loc has 1 non-finite"):
        aggregate_posterior_terms(loc.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.nan, dtype=loc.dtype)), scale)
    with pytest.raises(ValueError, match="scale must have the same shape"):
        aggregate_posterior_terms(loc, scale[:, :1])
    with pytest.raises(ValueError, match="scale must be > 0"):
        aggregate_posterior_terms(loc, -scale)
    with pytest.raises(ValueError, match="leave_one_out=True needs z"):
        log_aggregate_posterior(torch.zeros(3, 2, dtype=torch.float64), loc, scale, leave_one_out=True)
    with pytest.raises(TypeError, match="got a single dict"):
        evaluate_bounds(model, batch, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        evaluate_log_likelihood(model, [], num_samples=2, progress=False)
    with pytest.raises(ValueError, match="need >= 2 samples"):
        mmd_permutation_test(torch.zeros(1, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="num_permutations must be an int >= 1"):
        mmd_permutation_test(torch.randn(5, 2), torch.randn(5, 2), num_permutations=0)
    with pytest.raises(ValueError, match="rate must be a finite float"):
        mi_bound_decomposition(1.0, 1.0, math.inf, 1.0, 0.0)


# ------------------------------------------------------------------------------ known answers the tests above leave out
def _correlated_code_model():
    """x ~ N(0, I_2), q(z|x) = N(A x, 0.09 I) with A's rows 64 degrees apart: q(z) = N(0, A A^T + 0.09 I)
    has correlated coordinates, so its total correlation (0.57 nats) is far from 0."""
    return LinearGaussianLVM(
        data_mean=torch.zeros(2), data_cov=torch.eye(2),
        encoder_weight=torch.tensor([[1.0, 0.0], [0.9, 0.436]]), encoder_bias=torch.zeros(2),
        encoder_var=torch.full((2,), 0.09), decoder_weight=torch.eye(2), decoder_bias=torch.zeros(2),
        decoder_cov=torch.eye(2), name="correlated code")


def test_total_correlation_and_dimensionwise_kl_where_they_are_not_zero():
    """The models above have TC <= 0.05 nats, inside the tolerance: here the exact TC is 0.57 and
    both estimators must find it (N = 2000, D = 2, within 0.08 nats as the other D = 2 cases)."""
    model = _correlated_code_model()
    assert model.total_correlation() > 0.5
    # the posterior noise from another stream than the data: with D = dx and one seed, z's noise
    # would be x's own draws
    loc, scale = posterior_parameters(model, 2000, seed=21)
    for terms in self_and_leave_one_out_terms(loc, scale, generator=generator(121), decompose=True):
        assert abs(terms.total_correlation - model.total_correlation()) < 0.08
        assert abs(terms.dimensionwise_kl - model.dimensionwise_kl()) < 0.08


def test_log_aggregate_posterior_of_stacked_and_foreign_samples_matches_brute_force():
    """[S, N, D]: each draw s against all N posteriors (self term at i = n); [M, D] with M != N: any
    points z, scored against the mixture of all N posteriors (no self term to drop)."""
    g = generator(22)
    loc = torch.randn(50, 3, generator=g, dtype=torch.float64)
    scale = torch.rand(50, 3, generator=g, dtype=torch.float64) + 0.05
    z3 = loc + scale * torch.randn(2, 50, 3, generator=g, dtype=torch.float64)        # [S, N, D]

    def brute(z, leave_one_out=False):
        pairwise = Normal(loc[None], scale[None]).log_prob(z[:, None]).sum(-1)       # [M, N]
        if leave_one_out:
            return torch.logsumexp(pairwise.fill_diagonal_(-math.inf), 1) - math.log(49)
        return torch.logsumexp(pairwise, 1) - math.log(50)

    for loo in (False, True):
        expected = torch.stack([brute(z3[s], loo) for s in range(2)])
        torch.testing.assert_close(log_aggregate_posterior(z3, loc, scale, leave_one_out=loo), expected,
                                   atol=1e-10, rtol=0)
    foreign = torch.randn(30, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(log_aggregate_posterior(foreign, loc, scale), brute(foreign), atol=1e-10, rtol=0)


def test_iw_ladder_rungs_are_nested_prefixes_of_one_stream():
    """The ladder's L_3 is the single-K bound drawn from the same generator state (the first 3
    samples of the stream), and L_K computed by hand from the same draws equals the ladder's."""
    model = LinearGaussianLVM.mismatched(latent_dim=2, data_dim=4)
    batch = {"x": model.sample_data(5, generator(23))}
    ladder = iw_log_likelihood_ladder(model, batch, (3, 10), chunk_size=4, generator=generator(24))
    torch.testing.assert_close(ladder[0], iw_log_likelihood(model, batch, 3, chunk_size=4, generator=generator(24)),
                               atol=1e-12, rtol=0)
    # by hand: 10 draws in the ladder's chunks (3, then 4 + 3), log w, logsumexp of the first K
    posterior, g = model.encode(batch), generator(24)
    eps = torch.cat([torch.randn((size, 5, 2), generator=g, dtype=posterior.loc.dtype) for size in (3, 4, 3)])
    z = posterior.loc + posterior.scale * eps                                               # [10, B, D]
    log_w = (model.log_likelihood(batch, z) + Normal(0.0, 1.0).log_prob(z).sum(-1)
             - posterior.log_prob(z).sum(-1))                                               # [10, B]
    for row, k in enumerate((3, 10)):
        torch.testing.assert_close(ladder[row], torch.logsumexp(log_w[:k], 0) - math.log(k), atol=1e-10, rtol=0)


class _UnequalTokens:
    """The fitted linear-Gaussian model with 1, 2 or 3 "tokens" per example: per-token numbers and
    the perplexity must divide the corpus's total log-likelihood by its total token count."""

    def __init__(self, model):
        self.model = model

    def encode(self, batch):
        return self.model.encode(batch)

    def log_likelihood(self, batch, z):
        return self.model.log_likelihood(batch, z)

    def num_predicted_tokens(self, batch):
        return 1 + torch.arange(batch["x"].shape[0]) % 3


def test_perplexity_divides_the_total_log_likelihood_by_the_total_token_count():
    model = LinearGaussianLVM.fitted(latent_dim=2, data_dim=4)
    x = model.sample_data(60, generator(25))
    result = evaluate_log_likelihood(_UnequalTokens(model), [{"x": x[:32]}, {"x": x[32:]}], num_samples=4,
                                     generator=generator(26), progress=False)
    # the true posterior: L_K = log p(x) exactly
    torch.testing.assert_close(result.log_likelihood, model.log_marginal(x), atol=1e-9, rtol=0)
    tokens = 1 + torch.cat([torch.arange(32), torch.arange(28)]) % 3
    assert result.num_tokens == int(tokens.sum())
    total = float(result.log_likelihood.sum())
    assert result.log_likelihood_per_token == pytest.approx(total / int(tokens.sum()), abs=1e-12)
    assert result.perplexity == pytest.approx(math.exp(-total / int(tokens.sum())), rel=1e-12)
    # not the mean of per-sequence perplexities' exponents: that would weight short sequences up
    assert result.perplexity != pytest.approx(math.exp(-float((result.log_likelihood / tokens).mean())), rel=1e-3)


def test_mmd2_unbiased_matches_the_closed_form_for_a_shifted_gaussian():
    """x ~ N(mu, I_D), y ~ N(0, I_D), one kernel exp(-|a-b|^2 / (2 h^2)):
    MMD^2 = 2 c (1 - exp(-|mu|^2 / (2 (h^2 + 2)))), c = (h^2 / (h^2 + 2))^(D/2). The unbiased
    estimate averages to it (50 repeats, within 4 standard errors), and equals the double sum."""
    dim, h, mu = 4, 2.0, torch.full((4,), 0.5, dtype=torch.float64)
    c = (h * h / (h * h + 2)) ** (dim / 2)
    truth = 2 * c * (1 - math.exp(-float(mu @ mu) / (2 * (h * h + 2))))
    g = generator(27)
    values = torch.tensor([mmd2_unbiased(torch.randn(200, dim, generator=g, dtype=torch.float64) + mu,
                                         torch.randn(200, dim, generator=g, dtype=torch.float64), (h,))
                           for _ in range(50)])
    assert abs(float(values.mean()) - truth) < 4 * float(values.std()) / math.sqrt(50)
    assert truth > 10 * float(values.std()) / math.sqrt(50)          # the test can tell it from zero
    # the definition, term by term, on a small sample
    x = torch.randn(5, dim, generator=g, dtype=torch.float64)
    y = torch.randn(6, dim, generator=g, dtype=torch.float64)

    def k(a, b):
        return math.exp(-float((a - b) @ (a - b)) / (2 * h * h))

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / (5 * 6)
    assert mmd2_unbiased(x, y, (h,)) == pytest.approx(xx + yy - 2 * xy, abs=1e-12)


def test_median_bandwidth_and_per_bandwidth_statistics():
    """Pooled 0, 1, 3, 6: distances 1, 2, 3, 3, 5, 6, median 3. With explicit bandwidths the test's
    statistic is the mean of the single-kernel MMD^2 values, each the unbiased estimate itself."""
    assert median_heuristic_bandwidth(torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [6.0]])) == 3.0
    g = generator(28)
    x, y = torch.randn(40, 3, generator=g) + 0.3, torch.randn(40, 3, generator=g)
    result = mmd_permutation_test(x, y, bandwidths=(0.5, 2.0), num_permutations=20, generator=g)
    assert result.bandwidths == (0.5, 2.0)
    for h, value in zip(result.bandwidths, result.mmd2_per_bandwidth):
        assert value == pytest.approx(mmd2_unbiased(x, y, (h,)), abs=1e-12)
    assert result.mmd2 == pytest.approx(sum(result.mmd2_per_bandwidth) / 2, abs=1e-12)
    assert all(1 / 21 - 1e-12 <= p <= 1.0 for p in result.p_value_per_bandwidth)


def test_median_bandwidth_of_a_large_sample_is_a_subsample_median_near_the_truth():
    """Above MEDIAN_MAX_POINTS pooled points the median comes from a random subsample: for
    N(0, I_32) samples the distance between two points is sqrt(2) times a chi(32) variable, so the
    median is sqrt(2 * chi2.median(32)); the subsample's is within 2 % of it, and seeded."""
    from tvae_core.estimators.mmd import MEDIAN_MAX_POINTS

    g = generator(29)
    x, y = torch.randn(3000, 32, generator=g), torch.randn(3000, 32, generator=g)
    assert x.shape[0] + y.shape[0] > MEDIAN_MAX_POINTS
    truth = math.sqrt(2 * stats.chi2.median(32))
    median = median_heuristic_bandwidth(x, y, generator(30))
    assert abs(median - truth) < 0.02 * truth
    assert median == median_heuristic_bandwidth(x, y, generator(30))
