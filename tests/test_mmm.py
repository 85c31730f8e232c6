"""Mixed membership model: calibration against known answers, held-out evaluation, probs not
logits, determinism and early failures (DESIGN.md defect 9). Small T, N and step counts: seconds.

Tolerances: a marginal-KL estimate must lie within ``4 * se`` of the truth, where ``se`` is its
own Monte Carlo standard error, and may lie up to ``bias`` (0.03-0.1 nats here) further below it:
the MMM's finite-sample misfit can only lower the estimate in expectation
(``E[KL_hat] = KL(q || p) - KL(q || q_hat)``), never raise it.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from tvae_core.mmm import (MixedMembershipConfig, fit_mixed_membership, prior_samples,
                           split_heldout, stick_breaking)
from tvae_core.mmm.model import (AssignedComponent, component_log_prob_table, mmm_model,
                                 sticks_from_weights)
from tvae_core.profiles import get_profile

D = 4
FAST = dict(num_components=3, num_steps=150, low_rank=2, learning_rate=0.05)


def gaussian_kl_to_prior(mean: torch.Tensor, std: torch.Tensor) -> float:
    """KL(N(m, diag(s^2)) || N(0, I)) = 1/2 sum_d (s_d^2 + m_d^2 - 1 - log s_d^2)."""
    return float(0.5 * (std ** 2 + mean ** 2 - 1 - 2 * std.log()).sum())


def within(estimate: float, se: float, truth: float, bias: float) -> bool:
    """Within 4 standard errors of the truth, plus ``bias`` below it only: the misfit can lower the
    estimate in expectation, never raise it."""
    return truth - 4 * se - bias <= estimate <= truth + 4 * se


@pytest.fixture(scope="module")
def calibration_fit():
    """Two prior groups and a shifted Gaussian, RD family (shared by several tests)."""
    gen = torch.Generator().manual_seed(11)
    mean, std = torch.tensor([1.0, -0.5, 0.5, 0.0]), torch.tensor([0.5, 1.0, 0.8, 1.2])
    samples = {
        "prior": prior_samples(600, D, seed=1),
        "prior (calibration)": prior_samples(600, D, seed=2),
        "shifted": mean + std * torch.randn(600, D, generator=gen),
    }
    config = MixedMembershipConfig(family="RD", **FAST)
    result = fit_mixed_membership(samples, config, rates={"shifted": 5.0},
                                  calibration_group="prior (calibration)", progress=False)
    return samples, result, gaussian_kl_to_prior(mean, std)


# ----------------------------------------------------------------------------- calibration
def test_prior_vs_prior_floor_is_near_zero(calibration_fit):
    _, result, _ = calibration_fit
    floor, se = result.calibration_floor()
    assert within(floor, se, 0.0, bias=0.05), (floor, se)
    kl, se_prior = result.calibration_floor("prior")
    assert within(kl, se_prior, 0.0, bias=0.05), (kl, se_prior)


def test_shifted_gaussian_recovers_analytic_kl(calibration_fit):
    _, result, truth = calibration_fit
    g = result.index("shifted")
    kl, se = float(result.marginal_kl[g]), float(result.marginal_kl_se[g])
    assert within(kl, se, truth, bias=0.1), (kl, se, truth)


def test_gaussian_mixture_recovers_monte_carlo_kl():
    """Bimodal group (a 'hole' at the origin); reference: 200k-sample MC with the true density."""
    centre = torch.tensor([1.5, 0.0, 0.0, 0.0])
    q = dist.MixtureSameFamily(dist.Categorical(probs=torch.tensor([0.5, 0.5])),
                               dist.Normal(torch.stack([centre, -centre]), 0.5).to_event(1))
    prior = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    torch.manual_seed(3)
    z = q.sample((200_000,))
    truth = float((q.log_prob(z) - prior.log_prob(z)).mean())
    samples = {"prior": prior_samples(600, D, seed=4), "mixture": q.sample((600,))}
    result = fit_mixed_membership(samples, MixedMembershipConfig(family="RD", **FAST),
                                  progress=False)
    kl, se = float(result.marginal_kl[1]), float(result.marginal_kl_se[1])
    assert within(kl, se, truth, bias=0.1), (kl, se, truth)


def test_r1_family_calibration():
    """R1 models every coordinate with one shared 1-D mixture: exact for i.i.d. coordinates."""
    gen = torch.Generator().manual_seed(5)
    samples = {"prior": prior_samples(400, D, seed=6),
               "prior (calibration)": prior_samples(400, D, seed=7),
               "iid shifted": 0.7 + 0.6 * torch.randn(400, D, generator=gen)}
    result = fit_mixed_membership(samples, MixedMembershipConfig(family="R1", **FAST),
                                  calibration_group="prior (calibration)", progress=False)
    floor, se = result.calibration_floor()
    assert within(floor, se, 0.0, bias=0.03), (floor, se)
    truth = gaussian_kl_to_prior(torch.full((D,), 0.7), torch.full((D,), 0.6))
    kl, se = float(result.marginal_kl[2]), float(result.marginal_kl_se[2])
    assert within(kl, se, truth, bias=0.1), (kl, se, truth)


# ----------------------------------------------------------------------------- the result
def test_weights_are_distributions_and_mi_is_rate_minus_kl(calibration_fit):
    _, result, _ = calibration_fit
    assert result.weights.shape == (3, FAST["num_components"])
    assert torch.allclose(result.weights.sum(-1), torch.ones(3), atol=1e-5)
    assert (result.weights >= 0).all()
    mi = result.index_code_mi
    assert math.isnan(mi[0]) and math.isnan(mi[1])  # no rate given for the prior groups
    assert mi[2] == pytest.approx(5.0 - float(result.marginal_kl[2]))
    frame = result.to_frame()
    assert list(frame.index) == list(result.group_names)
    assert {"marginal_kl", "marginal_kl_se", "rate", "index_code_mi"} <= set(frame.columns)
    assert result.weights_frame().shape == (3, FAST["num_components"])
    assert result.loss_trace.shape == (FAST["num_steps"],) and result.fit_seconds > 0


def test_heldout_split_is_disjoint_seeded_and_covering():
    samples = {"a": torch.randn(100, D), "b": torch.randn(37, D)}
    splits = split_heldout(samples, heldout_fraction=0.3, seed=0)
    for name, (fit, heldout) in splits.items():
        assert set(fit.tolist()).isdisjoint(heldout.tolist())
        assert sorted(fit.tolist() + heldout.tolist()) == list(range(len(samples[name])))
        assert len(heldout) == round(0.3 * len(samples[name]))
    again = split_heldout(samples, heldout_fraction=0.3, seed=0)
    other = split_heldout(samples, heldout_fraction=0.3, seed=1)
    assert all(torch.equal(splits[k][1], again[k][1]) for k in samples)
    assert not torch.equal(splits["a"][1], other["a"][1])


def test_marginal_kl_is_evaluated_on_heldout_samples_only(calibration_fit):
    samples, result, _ = calibration_fit
    config = result.config
    prior = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    for g, name in enumerate(result.group_names):
        _, heldout = split_heldout(samples, config.heldout_fraction, config.seed)[name]
        z = samples[name][heldout]
        manual = (result.log_density(name, z) - prior.log_prob(z)).mean()
        assert float(manual) == pytest.approx(float(result.marginal_kl[g]), abs=1e-5)
        assert result.num_heldout[g] == len(heldout)


def test_same_seed_gives_identical_numbers():
    samples = {"prior": prior_samples(200, D, seed=0), "x": 0.5 + prior_samples(150, D, seed=1)}
    config = MixedMembershipConfig(family="RD", num_components=2, num_steps=30, low_rank=1)
    first = fit_mixed_membership(samples, config, progress=False)
    second = fit_mixed_membership(samples, config, progress=False)
    assert torch.equal(first.marginal_kl, second.marginal_kl)
    assert torch.equal(first.weights, second.weights)
    assert torch.equal(first.loss_trace, second.loss_trace)
    third = fit_mixed_membership(samples, MixedMembershipConfig(
        family="RD", num_components=2, num_steps=30, low_rank=1, seed=1), progress=False)
    assert not torch.equal(first.marginal_kl, third.marginal_kl)


def test_weights_are_probabilities_not_logits():
    """Two far-apart groups, T = 2: each group puts weight ~1 on its own component, and the
    density is sum_t w_t N_t(z) with w as probabilities. Had w been passed as logits, weights
    (1, 0) would mix as softmax = (0.73, 0.27) and the density would be off by ~log 0.73."""
    gen = torch.Generator().manual_seed(8)
    samples = {"left": -4.0 + 0.5 * torch.randn(300, D, generator=gen),
               "right": 4.0 + 0.5 * torch.randn(300, D, generator=gen)}
    config = MixedMembershipConfig(family="RD", num_components=2, num_steps=100, low_rank=1)
    result = fit_mixed_membership(samples, config, progress=False)
    weights = result.weights
    assert weights.max(-1).values.min() > 0.99
    assert weights[0].argmax() != weights[1].argmax()

    z = samples["left"][:50]
    params = {k: v[0] for k, v in result.posterior.items()}          # the MAP point, [T, ...]
    components = dist.LowRankMultivariateNormal(params["component_loc"],
                                                params["component_cov_factor"],
                                                params["component_scale"] ** 2)
    per_component = components.log_prob(z.unsqueeze(1))              # [50, T]
    manual = torch.logsumexp(weights[0].log() + per_component, dim=-1)
    assert torch.allclose(result.log_density("left", z), manual, atol=1e-4)
    own = int(weights[0].argmax())
    assert torch.allclose(result.log_density("left", z), per_component[:, own], atol=0.02)


def test_meanfield_guide_agrees_with_map():
    samples = {"prior": prior_samples(300, D, seed=9),
               "shift": 1.0 + prior_samples(300, D, seed=10)}
    common = dict(family="RD", num_components=2, num_steps=150, low_rank=1)
    map_fit = fit_mixed_membership(samples, MixedMembershipConfig(**common), progress=False)
    mf_fit = fit_mixed_membership(samples, MixedMembershipConfig(
        guide="meanfield", num_posterior_samples=16, **common), progress=False)
    assert mf_fit.posterior_weights.shape == (16, 2, 2)
    assert torch.allclose(mf_fit.weights.sum(-1), torch.ones(2), atol=1e-5)
    truth = gaussian_kl_to_prior(torch.ones(D), torch.ones(D))       # = D / 2
    for fit in (map_fit, mf_fit):
        assert within(float(fit.marginal_kl[1]), float(fit.marginal_kl_se[1]), truth, bias=0.1)
    # the two guides score the same held-out samples: their estimates agree far more closely than
    # either's standard error (0.2 nats) says
    assert abs(float(mf_fit.marginal_kl[1]) - float(map_fit.marginal_kl[1])) < 0.1


def test_single_component_and_unequal_group_sizes():
    samples = {"prior": prior_samples(120, D, seed=0), "small": prior_samples(30, D, seed=1)}
    result = fit_mixed_membership(samples, MixedMembershipConfig(
        family="RD", num_components=1, num_steps=20, low_rank=1), progress=False)
    assert torch.equal(result.weights, torch.ones(2, 1))
    assert result.num_fit == (84, 21) and result.num_heldout == (36, 9)
    # both groups are prior samples: one Gaussian fits them, and both marginal KLs are ~0
    for g in range(2):
        assert within(float(result.marginal_kl[g]), float(result.marginal_kl_se[g]), 0.0, bias=0.05)


# ----------------------------------------------------------------------------- model pieces
def test_stick_breaking_rows_sum_to_one_and_invert():
    sticks = torch.rand(5, 7)
    weights = stick_breaking(sticks)
    assert weights.shape == (5, 8)
    assert torch.allclose(weights.sum(-1), torch.ones(5))
    assert torch.allclose(sticks_from_weights(weights, eps=1e-7), sticks, atol=1e-5)


@pytest.mark.parametrize("family", ["R1", "RD"])
def test_component_table_matches_torch_distributions(family):
    T, r = 3, 2
    torch.manual_seed(0)
    params = {"component_loc": torch.randn(T, D if family == "RD" else 1),
              "component_scale": torch.rand(T, D if family == "RD" else 1) + 0.5}
    if family == "RD":
        params["component_cov_factor"] = torch.randn(T, D, r)
        value = torch.randn(2, 5, D)
        reference = dist.LowRankMultivariateNormal(
            params["component_loc"], params["component_cov_factor"],
            params["component_scale"] ** 2).log_prob(value.unsqueeze(-2)).permute(2, 0, 1)
    else:
        value = torch.randn(2, 5)
        reference = dist.Normal(params["component_loc"][:, 0], params["component_scale"][:, 0]
                                ).log_prob(value.unsqueeze(-1)).permute(2, 0, 1)
    table = component_log_prob_table(family, params, value)           # [T, 2, 5]
    assert torch.allclose(table, reference, atol=1e-4)
    # a sampled (not enumerated) assignment picks entries of the table
    c = torch.randint(T, (2, 5))
    picked = AssignedComponent(family, params, c).log_prob(value)
    assert torch.allclose(picked, reference.gather(0, c.unsqueeze(0)).squeeze(0), atol=1e-4)


def test_enumerated_likelihood_matches_manual_mixture_and_ignores_padding():
    """The model's enumerated log-likelihood is sum_{g, n valid} log sum_t w_gt N_t(x_gn);
    padded slots (mask False) contribute nothing whatever they hold."""
    config = MixedMembershipConfig(family="RD", num_components=3, low_rank=1)
    torch.manual_seed(1)
    values = {"component_loc": torch.randn(3, D), "component_scale": torch.rand(3, D) + 0.5,
              "component_cov_factor": 0.3 * torch.randn(3, D, 1), "sticks": torch.rand(2, 2)}

    def guide(data, mask, config):
        with pyro.plate("components", 3, dim=-1):
            for name in ("component_loc", "component_scale"):
                pyro.sample(name, dist.Delta(values[name], event_dim=1))
            pyro.sample("component_cov_factor", dist.Delta(values["component_cov_factor"],
                                                           event_dim=2))
        with pyro.plate("groups", 2, dim=-2), pyro.plate("stick_index", 2, dim=-1):
            pyro.sample("sticks", dist.Delta(values["sticks"]))

    data = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    loss = elbo.loss(mmm_model, guide, data, mask, config)
    garbage = data.clone()
    garbage[1, 4:] = 1e3
    assert elbo.loss(mmm_model, guide, garbage, mask, config) == pytest.approx(loss, rel=1e-6)
    prior_only = elbo.loss(mmm_model, guide, data, torch.zeros_like(mask), config)
    weights = stick_breaking(values["sticks"])                        # [G, T]
    components = dist.LowRankMultivariateNormal(values["component_loc"],
                                                values["component_cov_factor"],
                                                values["component_scale"] ** 2)
    per_point = torch.logsumexp(weights.log().unsqueeze(1)
                                + components.log_prob(data.unsqueeze(-2)), dim=-1)  # [G, N]
    assert prior_only - loss == pytest.approx(float(per_point[mask].sum()), rel=1e-4)


# ----------------------------------------------------------------------------- failing early
@pytest.mark.parametrize("kwargs, parameter", [
    ({"family": "R2"}, "family"),
    ({"guide": "laplace"}, "guide"),
    ({"num_components": 0}, "num_components"),
    ({"alpha": 0.0}, "alpha"),
    ({"low_rank": 0}, "low_rank"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"scale_prior": "gamma"}, "scale_prior"),
])
def test_bad_config_raises_naming_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        MixedMembershipConfig(**kwargs)


@pytest.mark.parametrize("samples, extra, message", [
    ({}, {}, "non-empty"),
    ({"a": torch.randn(10, D), "b": torch.full((10, D), float("nan"))}, {}, r"samples\['b'\]"),
    ({"a": torch.randn(10, D), "b": torch.randn(10, D + 1)}, {}, "latent_dim"),
    ({"a": torch.randn(10, D), "b": torch.randn(0, D)}, {}, "empty"),
    ({"a": torch.randn(10)}, {}, r"samples\['a'\]"),
    ({"a": torch.randn(10, D)}, {"rates": {"typo": 1.0}}, "rates"),
    ({"a": torch.randn(10, D)}, {"calibration_group": "typo"}, "calibration_group"),
    ({"a": torch.randn(10, 2)}, {"config": MixedMembershipConfig(low_rank=3)}, "low_rank"),
    ({"a": torch.randn(10, D)}, {"num_threads": 0}, "num_threads"),
])
def test_bad_samples_raise_naming_the_problem(samples, extra, message):
    with pytest.raises(ValueError, match=message):
        fit_mixed_membership(samples, progress=False, **extra)


def test_config_from_profile():
    size = get_profile("smoke").mmm
    config = MixedMembershipConfig.from_profile(size, family="R1")
    assert (config.num_components, config.num_steps, config.low_rank, config.family) == (
        size.num_components, size.num_steps, size.low_rank, "R1")
    hash(config)  # frozen: usable as a cache key


def test_r1_meanfield_halfcauchy_with_padding_runs():
    """The other code paths: R1 + meanfield guide + HalfCauchy prior + unequal group sizes."""
    samples = {"prior": prior_samples(60, D, seed=0), "small": 1.0 + prior_samples(25, D, seed=1)}
    config = MixedMembershipConfig(family="R1", guide="meanfield", scale_prior="halfcauchy",
                                   num_components=2, num_steps=30, num_posterior_samples=4)
    result = fit_mixed_membership(samples, config, progress=True, num_threads=1)
    assert torch.isfinite(result.marginal_kl).all() and torch.isfinite(result.loss_trace).all()
    assert result.posterior["component_loc"].shape == (4, 2, 1)
    assert result.marginal_kl[1] > result.marginal_kl[0]


def test_latent_sample_groups_draw_from_each_posterior_with_its_analytic_rate():
    from tvae_core.mmm import CALIBRATION, PRIOR, latent_sample_groups

    n, d = 400, 3
    g = torch.Generator().manual_seed(1)
    loc, scale = torch.randn(n, d, generator=g), 0.1 + torch.rand(n, d, generator=g)
    posteriors = {"collapsed": (torch.zeros(n, d), torch.ones(n, d)), "run": (loc, scale)}
    samples, rates = latent_sample_groups(posteriors, samples_per_group=n, seed=0)
    assert list(samples) == [PRIOR, CALIBRATION, "collapsed", "run"] and list(rates) == list(samples)
    assert all(s.shape == (n, d) and s.dtype == torch.float32 for s in samples.values())
    # q(z|x) = p(z): rate 0, like the two prior groups
    assert rates[PRIOR] == rates[CALIBRATION] == 0.0 and rates["collapsed"] == pytest.approx(0.0, abs=1e-12)
    # all sentences picked: the rate is the analytic mean KL over them, whatever the order
    kl = 0.5 * (loc.double() ** 2 + scale.double() ** 2 - 1 - 2 * scale.double().log()).sum(1).mean()
    assert rates["run"] == pytest.approx(float(kl), rel=1e-12)
    # one z ~ q(z|x) per picked sentence: with q(z|x) = N(2, 0.5^2) for every x, z's mean and sd
    shifted, shifted_rates = latent_sample_groups({"shifted": (torch.full((n, d), 2.0), torch.full((n, d), 0.5))},
                                                  samples_per_group=n, seed=0)
    z = shifted["shifted"]
    assert (z.mean(0) - 2.0).abs().max() < 4 * 0.5 / math.sqrt(n) and (z.std(0) - 0.5).abs().max() < 0.1
    assert shifted_rates["shifted"] == pytest.approx(d * 0.5 * (4.0 + 0.25 - 1.0 - math.log(0.25)), rel=1e-12)
    # fewer sentences than samples_per_group: every sentence once
    small, _ = latent_sample_groups({"run": (loc[:50], scale[:50])}, samples_per_group=n, seed=0)
    assert all(len(s) == 50 for s in small.values())


def test_latent_sample_groups_are_seeded_and_a_run_added_last_changes_no_other_group():
    from tvae_core.mmm import latent_sample_groups

    n, d = 300, 2
    g = torch.Generator().manual_seed(2)
    posteriors = {f"run {i}": (torch.randn(n, d, generator=g), 0.5 + torch.rand(n, d, generator=g)) for i in range(3)}
    first, first_rates = latent_sample_groups(dict(list(posteriors.items())[:2]), 100, seed=5)
    again, again_rates = latent_sample_groups(posteriors, 100, seed=5)
    # notebook 09 fits notebook 04's groups: the same runs in the same order draw the same samples
    for label in first:
        assert torch.equal(first[label], again[label]) and first_rates[label] == again_rates[label]
    other, _ = latent_sample_groups(posteriors, 100, seed=6)
    assert not torch.equal(other["run 0"], again["run 0"])


@pytest.mark.parametrize("posteriors, samples_per_group, message", [
    ({}, 10, "posteriors is empty"),
    ({"a": (torch.zeros(5, 2), torch.ones(5, 2)), "b": (torch.zeros(6, 2), torch.ones(6, 2))}, 10, "different shapes"),
    ({"prior": (torch.zeros(5, 2), torch.ones(5, 2))}, 10, "name of a prior group"),
    ({"a": (torch.zeros(5, 2), torch.ones(5, 2))}, 1, "samples_per_group=1"),
])
def test_latent_sample_groups_reject_bad_input_naming_it(posteriors, samples_per_group, message):
    from tvae_core.mmm import latent_sample_groups

    with pytest.raises(ValueError, match=message):
        latent_sample_groups(posteriors, samples_per_group, seed=0)


def test_group_density_averages_densities_over_posterior_draws():
    """q_hat_g(z) = (1/S) sum_s sum_t w_st N(z; theta_st): S identical draws give one draw's
    density (the -log S offsets the S copies), and two different draws give the mean of their
    densities, not of their log densities."""
    from tvae_core.mmm import group_log_density

    torch.manual_seed(4)
    one = {"component_loc": torch.randn(1, 3, D), "component_scale": torch.rand(1, 3, D) + 0.5,
           "component_cov_factor": 0.3 * torch.randn(1, 3, D, 1)}
    weights = torch.tensor([[0.2, 0.5, 0.3]])
    z = torch.randn(7, D)
    single = group_log_density(weights, one, "RD", z)
    mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights[0]), dist.LowRankMultivariateNormal(
        one["component_loc"][0], one["component_cov_factor"][0], one["component_scale"][0] ** 2))
    assert torch.allclose(single, mixture.log_prob(z), atol=1e-5)
    twice = {k: v.expand(2, *v.shape[1:]) for k, v in one.items()}
    assert torch.allclose(group_log_density(weights.expand(2, 3), twice, "RD", z), single, atol=1e-5)
    other = {k: v + 0.5 for k, v in one.items()}
    both = {k: torch.cat([one[k], other[k]]) for k in one}
    expected = torch.logaddexp(single, group_log_density(weights, other, "RD", z)) - math.log(2)
    assert torch.allclose(group_log_density(weights.expand(2, 3), both, "RD", z), expected, atol=1e-5)
