"""The shared vocabulary of the pages' verdicts, on hand-built cases."""
import math

import numpy as np
import pytest

from tvae_core.findings import (A_BELOW_B, AT_FLOOR, AT_LIMIT, B_BELOW_A, DOES_NOT_REPRODUCE, NOT_SEPARABLE,
                                NOT_TESTED, ON_TARGET_TOLERANCE, PARTLY, REPRODUCES, at_floor, compare_marginal_kl,
                                monotone_in_target, on_target, rates_vs_targets, relative_deviation,
                                verdict_from_checks)

# the thesis code's PTB free-bits sweep (its results tables): every rate below its target
THESIS_FB = {4: 2.74, 8: 6.20, 16: 12.13, 24: 19.49, 32: 26.09}


def test_on_target_is_a_relative_band_around_the_target():
    assert ON_TARGET_TOLERANCE == 0.10
    assert on_target(8.79, 8.0) and on_target(7.21, 8.0)
    assert not on_target(8.9, 8.0) and not on_target(7.1, 8.0)
    assert relative_deviation(6.0, 8.0) == pytest.approx(-0.25)


def test_rates_vs_targets_counts_below_within_and_above():
    fb = rates_vs_targets(THESIS_FB)
    assert (fb.below, fb.within, fb.above, fb.count, fb.pattern) == (5, 0, 0, 5, "all below")
    mdr = rates_vs_targets({4: 4.1, 8: 7.9, 16: 16.5})
    assert mdr.pattern == "all within tolerance" and mdr.within == 3
    assert rates_vs_targets({4: 8.9, 8: 12.8}).pattern == "all above"
    mixed = rates_vs_targets({4: 3.0, 8: 8.0, 16: 20.0})
    assert (mixed.below, mixed.within, mixed.above, mixed.pattern) == (1, 1, 1, "mixed")
    # the band's edges belong to "within"; a wider tolerance moves runs into it
    assert rates_vs_targets({10: 9.0, 20: 22.0}).pattern == "all within tolerance"
    assert rates_vs_targets(THESIS_FB, tolerance=0.25).within == 4


def test_monotone_in_target_orders_by_target_and_needs_every_step_beyond_the_noise():
    elbo = {32: -109.96, 4: -95.93, 16: -102.01, 8: -98.56, 24: -105.88}   # any key order
    assert monotone_in_target(elbo) == "falling"
    assert monotone_in_target(THESIS_FB) == "rising"
    assert monotone_in_target({4: 1.0, 8: 2.0, 16: 1.5}) == "not monotone"
    assert monotone_in_target({4: 1.0, 8: 1.0}) == "not monotone"
    # a rise of 0.3 with standard errors of 0.1 each: 0.3 > 2 * 0.141 counts, 0.25 does not
    assert monotone_in_target({4: 0.0, 8: 0.3}, {4: 0.1, 8: 0.1}) == "rising"
    assert monotone_in_target({4: 0.0, 8: 0.25, 16: 1.0}, {4: 0.1, 8: 0.1, 16: 0.1}) == "not monotone"
    # an MI estimate at its log N ceiling cannot be ranked
    assert monotone_in_target({4: 1.0, 8: 6.4}, at_limit={4: False, 8: True}) == AT_LIMIT


def test_at_floor_is_within_two_combined_standard_errors_of_the_calibration_floor():
    assert at_floor(-0.02, 0.03, -0.05, 0.02)
    assert not at_floor(0.5, 0.03, -0.05, 0.02)
    assert at_floor(0.5, 0.03, -0.05, 0.02, separation=20.0)


def test_compare_marginal_kl_orders_only_what_the_errors_and_limits_allow():
    assert compare_marginal_kl(0.1, 2.0, 0.1, 0.2) == A_BELOW_B
    assert compare_marginal_kl(2.0, 0.1, 0.2, 0.1) == B_BELOW_A
    # difference 0.4 against 2 * hypot(0.15, 0.15) = 0.42
    assert compare_marginal_kl(1.0, 1.4, 0.15, 0.15) == NOT_SEPARABLE
    assert compare_marginal_kl(0.01, 0.02, 0.0, 0.0, a_at_floor=True, b_at_floor=True) == AT_FLOOR
    # one at the floor and the other clearly above it: still ordered
    assert compare_marginal_kl(0.01, 3.0, 0.01, 0.1, a_at_floor=True) == A_BELOW_B
    assert compare_marginal_kl(0.01, 3.0, 0.01, 0.1, b_at_limit=True) == AT_LIMIT
    assert compare_marginal_kl(0.01, 3.0, 0.01, 0.1, a_at_floor=True, b_at_floor=True, a_at_limit=True) == AT_LIMIT


def test_verdict_from_checks_joins_per_target_tests():
    assert verdict_from_checks([True, True]) == REPRODUCES
    assert verdict_from_checks({"4": True, "8": False}) == PARTLY
    assert verdict_from_checks([np.bool_(False), False]) == DOES_NOT_REPRODUCE
    assert verdict_from_checks([]) == NOT_TESTED


@pytest.mark.parametrize("call, name", [
    (lambda: relative_deviation(1.0, 0.0), "target"),
    (lambda: on_target(1.0, 1.0, tolerance=-0.1), "tolerance"),
    (lambda: rates_vs_targets({}), "rates"),
    (lambda: rates_vs_targets({0: 1.0}), "rates"),
    (lambda: rates_vs_targets({4: -1.0}), "rates"),
    (lambda: rates_vs_targets({4: 1.0}, tolerance=-1), "tolerance"),
    (lambda: monotone_in_target({4: 1.0}), "values"),
    (lambda: monotone_in_target({4: 1.0, 8: math.nan}), "values"),
    (lambda: monotone_in_target({4: 1.0, 8: 2.0}, {4: -0.1, 8: 0.1}), "standard_errors"),
    (lambda: monotone_in_target({4: 1.0, 8: 2.0}, separation=-1), "separation"),
    (lambda: at_floor(1.0, -0.1, 0.0, 0.1), "se"),
    (lambda: at_floor(1.0, 0.1, math.inf, 0.1), "floor"),
    (lambda: compare_marginal_kl(math.nan, 1.0, 0.1, 0.1), "a"),
    (lambda: compare_marginal_kl(1.0, 1.0, 0.1, -0.1), "se_b"),
    (lambda: compare_marginal_kl(1.0, 1.0, 0.1, 0.1, separation=-2), "separation"),
    (lambda: verdict_from_checks([1, 0]), "checks"),
])
def test_bad_inputs_name_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()
