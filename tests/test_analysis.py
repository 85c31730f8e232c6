"""The pages' shared analysis (verdicts, ranks, multipliers, collapse time, the run table), on hand-built cases."""
import math

import numpy as np
import pytest

from tvae_core.analysis import (A_BELOW_B, AT_FLOOR, AT_LIMIT, B_BELOW_A, BOTH_MULTIPLIERS, DOES_NOT_REPRODUCE,
                                MOSTLY_INDEX_CODE_MI, MOSTLY_MARGINAL_KL, MULTIPLIER_MOVED, NEITHER_MULTIPLIER,
                                NEITHER_RESOLVED, NOT_SEPARABLE, NOT_TESTED, ON_TARGET_TOLERANCE,
                                ONLY_BOOK_MULTIPLIER, ONLY_THESIS_MULTIPLIER, PARTLY, REPRODUCES,
                                THESIS_RUN_OFF_TARGET, at_floor, compare_marginal_kl, collapse_phrase,
                                larger_part_of_rate, larger_part_of_rate_bracketed, marginal_kl_floor,
                                monotone_in_target, multiplier_summary, near_zero_by_multiplier, near_zero_kl,
                                on_target, elbo_difference, iw_difference, monotone_in_steps, paired_difference,
                                rank_correlation, rates_vs_targets, relative_deviation, run_table,
                                sentences_until_collapse, smooth, verdict_from_checks)

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


def test_marginal_kl_floor_from_a_passs_estimates_is_the_estimators_own_floor():
    import torch

    from tvae_core.estimators import self_and_leave_one_out_terms

    generator = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(50, 4, generator=generator, dtype=torch.float64) * 3, torch.full((50, 4), 0.2, dtype=torch.float64)
    terms, _ = self_and_leave_one_out_terms(loc, scale, generator=generator)
    floor = marginal_kl_floor(terms.marginal_kl.value, terms.mutual_information.value, terms.mutual_information.ceiling)
    assert abs(floor - terms.marginal_kl.floor) < 1e-9 and abs(floor - (terms.rate - math.log(50))) < 1e-9


def test_larger_part_of_rate_needs_two_standard_errors_of_the_difference():
    # rate 16: half is 8; KL 9 with se 0.4 leaves 9 - 0.8 = 8.2 > 8
    assert larger_part_of_rate(9.0, 0.4, 16.0) == MOSTLY_MARGINAL_KL
    assert larger_part_of_rate(7.0, 0.4, 16.0) == MOSTLY_INDEX_CODE_MI
    # 8.7 - 0.8 = 7.9: within the noise of the half
    assert larger_part_of_rate(8.7, 0.4, 16.0) == NEITHER_RESOLVED
    assert larger_part_of_rate(8.7, 0.4, 16.0, separation=1.0) == MOSTLY_MARGINAL_KL
    # a collapsed run (no rate, a marginal KL at zero within its error) puts neither term ahead
    assert larger_part_of_rate(0.01, 0.02, 0.0) == NEITHER_RESOLVED


def test_near_zero_kl_is_at_floor_against_the_floor_plus_a_margin():
    # floor 0.0 +- 0.02; margin 0.5: 0.3 +- 0.05 is near zero, 1.0 +- 0.05 is not, 0.6 +- 0.05 is
    # within 2 combined se of 0.5 (0.108), so not resolved above it
    assert near_zero_kl(0.3, 0.05, 0.0, 0.02) and not near_zero_kl(1.0, 0.05, 0.0, 0.02)
    assert near_zero_kl(0.6, 0.05, 0.0, 0.02) and not near_zero_kl(0.6, 0.05, 0.0, 0.02, margin=0.2)
    assert near_zero_kl(0.3, 0.05, 0.0, 0.02, margin=0.0) == at_floor(0.3, 0.05, 0.0, 0.02)
    with pytest.raises(ValueError, match="margin"):
        near_zero_kl(0.3, 0.05, 0.0, 0.02, margin=-1.0)


def test_larger_part_of_rate_from_the_two_aggregate_estimates():
    # rate 8: half is 4; the bracket [lower, upper] must lie wholly on one side of it
    assert larger_part_of_rate_bracketed(4.5, 5.0, 8.0) == MOSTLY_MARGINAL_KL
    assert larger_part_of_rate_bracketed(1.0, 3.9, 8.0) == MOSTLY_INDEX_CODE_MI
    assert larger_part_of_rate_bracketed(3.5, 4.5, 8.0) == NEITHER_RESOLVED
    # crossed estimates (possible on one sample) are read as the bracket they span
    assert larger_part_of_rate_bracketed(5.0, 4.5, 8.0) == MOSTLY_MARGINAL_KL
    assert larger_part_of_rate_bracketed(4.5, 3.5, 8.0) == NEITHER_RESOLVED
    with pytest.raises(ValueError, match="marginal_kl_lower"):
        larger_part_of_rate_bracketed(math.nan, 4.0, 8.0)
    with pytest.raises(ValueError, match="rate"):
        larger_part_of_rate_bracketed(1.0, 2.0, -1.0)


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
    (lambda: larger_part_of_rate(math.nan, 0.1, 8.0), "marginal_kl"),
    (lambda: larger_part_of_rate(1.0, -0.1, 8.0), "se"),
    (lambda: larger_part_of_rate(1.0, 0.1, -8.0), "rate"),
    (lambda: larger_part_of_rate(1.0, 0.1, 8.0, separation=-1), "separation"),
])
def test_bad_inputs_name_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --- the pages' analysis: verdict words, ranks, multipliers, collapse time, the run table --------
def test_rates_vs_targets_verdict_in_words():
    assert rates_vs_targets({8: 8.1, 16: 16.5}).verdict == "lands on target"
    assert rates_vs_targets({8: 5.0, 16: 12.0}).verdict == "undershoots"
    assert rates_vs_targets({8: 10.0, 16: 20.0}).verdict == "overshoots"
    assert rates_vs_targets({8: 5.0, 16: 20.0}).verdict == "misses in both directions"
    assert rates_vs_targets({8: 8.0, 16: 12.0}).verdict == "lands on target for some targets only"


def test_rank_correlation_is_spearmans_rho():
    assert rank_correlation([4, 8, 16], [-100, -110, -130]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)   # 1 - 6 * 2 / (4 * 15)
    assert math.isnan(rank_correlation([1.0], [2.0]))
    with pytest.raises(ValueError, match="one length"):
        rank_correlation([1, 2], [1, 2, 3])


def test_smooth_averages_what_is_there_at_the_edges():
    assert smooth([1.0, 2.0, 3.0], 1).tolist() == [1.0, 2.0, 3.0]
    assert smooth([0.0, 3.0, 6.0], 3).tolist() == pytest.approx([1.5, 3.0, 4.5])
    # trailing: the step and the ones before it, never a later one
    assert smooth([0.0, 3.0, 6.0, 9.0], 2, trailing=True).tolist() == pytest.approx([0.0, 1.5, 4.5, 7.5])
    assert smooth([0.0, 3.0, 6.0], 5, trailing=True).tolist() == pytest.approx([0.0, 1.5, 3.0])


def _rows(rates, lambdas):
    return [{"rate": r, "mdr_lambda": lam} for r, lam in zip(rates, lambdas)]


def test_multiplier_summary_tells_a_settled_run_from_a_limit_cycle():
    steps = 400
    settled = multiplier_summary(_rows([16.0 + 0.1 * (-1) ** t for t in range(steps)], [1.0 + 0.01 * (-1) ** t for t in range(steps)]),
                                 target=16.0, window=10, band=0.5)
    assert settled.settled and settled.last_quarter_min == pytest.approx(15.9, abs=0.11)
    assert settled.crossings_of_one == steps - 1   # jitter around 1 crosses it every step
    # a limit cycle: the rate swings 0 <-> 100 with a period of 100 steps, lambda between 0 and 2
    phase = np.arange(steps) % 100
    cycling = multiplier_summary(_rows(np.where(phase < 50, 0.0, 100.0), np.where(phase < 50, 2.0, 0.0)),
                                 target=16.0, window=10, band=0.5)
    assert not cycling.settled and cycling.crossings_of_one == 7
    assert cycling.last_quarter_min == 0.0 and cycling.last_quarter_max == 100.0
    assert cycling.max_lambda == 2.0 and cycling.min_lambda == 0.0 and cycling.final_lambda == 0.0
    assert cycling.largest_move(0.5) == 1.5 and settled.largest_move(1.0) == pytest.approx(0.01)
    # the thesis multiplier's question: did lambda_t leave lambda_0 by MULTIPLIER_MOVED or more?
    assert settled.barely_moved(1.0) and not cycling.barely_moved(0.5)
    assert not settled.barely_moved(1.0, threshold=0.005) and cycling.barely_moved(0.5, threshold=2.0)
    assert settled.barely_moved(1.0 + MULTIPLIER_MOVED - 0.02) and not settled.barely_moved(1.0 + MULTIPLIER_MOVED)
    with pytest.raises(ValueError, match="threshold"):
        settled.barely_moved(1.0, threshold=-0.1)
    with pytest.raises(ValueError, match="mdr_lambda"):
        multiplier_summary([{"rate": 1.0}] * 8, target=16.0, window=1, band=0.5)
    with pytest.raises(ValueError, match="target"):
        multiplier_summary(_rows([1.0] * 8, [1.0] * 8), target=0.0, window=1, band=0.5)


def test_near_zero_by_multiplier_needs_the_thesis_run_on_target_then_reads_both_flags():
    # off target, the thesis-multiplier run says nothing, whatever the marginal KLs
    for thesis_near in (True, False):
        for book_near in (True, False):
            assert near_zero_by_multiplier(False, thesis_near, book_near) == THESIS_RUN_OFF_TARGET
    assert near_zero_by_multiplier(True, True, False) == ONLY_THESIS_MULTIPLIER
    assert near_zero_by_multiplier(True, True, True) == BOTH_MULTIPLIERS
    assert near_zero_by_multiplier(True, False, True) == ONLY_BOOK_MULTIPLIER
    assert near_zero_by_multiplier(np.bool_(True), np.bool_(False), False) == NEITHER_MULTIPLIER
    with pytest.raises(ValueError, match="book_near_zero"):
        near_zero_by_multiplier(True, True, 0)


def test_sentences_until_collapse_times_the_last_fall_below_the_threshold():
    rates = [5.0, 4.0, 3.0, 0.1, 0.1, 0.1]
    assert sentences_until_collapse(rates, threshold=0.5, batch_size=32) == 4 * 32   # last above: step 2
    assert sentences_until_collapse([0.1] * 6, threshold=0.5, batch_size=32) == 0     # starts collapsed
    assert sentences_until_collapse([5.0] * 6, threshold=0.5, batch_size=32) is None  # never collapses
    assert sentences_until_collapse([0.1, 2.0, 0.1, 0.1], threshold=0.5, batch_size=8) == 3 * 8  # comes back once
    assert "collapses after 128 training sentences" in collapse_phrase("the small decoder", 128, 5.0, 192)
    assert "starts below the threshold" in collapse_phrase("the small decoder", 0, 0.1, 192)
    # the time is when the fall shows in the trailing average: a centred window would see it earlier
    # (the trailing mean is 1.5, 1.0, 0.5 at steps 10-12 and 0 from step 13: the last step at or
    # above the threshold is 12; a centred window of 4 would put it at 11)
    rates = [2.0] * 10 + [0.0] * 10
    assert sentences_until_collapse(rates, threshold=0.5, batch_size=1, window=4) == 12 + 2
    assert sentences_until_collapse([0.0] + [2.0] * 4 + [0.0] * 20, 0.5, 1, window=2) == 5 + 2
    assert "does not collapse within its 192" in collapse_phrase("the small decoder", None, 5.0, 192)


def test_run_table_takes_each_runs_method_from_its_config_not_its_label():
    from types import SimpleNamespace

    from tvae_core.experiments import method_config

    config = method_config("FB", "smoke", 8.0, free_bits_variant="total").replace(label="my own name")
    run = SimpleNamespace(config=config, metrics={})
    ev = SimpleNamespace(rate=7.0, distortion=100.0, elbo=-107.0, iw_log_likelihood=-104.0, iw_log_likelihood_se=0.5,
                         elbo_on_iw_sentences=-106.0, iw_perplexity=200.0, active_units=3, mutual_information=2.0,
                         mutual_information_ceiling=8.2, mutual_information_at_ceiling=False, marginal_kl=5.0)
    table = run_table({"my own name": run}, {"my own name": ev})
    row = table.loc["my own name"]
    assert row["method"] == "FB" and row["variant"] == "total" and row["target_rate"] == 8.0
    assert row["rate"] == 7.0 and math.isnan(row["final_lambda"]) and not row["mi_at_ceiling"]
    with pytest.raises(ValueError, match="without an evaluation"):
        run_table({"my own name": run}, {})


def test_paired_difference_by_hand():
    """a - b = [0.5, 0.5, 1.0, 0.5]: mean 0.625, sample standard deviation 0.25, error 0.125."""
    diff = paired_difference([1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.0, 3.5])
    assert (diff.mean, diff.standard_error, diff.num_sentences) == pytest.approx((0.625, 0.125, 4))
    assert diff.ordering() == B_BELOW_A                       # 0.625 > 2 x 0.125
    assert diff.ordering(separation=5.0) == NOT_SEPARABLE     # 0.625 <= 5 x 0.125
    assert paired_difference([0.5, 1.5, 2.0, 3.5], [1.0, 2.0, 3.0, 4.0]).ordering() == A_BELOW_B


def test_a_small_difference_is_shown_only_by_a_narrow_error():
    from tvae_core.analysis import PairedDifference

    assert PairedDifference(0.2, 0.1, 64).within(0.5)              # 0.2 + 2 x 0.1 <= 0.5
    assert not PairedDifference(0.2, 0.3, 64).within(0.5)          # not separable from 0, yet not shown small
    assert PairedDifference(0.2, 0.3, 64).ordering() == NOT_SEPARABLE
    assert not PairedDifference(-0.45, 0.05, 64).within(0.5)       # |-0.45| + 0.1 > 0.5
    with pytest.raises(ValueError, match="margin"):
        PairedDifference(0.0, 0.1, 64).within(-1.0)


def test_pairing_removes_what_the_sentences_share():
    """Sentence costs spread over tens of nats under both models, one model 0.5 nats better on every
    sentence up to small noise: the means' own errors overlap (not separable as independent
    estimates), the paired error is the noise's alone and orders them."""
    rng = np.random.default_rng(0)
    shared = rng.normal(-100.0, 30.0, size=64)
    a = shared + 0.5 + rng.normal(0.0, 0.2, size=64)
    b = shared
    se = lambda x: x.std(ddof=1) / math.sqrt(len(x))
    assert compare_marginal_kl(a.mean(), b.mean(), se(a), se(b)) == NOT_SEPARABLE
    diff = paired_difference(a, b)
    assert diff.standard_error == pytest.approx(0.2 / 8, rel=0.3) and diff.standard_error < se(a) / 50
    assert diff.mean == pytest.approx(0.5, abs=0.1) and diff.ordering() == B_BELOW_A


def test_paired_difference_refuses_what_cannot_be_paired():
    with pytest.raises(ValueError, match="a has 3 values, b 2"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match=r"b\[1\]=nan"):
        paired_difference([1.0, 2.0], [1.0, float("nan")])
    with pytest.raises(ValueError, match="separation"):
        paired_difference([1.0, 2.0], [1.0, 1.0]).ordering(separation=-1.0)


def test_iw_and_elbo_differences_pair_runs_only_on_the_same_sentences():
    from types import SimpleNamespace

    def ev(label, iw, elbo, sha="x"):
        return SimpleNamespace(label=label, iw_log_likelihood_per_sentence=iw, iw_num_sentences=len(iw),
                               elbo_per_sentence=elbo, num_sentences=len(elbo), sentences_sha256=sha)

    a = ev("a", [-10.0, -20.0, -30.0], [-12.0, -22.0, -33.0, -8.0])
    b = ev("b", [-11.0, -21.0, -31.5], [-12.0, -22.5, -33.0, -8.5])
    diff = iw_difference(a, b)
    assert diff.mean == pytest.approx(7 / 6) and diff.ordering() == B_BELOW_A
    elbo = elbo_difference(a, b)
    assert (elbo.mean, elbo.num_sentences) == pytest.approx((0.25, 4))
    assert elbo.standard_error == pytest.approx(math.sqrt(1 / 12) / 2)   # [0, .5, 0, .5]: sd sqrt(1/12)
    with pytest.raises(ValueError, match="different sentences"):
        iw_difference(a, ev("c", [-10.0, -20.0, -30.0], [-1.0] * 4, sha="y"))
    with pytest.raises(ValueError, match="iw_num_sentences=3, b .* 2"):
        iw_difference(a, ev("d", [-10.0, -20.0], [-1.0] * 4))
    with pytest.raises(TypeError, match="RunEvaluation"):
        elbo_difference(a, SimpleNamespace(elbo=-1.0))


def test_monotone_in_steps_needs_every_step_resolved():
    from tvae_core.analysis import PairedDifference

    down, up = PairedDifference(-1.0, 0.2, 64), PairedDifference(1.0, 0.2, 64)
    flat = PairedDifference(-0.3, 0.2, 64)          # within two paired standard errors
    assert monotone_in_steps([down, down, down]) == "falling"
    assert monotone_in_steps([up, up]) == "rising"
    assert monotone_in_steps([down, flat, down]) == "not monotone"
    assert monotone_in_steps([down, flat], separation=1.0) == "falling"   # 0.3 > 1 x 0.2
    assert monotone_in_steps([down, up]) == "not monotone"
    with pytest.raises(ValueError, match="PairedDifference"):
        monotone_in_steps([])
    with pytest.raises(ValueError, match="PairedDifference"):
        monotone_in_steps([-1.0, -2.0])
