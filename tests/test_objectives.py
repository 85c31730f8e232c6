"""Objectives: gradients per variant, MDR multiplier dynamics, exact schedule values."""
import math

import pytest
import torch
import torch.nn.functional as F

from tvae_core.config import ObjectiveConfig
from tvae_core.methods import beta_at, compute_loss
from tvae_core.objectives import LagrangeMultiplier, elbo_loss, free_bits_loss, free_bits_rate, mdr_loss


def _kl(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_elbo_is_distortion_plus_rate():
    distortion = torch.tensor([10.0, 20.0])
    kl = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    loss, diag = elbo_loss(distortion, kl)
    assert loss.item() == pytest.approx(15.0 + 5.0)
    assert diag["rate"] == pytest.approx(5.0) and diag["elbo"] == pytest.approx(-20.0)


def test_free_bits_example_dim_zero_gradient_below_threshold():
    kl = _kl([[0.1, 2.0], [0.3, 0.05]])  # threshold per dim = 2 / 2 = 1
    free_bits_rate(kl, 2.0, "example_dim").backward()
    expected = torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=torch.float64)  # mean over B=2
    assert torch.equal(kl.grad, expected)


def test_free_bits_batch_dim_clamps_the_batch_mean_per_dimension():
    kl = _kl([[0.1, 3.0], [1.5, 0.2]])  # batch means: dim0 0.8 (< 1, clamped), dim1 1.6 (> 1)
    value = free_bits_rate(kl, 2.0, "batch_dim")
    value.backward()
    assert value.item() == pytest.approx(1.0 + 1.6)
    assert torch.equal(kl.grad[:, 0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(kl.grad[:, 1], torch.full((2,), 0.5, dtype=torch.float64))


def test_free_bits_total_clamps_total_rate():
    below = _kl([[0.5, 0.5], [0.5, 0.5]])  # mean total 1.0 < 2
    value = free_bits_rate(below, 2.0, "total")
    value.backward()
    assert value.item() == 2.0 and torch.count_nonzero(below.grad) == 0
    above = _kl([[2.0, 1.0], [1.0, 2.0]])
    free_bits_rate(above, 2.0, "total").backward()
    assert torch.allclose(above.grad, torch.full((2, 2), 0.5, dtype=torch.float64))


def test_free_bits_logs_raw_and_clamped_rates_separately():
    _, diag = free_bits_loss(torch.tensor([1.0]), torch.tensor([[0.0, 0.0]]), 4.0, "example_dim")
    assert diag["rate"] == 0.0 and diag["free_bits_rate"] == pytest.approx(4.0)


def test_unknown_free_bits_variant_names_accepted_values():
    with pytest.raises(ValueError, match="example_dim"):
        free_bits_rate(torch.zeros(1, 2), 1.0, "per_token")


def _mdr_step(multiplier, optimizer, rate_value, target=5.0):
    kl = torch.full((4, 2), rate_value / 2, requires_grad=True)
    loss, diag = mdr_loss(torch.ones(4), kl, target, multiplier)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return diag


def test_mdr_lambda_rises_below_target_and_falls_above():
    multiplier = LagrangeMultiplier(1.0)
    optimizer = LagrangeMultiplier.make_optimizer(multiplier, lr=0.1)
    assert multiplier.value.item() == pytest.approx(1.0)
    values = [_mdr_step(multiplier, optimizer, 1.0)["mdr_lambda"] for _ in range(5)]
    assert all(b > a for a, b in zip(values, values[1:]))
    values = [_mdr_step(multiplier, optimizer, 9.0)["mdr_lambda"] for _ in range(5)]
    assert all(b < a for a, b in zip(values, values[1:]))
    assert multiplier.value.item() > 0  # softplus keeps lambda >= 0


def test_mdr_model_gradient_on_rate_is_one_minus_lambda():
    multiplier = LagrangeMultiplier(3.0)
    kl = torch.full((2, 2), 0.5, requires_grad=True)
    loss, _ = mdr_loss(torch.zeros(2), kl, 10.0, multiplier)
    loss.backward()
    # d/dKL_bd of [R + lambda (r - R)] with R = mean_b sum_d KL_bd: (1 - lambda) / B
    assert torch.allclose(kl.grad, torch.full((2, 2), (1 - 3.0) / 2))
    # and u gets d/du [lambda (r - R)] = sigmoid(u) (r - R)
    assert multiplier.u.grad.item() == pytest.approx(torch.sigmoid(multiplier.u).item() * (10.0 - 1.0), rel=1e-5)


def test_mdr_damping_adds_c_times_the_constraint_to_the_rate_gradient():
    multiplier = LagrangeMultiplier(3.0)
    kl = torch.full((2, 2), 0.5, requires_grad=True)  # R = 1, r = 10
    loss, _ = mdr_loss(torch.zeros(2), kl, 10.0, multiplier, damping=0.2)
    loss.backward()
    # d/dKL_bd of [R + lambda (r - R) + c/2 (r - R)^2] = (1 - lambda - c (r - R)) / B
    assert torch.allclose(kl.grad, torch.full((2, 2), (1 - 3.0 - 0.2 * 9.0) / 2))


def _mdr_toy_rates(damping: float, steps: int = 3000) -> list[float]:
    """Descent-ascent on a model whose rate is free (R = 10 softplus(theta)) and whose decoder
    ignores the latent (constant distortion): the equilibrium multiplier is exactly 1."""
    theta = torch.tensor(0.0, requires_grad=True)
    multiplier = LagrangeMultiplier(1.0)
    model_opt = torch.optim.SGD([theta], lr=0.05)
    multiplier_opt = LagrangeMultiplier.make_optimizer(multiplier, lr=0.01)
    rates = []
    for _ in range(steps):
        rate = F.softplus(theta) * 10
        loss, diagnostics = mdr_loss((5.0 + 0.0 * rate).reshape(1), (rate / 2).expand(1, 2), 8.0,
                                     multiplier, damping)
        model_opt.zero_grad()
        multiplier_opt.zero_grad()
        loss.backward()
        model_opt.step()
        multiplier_opt.step()
        rates.append(diagnostics["rate"])
    return rates


def test_plain_mdr_cycles_and_damped_mdr_settles_on_a_collapse_prone_toy():
    """The failure the book measures on PTB, in miniature: without damping the rate swings between
    ~0 and far above the target forever; with c = 0.1 it settles on the target."""
    plain, damped = _mdr_toy_rates(0.0)[-500:], _mdr_toy_rates(0.1)[-500:]
    assert min(plain) < 1.0 and max(plain) > 50.0
    assert max(abs(r - 8.0) for r in damped) < 0.01


def test_mdr_rate_ema_smooths_the_signal():
    multiplier = LagrangeMultiplier(1.0, rate_ema=0.5)
    multiplier.constraint_signal(torch.tensor(4.0))
    assert multiplier.constraint_signal(torch.tensor(0.0)).item() == pytest.approx(2.0)


def test_cyclical_schedule_exact_values_in_optimizer_steps():
    cfg = ObjectiveConfig(name="cyc", num_cycles=2, cycle_zero_fraction=0.25, cycle_ramp_fraction=0.25)
    max_steps = 80  # cycles of 40 steps: 10 at 0, 10 ramping, 20 at 1
    values = [beta_at(s, cfg, max_steps) for s in (0, 9, 10, 15, 20, 39, 40, 55, 79)]
    assert values == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]


def test_linear_and_constant_and_ae_schedules():
    assert beta_at(5, ObjectiveConfig(name="vae", beta_schedule="linear", warmup_steps=10), 100) == 0.5
    assert beta_at(50, ObjectiveConfig(name="vae", beta_schedule="linear", warmup_steps=10), 100) == 1.0
    assert beta_at(3, ObjectiveConfig(name="vae"), 100) == 1.0
    assert beta_at(3, ObjectiveConfig(name="beta_vae", beta=0.2), 100) == 0.2
    assert beta_at(3, ObjectiveConfig(name="ae"), 100) == 0.0


def test_compute_loss_cyc_fb_combines_schedule_and_free_bits():
    cfg = ObjectiveConfig(name="cyc_fb", target_rate=4.0, num_cycles=1)
    terms = {"distortion": torch.tensor([3.0]), "kl_per_dim": torch.tensor([[0.0, 0.0]])}
    loss_zero, diag_zero = compute_loss(terms, cfg, 0, 100)     # beta = 0 at the start of a cycle
    loss_one, diag_one = compute_loss(terms, cfg, 99, 100)      # beta = 1 at the end
    assert loss_zero.item() == pytest.approx(3.0) and diag_zero["beta"] == 0.0
    assert loss_one.item() == pytest.approx(3.0 + 4.0) and math.isclose(diag_one["beta"], 1.0)
