"""The analysis the pages share, as tested functions instead of notebook cells.

The vocabulary a page uses when it judges a thesis finding: one on-target tolerance, so every
page calls the same runs "on target", and small rules that turn measured values into a verdict (a
rate pattern, a trend over targets, an ordering of two marginal KLs). Each rule refuses to compare
a value at its estimator's limit (a ceiling such as log N, or a calibration floor) and says so
instead. Beside them: a paired difference of two runs' bounds on the same sentences, the run table of a
set of evaluated runs, a rank correlation, whether a Lagrange multiplier settled, and when a run's
rate collapsed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# relative: a run's test rate R counts as on its target r when |R - r| <= ON_TARGET_TOLERANCE * r
ON_TARGET_TOLERANCE = 0.10


def relative_deviation(rate: float, target: float) -> float:
    """(R - r) / r: negative below the target, positive above it."""
    if not target > 0:
        raise ValueError(f"target={target!r} must be a rate > 0 (nats)")
    return (rate - target) / target


def on_target(rate: float, target: float, tolerance: float = ON_TARGET_TOLERANCE) -> bool:
    """Whether ``rate`` lies within ``(1 +- tolerance) * target``."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0 (relative)")
    return abs(relative_deviation(rate, target)) <= tolerance


# --- verdicts on a thesis finding --------------------------------------------------------------
# A page states what a thesis finding became in the book with one of these words, decided by the
# functions below from measured values, never typed by hand.
REPRODUCES = "reproduces"
PARTLY = "partly reproduces"
DOES_NOT_REPRODUCE = "does not reproduce"
NOT_TESTED = "not tested here"

# how many (combined) standard errors two estimates must differ by before a page orders them
SEPARATION = 2.0

A_BELOW_B = "a below b"
B_BELOW_A = "b below a"
NOT_SEPARABLE = "not separable"   # within `separation` combined standard errors
AT_FLOOR = "at floor: undecidable"
AT_LIMIT = "at estimator limit: undecidable"


def _check_finite(name: str, value: float, minimum: float | None = None) -> float:
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value!r} must be finite")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum:g}")
    return value


def _checked_mapping(name: str, values: Mapping[float, float], minimum: int) -> list[tuple[float, float]]:
    """(target, value) pairs sorted by target; targets > 0, values finite, at least ``minimum``."""
    if len(values) < minimum:
        raise ValueError(f"{name} needs at least {minimum} targets, got {len(values)}")
    pairs = []
    for target, value in values.items():
        if not float(target) > 0:
            raise ValueError(f"{name}: target {target!r} must be a rate > 0 (nats)")
        pairs.append((float(target), _check_finite(f"{name}[{target!r}]", value)))
    return sorted(pairs)


@dataclass(frozen=True)
class RatesVersusTargets:
    """How a method's achieved rates sit against its targets (band: :data:`ON_TARGET_TOLERANCE`)."""
    below: int        # rate < (1 - tolerance) * target
    within: int       # on target
    above: int        # rate > (1 + tolerance) * target
    tolerance: float

    @property
    def count(self) -> int:
        return self.below + self.within + self.above

    @property
    def verdict(self) -> str:
        """In words: 'lands on target', 'undershoots', 'overshoots', 'misses in both directions'
        or 'lands on target for some targets only'."""
        if self.within == self.count:
            return "lands on target"
        if self.below == self.count:
            return "undershoots"
        if self.above == self.count:
            return "overshoots"
        if self.below and self.above:
            return "misses in both directions"
        return "lands on target for some targets only"

    @property
    def pattern(self) -> str:
        """'all below', 'all within tolerance', 'all above' or 'mixed'."""
        for name, n in (("all below", self.below), ("all within tolerance", self.within),
                        ("all above", self.above)):
            if n == self.count:
                return name
        return "mixed"


def rates_vs_targets(rates: Mapping[float, float],
                     tolerance: float = ON_TARGET_TOLERANCE) -> RatesVersusTargets:
    """Count the runs below, on and above their targets.

    ``rates`` maps each target rate r (nats, > 0) to the achieved rate R of its run (analytic, so
    never at an estimator limit). R is on target when ``abs(R - r) <= tolerance * r`` (:func:`on_target`),
    below when R is under that band and above when over it.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0 (relative)")
    pairs = _checked_mapping("rates", rates, minimum=1)
    for target, rate in pairs:
        _check_finite(f"rates[{target!r}]", rate, minimum=0.0)
    below = sum(relative_deviation(rate, target) < -tolerance for target, rate in pairs)
    above = sum(relative_deviation(rate, target) > tolerance for target, rate in pairs)
    return RatesVersusTargets(below=below, within=len(pairs) - below - above, above=above,
                              tolerance=tolerance)


def monotone_in_target(values: Mapping[float, float], standard_errors: Mapping[float, float] | None = None,
                       at_limit: Mapping[float, bool] | None = None,
                       separation: float = SEPARATION) -> str:
    """'rising', 'falling', 'not monotone' or :data:`AT_LIMIT`, for values ordered by their target.

    Rule: a step between neighbouring targets counts only if it exceeds ``separation`` combined
    standard errors (``sqrt(se_i**2 + se_j**2)``; with no standard errors, any nonzero step
    counts). 'rising' when every step rises, 'falling' when every step falls, else 'not monotone'
    (a step within the noise breaks a trend too). If any value sits at its estimator's limit
    (``at_limit``, e.g. an MI estimate at its log N ceiling), the trend is not decided: AT_LIMIT.
    """
    pairs = _checked_mapping("values", values, minimum=2)
    if at_limit is not None and any(at_limit.get(target, False) for target in values):
        return AT_LIMIT
    if not separation >= 0:
        raise ValueError(f"separation={separation!r} must be >= 0 (standard errors)")
    se = {}
    for target, _ in pairs:
        raw = 0.0 if standard_errors is None else standard_errors.get(target, 0.0)
        se[target] = _check_finite(f"standard_errors[{target!r}]", raw, minimum=0.0)
    steps = []
    for (t0, v0), (t1, v1) in zip(pairs, pairs[1:]):
        noise = separation * math.hypot(se[t0], se[t1])
        steps.append(0 if abs(v1 - v0) <= noise else (1 if v1 > v0 else -1))
    if all(s == 1 for s in steps):
        return "rising"
    if all(s == -1 for s in steps):
        return "falling"
    return "not monotone"


def at_floor(value: float, se: float, floor: float, floor_se: float, separation: float = SEPARATION) -> bool:
    """Whether an estimate is indistinguishable from its estimator's calibration floor (the value it
    reports when the truth is zero): ``value - floor <= separation * sqrt(se**2 + floor_se**2)``."""
    value, floor = _check_finite("value", value), _check_finite("floor", floor)
    se, floor_se = _check_finite("se", se, 0.0), _check_finite("floor_se", floor_se, 0.0)
    return value - floor <= separation * math.hypot(se, floor_se)


# A marginal KL "near zero" (the thesis's MDR finding, read off slide 35's plot to about 0.3 nats):
# not resolved above the calibration floor plus this many nats. Pages 04 and 09 use it.
NEAR_ZERO_KL = 0.5


def near_zero_kl(value: float, se: float, floor: float, floor_se: float, margin: float = NEAR_ZERO_KL,
                 separation: float = SEPARATION) -> bool:
    """Whether a marginal-KL estimate is near zero: :func:`at_floor` against ``floor + margin``
    (not resolved above the calibration floor plus ``margin`` nats, by the 2-se rule)."""
    if not margin >= 0:
        raise ValueError(f"margin={margin!r} must be >= 0 (nats)")
    return at_floor(value, se, floor + margin, floor_se, separation)


def compare_marginal_kl(a: float, b: float, se_a: float, se_b: float, *, a_at_floor: bool = False,
                        b_at_floor: bool = False, a_at_limit: bool = False, b_at_limit: bool = False,
                        separation: float = SEPARATION) -> str:
    """Order two marginal-KL estimates, or say why they cannot be ordered.

    Rule, in this order: either estimate at its estimator's limit (e.g. an aggregate-posterior
    estimate whose MI is at the log N ceiling) -> :data:`AT_LIMIT`; both at the calibration floor
    (:func:`at_floor`) -> :data:`AT_FLOOR`; ``abs(a - b) <= separation * sqrt(se_a**2 + se_b**2)``
    -> :data:`NOT_SEPARABLE`; else :data:`A_BELOW_B` or :data:`B_BELOW_A`.
    """
    a, b = _check_finite("a", a), _check_finite("b", b)
    se_a, se_b = _check_finite("se_a", se_a, 0.0), _check_finite("se_b", se_b, 0.0)
    if not separation >= 0:
        raise ValueError(f"separation={separation!r} must be >= 0 (standard errors)")
    if a_at_limit or b_at_limit:
        return AT_LIMIT
    if a_at_floor and b_at_floor:
        return AT_FLOOR
    if abs(a - b) <= separation * math.hypot(se_a, se_b):
        return NOT_SEPARABLE
    return A_BELOW_B if a < b else B_BELOW_A


@dataclass(frozen=True)
class PairedDifference:
    """The mean of per-sentence differences ``a_i - b_i`` over the same ``num_sentences`` sentences
    and its standard error ``std(a_i - b_i) / sqrt(n)`` (n - 1 in the variance)."""
    mean: float
    standard_error: float
    num_sentences: int

    def ordering(self, separation: float = SEPARATION) -> str:
        """:data:`NOT_SEPARABLE` when ``|mean| <= separation * standard_error``, else
        :data:`A_BELOW_B` (mean < 0) or :data:`B_BELOW_A`."""
        if not separation >= 0:
            raise ValueError(f"separation={separation!r} must be >= 0 (standard errors)")
        if abs(self.mean) <= separation * self.standard_error:
            return NOT_SEPARABLE
        return A_BELOW_B if self.mean < 0 else B_BELOW_A

    def within(self, margin: float, separation: float = SEPARATION) -> bool:
        """Whether the difference is shown to be small: ``|mean| + separation * standard_error <=
        margin`` (an equivalence test). Not separable from zero is not the same: a difference with a
        wide error is neither ordered nor shown small."""
        if not margin >= 0:
            raise ValueError(f"margin={margin!r} must be >= 0 (the difference's units)")
        if not separation >= 0:
            raise ValueError(f"separation={separation!r} must be >= 0 (standard errors)")
        return abs(self.mean) + separation * self.standard_error <= margin


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Mean and standard error of ``a_i - b_i``: two estimates on the same sentences, compared
    sentence by sentence.

    What most of the spread of a per-sentence log-likelihood is (a long sentence costs more nats
    than a short one under every model) is shared by both, and cancels in ``a_i - b_i``: the paired
    standard error is then far smaller than the two means' standard errors combined, which treat
    the two as independent samples. It covers the sentences' sampling and whatever per-sentence
    noise each estimate has (an IW bound's Monte Carlo error), nothing else.
    """
    a_values = _finite_values("a", a)
    b_values = _finite_values("b", b)
    if len(a_values) != len(b_values):
        raise ValueError(f"a has {len(a_values)} values, b {len(b_values)}: a paired difference needs one "
                         "value per sentence in each, on the same sentences")
    if len(a_values) < 2:
        raise ValueError(f"a and b have {len(a_values)} value(s): a standard error needs at least 2")
    diff = np.asarray(a_values) - np.asarray(b_values)
    return PairedDifference(mean=float(diff.mean()), standard_error=float(diff.std(ddof=1) / math.sqrt(len(diff))),
                            num_sentences=len(diff))


def _finite_values(name: str, values: Sequence[float]) -> list[float]:
    """``values`` as finite floats (ValueError naming ``name`` and the first bad index)."""
    out = [float(v) for v in values]
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}]={v!r} must be finite")
    return out


def monotone_in_steps(steps: Sequence[PairedDifference], separation: float = SEPARATION) -> str:
    """'rising', 'falling' or 'not monotone' from the paired differences between neighbouring
    targets, each the later target's run minus the earlier's (e.g. ``elbo_difference(run at
    r_(i+1), run at r_i)``): :func:`monotone_in_target`'s rule with each step's paired standard error
    (:meth:`PairedDifference.ordering`) in place of the two values' combined errors."""
    steps = list(steps)
    if len(steps) < 1 or not all(isinstance(step, PairedDifference) for step in steps):
        raise ValueError(f"steps={steps!r}: accepted values: one or more PairedDifference")
    orderings = [step.ordering(separation) for step in steps]
    if all(o == B_BELOW_A for o in orderings):
        return "rising"
    if all(o == A_BELOW_B for o in orderings):
        return "falling"
    return "not monotone"


def iw_difference(a, b) -> PairedDifference:
    """Run ``a``'s importance-weighted bound minus run ``b``'s, sentence by sentence
    (:func:`paired_difference`), from two :class:`~tvae_core.evaluation.RunEvaluation`.

    Positive: ``a`` assigns the sentences more likelihood (by a lower bound on it with K samples
    each; a looser bound in one run reads as less likelihood). The two must have evaluated the
    same sentences, tokenised the same way, on as many of them (:func:`_check_paired`).
    """
    _check_paired(a, b, "iw_log_likelihood_per_sentence", "iw_num_sentences")
    return paired_difference(a.iw_log_likelihood_per_sentence, b.iw_log_likelihood_per_sentence)


def elbo_difference(a, b) -> PairedDifference:
    """Run ``a``'s ELBO minus run ``b``'s on every sentence of the split, sentence by sentence
    (:func:`paired_difference`); each sentence's ELBO is a one-sample estimate, and that sample's
    noise is in the standard error. Same sentences required, as in :func:`iw_difference`."""
    _check_paired(a, b, "elbo_per_sentence", "num_sentences")
    return paired_difference(a.elbo_per_sentence, b.elbo_per_sentence)


def _check_paired(a, b, values: str, count: str) -> None:
    """Both evaluations carry per-sentence ``values`` of the same split (equal ``sentences_sha256``:
    the same token ids, so a run with another vocabulary is refused) on equally many sentences."""
    for name, ev in (("a", a), ("b", b)):
        if not hasattr(ev, values) or not hasattr(ev, "sentences_sha256"):
            raise TypeError(f"{name}={type(ev).__name__}: accepted values: a RunEvaluation (with per-sentence "
                            f"{values})")
    label_a, label_b = getattr(a, "label", "a"), getattr(b, "label", "b")
    if a.sentences_sha256 != b.sentences_sha256:
        raise ValueError(f"a ({label_a}) and b ({label_b}) were evaluated on different sentences or "
                         "tokenisations: no paired difference")
    if getattr(a, count) != getattr(b, count):
        raise ValueError(f"a ({label_a}) has {count}={getattr(a, count)}, b ({label_b}) {getattr(b, count)}: "
                         "evaluated with other estimator sizes, no paired difference")


def marginal_kl_floor(marginal_kl: float, mutual_information: float, mi_ceiling: float) -> float:
    """The floor R^ - log N of a self-term marginal-KL estimate, from that pass's own estimates.

    On the samples of one pass, MI + KL = R^, their Monte Carlo rate (not the split's analytic rate,
    which differs by Monte Carlo noise), so the floor is ``marginal_kl + mutual_information -
    mi_ceiling``: the KL lies as far above its floor as the MI lies below its ceiling log N, and the
    KL is at its floor exactly when the MI is at its ceiling. For an evaluation that stores the
    estimates but not the floor (:class:`tvae_core.evaluation.RunEvaluation`).
    """
    return (_check_finite("marginal_kl", marginal_kl) + _check_finite("mutual_information", mutual_information)
            - _check_finite("mi_ceiling", mi_ceiling))


MOSTLY_MARGINAL_KL = "marginal KL"
MOSTLY_INDEX_CODE_MI = "index-code MI"
NEITHER_RESOLVED = "unresolved"


def larger_part_of_rate(marginal_kl: float, se: float, rate: float, separation: float = SEPARATION) -> str:
    """Which term of the rate's split R = I_q + KL(q(z) || p(z)) takes most of it.

    With the index-code MI taken as R - KL (so it carries the marginal KL's standard error ``se``),
    KL - I_q = 2 KL - R has standard error 2 se, and the rule is the book's 2-se one on that
    difference: ``KL - separation * se > R / 2`` -> :data:`MOSTLY_MARGINAL_KL` (the rate moves q(z)
    away from the prior rather than carrying information about x); ``KL + separation * se < R / 2``
    -> :data:`MOSTLY_INDEX_CODE_MI`; else :data:`NEITHER_RESOLVED`. ``rate`` is the rate of the
    sentences the marginal KL was estimated on.
    """
    marginal_kl, rate = _check_finite("marginal_kl", marginal_kl), _check_finite("rate", rate, 0.0)
    se = _check_finite("se", se, 0.0)
    if not separation >= 0:
        raise ValueError(f"separation={separation!r} must be >= 0 (standard errors)")
    half = 0.5 * rate
    if marginal_kl - separation * se > half:
        return MOSTLY_MARGINAL_KL
    if marginal_kl + separation * se < half:
        return MOSTLY_INDEX_CODE_MI
    return NEITHER_RESOLVED


def larger_part_of_rate_bracketed(marginal_kl_lower: float, marginal_kl_upper: float, rate: float) -> str:
    """:func:`larger_part_of_rate` from the aggregate posterior's two estimates instead of one with
    a standard error: the leave-one-out marginal KL (biased down) and the self-term one (biased up),
    which bracket the truth in expectation. Even the lower one above ``rate / 2`` ->
    :data:`MOSTLY_MARGINAL_KL`; even the upper one below it -> :data:`MOSTLY_INDEX_CODE_MI`; else
    :data:`NEITHER_RESOLVED`. ``rate`` is the Monte Carlo rate of the same samples (the estimates'
    MI + KL). The leave-one-out estimate is the lower one in expectation; on one sample the two can
    cross where they nearly agree (a collapsed code), so the bracket is taken as their min and max."""
    lower = _check_finite("marginal_kl_lower", marginal_kl_lower)
    upper = _check_finite("marginal_kl_upper", marginal_kl_upper)
    rate = _check_finite("rate", rate, 0.0)
    lower, upper = min(lower, upper), max(lower, upper)
    if lower > 0.5 * rate:
        return MOSTLY_MARGINAL_KL
    if upper < 0.5 * rate:
        return MOSTLY_INDEX_CODE_MI
    return NEITHER_RESOLVED


def verdict_from_checks(checks: Sequence[bool] | Mapping[str, bool]) -> str:
    """Join the tests of one finding (e.g. one per target rate): :data:`REPRODUCES` if all hold,
    :data:`DOES_NOT_REPRODUCE` if none does, else :data:`PARTLY`. No checks: :data:`NOT_TESTED`."""
    results = list(checks.values()) if isinstance(checks, Mapping) else list(checks)
    if not all(type(r).__name__ in ("bool", "bool_") for r in results):   # numpy's bool too
        raise ValueError(f"checks={checks!r} must be booleans")
    if not results:
        return NOT_TESTED
    if all(results):
        return REPRODUCES
    return DOES_NOT_REPRODUCE if not any(results) else PARTLY


# --- series and tables -------------------------------------------------------------------------
def smooth(values: Sequence[float], window: int, trailing: bool = False) -> np.ndarray:
    """Moving average over ``window`` steps: centred (for drawing a curve), or ``trailing``, the
    mean of the step and the ``window - 1`` before it (what was known at that step: for timing an
    event, which a centred window would see before it happens). The edges average what is there
    (no shrinking towards zero). ``window <= 1`` returns the values unchanged."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size == 0:
        return values
    window = min(int(window), values.size)
    if trailing:
        sums = np.cumsum(values)
        sums[window:] = sums[window:] - sums[:-window]
        return sums / np.minimum(np.arange(1, values.size + 1), window)
    kernel = np.ones(window)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (the Pearson correlation of their ranks;
    ties ranked in order of appearance): +1 when y rises with x, -1 when it falls. NaN for fewer
    than two pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got shapes {x.shape} and {y.shape}")
    if x.size < 2:
        return float("nan")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    rx, ry = np.argsort(np.argsort(x, kind="stable")), np.argsort(np.argsort(y, kind="stable"))
    return float(np.corrcoef(rx, ry)[0, 1])


def run_table(runs: Mapping[str, object], evaluations: Mapping[str, object]):
    """One row per run label: its method (from the run's config, :func:`tvae_core.methods.method_of`,
    never parsed from the label), free-bits variant, target rate, and the held-out evaluation
    (:class:`tvae_core.evaluation.RunEvaluation`): rate, distortion, ELBO, IW log-likelihood and its
    standard error, the ELBO on the IW sentences, IW perplexity, active units, aggregate MI with its
    ceiling and whether it sits there, marginal KL, and the final MDR multiplier (NaN elsewhere)."""
    import pandas as pd

    from .methods import method_of

    missing = [label for label in runs if label not in evaluations]
    if missing:
        raise ValueError(f"runs without an evaluation: {missing}")
    rows = {}
    for label, run in runs.items():
        ev, objective = evaluations[label], run.config.objective
        method = method_of(run)
        rows[label] = {
            "method": method.label,
            "variant": objective.free_bits_variant if "free_bits_variant" in method.reads else "",
            "target_rate": float("nan") if objective.target_rate is None else float(objective.target_rate),
            "rate": ev.rate, "distortion": ev.distortion, "elbo": ev.elbo,
            "iw_log_likelihood": ev.iw_log_likelihood, "iw_se": ev.iw_log_likelihood_se,
            "elbo_on_iw_sentences": ev.elbo_on_iw_sentences, "iw_perplexity": ev.iw_perplexity,
            "active_units": ev.active_units, "mutual_information": ev.mutual_information,
            "mi_ceiling": ev.mutual_information_ceiling, "mi_at_ceiling": bool(ev.mutual_information_at_ceiling),
            "marginal_kl": ev.marginal_kl,
            "final_lambda": float(run.metrics.get("mdr_lambda", float("nan"))),
        }
    table = pd.DataFrame(rows).T
    numeric = [c for c in table.columns if c not in ("method", "variant", "mi_at_ceiling")]
    table[numeric] = table[numeric].astype(float)
    table["mi_at_ceiling"] = table["mi_at_ceiling"].astype(bool)
    return table


# --- a Lagrange multiplier over training --------------------------------------------------------
# a multiplier that never moves farther than this from its initial value lambda_0 has left the
# rate's weight 1 - lambda within 0.1 of 1 - lambda_0 (about a tenth of the scale of beta)
MULTIPLIER_MOVED = 0.1

@dataclass(frozen=True)
class MultiplierSummary:
    """How an MDR run's multiplier and rate behaved over training (see :func:`multiplier_summary`)."""

    def largest_move(self, lambda_0: float) -> float:
        """The farthest lambda_t went from its initial value ``lambda_0`` (in the rate's weight
        1 - lambda, the same distance): near 0, the multiplier is a fixed beta in all but name."""
        return max(abs(self.max_lambda - lambda_0), abs(self.min_lambda - lambda_0))

    def barely_moved(self, lambda_0: float, threshold: float = MULTIPLIER_MOVED) -> bool:
        """Whether lambda_t stayed within ``threshold`` of ``lambda_0`` all run (:meth:`largest_move`):
        then the rate's weight 1 - lambda_t stayed near 1 - lambda_0, a beta-VAE with a fixed beta
        in all but name, and the target is not what set the rate."""
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold!r} must be >= 0 (a distance in lambda)")
        return self.largest_move(lambda_0) < threshold

    min_lambda: float
    max_lambda: float
    final_lambda: float
    crossings_of_one: int        # sign changes of lambda_t - 1 (rate weight 1 - lambda_t changing sign)
    last_quarter_min: float      # smoothed minibatch rate over the last quarter of training (nats)
    last_quarter_max: float
    settled: bool


def multiplier_summary(train_rows: Sequence[Mapping[str, float]], target: float, window: int,
                       band: float) -> MultiplierSummary:
    """Summarise an MDR run's training history (rows with ``rate`` and ``mdr_lambda`` per step).

    The run has *settled* when its minibatch rate, smoothed over ``window`` steps (:func:`smooth`),
    stays within ``(1 +- band) * target`` over the last quarter of training: a damped multiplier
    reaches that; an undamped one in a limit cycle swings the rate far outside it, and then
    ``crossings_of_one`` (how often lambda_t crosses 1, where the rate's weight changes sign) counts
    the swings.
    """
    if not target > 0:
        raise ValueError(f"target={target!r} must be a rate > 0 (nats)")
    if not band >= 0:
        raise ValueError(f"band={band!r} must be >= 0 (relative)")
    if len(train_rows) < 4:
        raise ValueError(f"train_rows has {len(train_rows)} steps; at least 4 are needed for a last quarter")
    try:
        lam = np.array([r["mdr_lambda"] for r in train_rows], dtype=float)
        rates = np.array([r["rate"] for r in train_rows], dtype=float)
    except KeyError as missing:
        raise ValueError(f"every training row needs 'rate' and 'mdr_lambda'; one lacks {missing}") from None
    smoothed = smooth(rates, window)
    last_quarter = smoothed[3 * len(smoothed) // 4:]
    return MultiplierSummary(
        min_lambda=float(lam.min()), max_lambda=float(lam.max()), final_lambda=float(lam[-1]),
        crossings_of_one=int(np.sum(np.diff(np.sign(lam - 1.0)) != 0)),
        last_quarter_min=float(last_quarter.min()), last_quarter_max=float(last_quarter.max()),
        settled=bool(np.all(np.abs(last_quarter - target) <= band * target)))


# --- which MDR multiplier gives the thesis's near-zero marginal KL --------------------------------
THESIS_RUN_OFF_TARGET = "thesis run off target"   # it cannot speak to the thesis's on-target MDR runs
ONLY_THESIS_MULTIPLIER = "only the thesis multiplier"
BOTH_MULTIPLIERS = "both multipliers"
ONLY_BOOK_MULTIPLIER = "only the book's multiplier"
NEITHER_MULTIPLIER = "neither multiplier"


def near_zero_by_multiplier(thesis_on_target: bool, thesis_near_zero: bool, book_near_zero: bool) -> str:
    """Whether MDR's near-zero marginal KL (the thesis's finding) follows the thesis code's multiplier
    or the method, from two MDR runs at one target: one with the thesis code's multiplier, one with
    the book's (damped) multiplier, each with its marginal KL judged near zero or not.

    Rule: the thesis-multiplier run off its target -> :data:`THESIS_RUN_OFF_TARGET` (the thesis's
    MDR runs were on target, so only an on-target run speaks to them); else
    :data:`ONLY_THESIS_MULTIPLIER` (the finding follows the multiplier), :data:`BOTH_MULTIPLIERS`
    (the method), :data:`ONLY_BOOK_MULTIPLIER` or :data:`NEITHER_MULTIPLIER` by the two flags.
    """
    flags = {"thesis_on_target": thesis_on_target, "thesis_near_zero": thesis_near_zero,
             "book_near_zero": book_near_zero}
    for name, flag in flags.items():
        if type(flag).__name__ not in ("bool", "bool_"):   # numpy's bool too
            raise ValueError(f"{name}={flag!r} must be a boolean")
    if not thesis_on_target:
        return THESIS_RUN_OFF_TARGET
    if thesis_near_zero:
        return BOTH_MULTIPLIERS if book_near_zero else ONLY_THESIS_MULTIPLIER
    return ONLY_BOOK_MULTIPLIER if book_near_zero else NEITHER_MULTIPLIER


# --- posterior collapse over training ---------------------------------------------------------
def sentences_until_collapse(rates: Sequence[float], threshold: float, batch_size: int,
                             window: int = 1) -> int | None:
    """Training sentences seen before a run's minibatch rate (``rates``, one per step, averaged
    over the ``window`` steps up to each step: :func:`smooth` with ``trailing=True``, so the time
    is when the fall could be seen, never earlier) falls below ``threshold`` for good.

    Returns 0 when the averaged rate is below the threshold from the first step on (the run starts
    below it: there is no collapse to time) and None when it is still at or above the threshold
    at the last step (no collapse within the run); otherwise (steps up to and including the last
    one above the threshold, plus one) x ``batch_size``.
    """
    if not batch_size >= 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    smoothed = smooth(rates, window, trailing=True)
    if smoothed.size == 0:
        raise ValueError("rates is empty")
    above = np.flatnonzero(smoothed >= threshold)
    if above.size == 0:
        return 0
    step = int(above[-1]) + 1
    return None if step >= smoothed.size else (step + 1) * batch_size


def collapse_phrase(what: str, sentences: int | None, first_rate: float, seen: int) -> str:
    """:func:`sentences_until_collapse`'s answer in words, for ``what`` (e.g. "the small decoder")."""
    if sentences is None:
        return f"{what} does not collapse within its {seen:,} training sentences"
    if sentences == 0:
        return (f"{what}'s rate is below the threshold from its first step on ({first_rate:.2f} nats "
                "there, where only the initialisation has set it): it starts below the threshold, so "
                "there is no collapse to time")
    return f"{what} collapses after {sentences:,} training sentences"
