"""The vocabulary the pages share when they judge a thesis finding: one on-target tolerance, so
every page calls the same runs "on target", and small rules that turn measured values into a
verdict (a rate pattern, a trend over targets, an ordering of two marginal KLs). Each rule refuses
to compare a value at its estimator's limit (a ceiling such as log N, or a calibration floor) and
says so instead.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
NOT_SEPARABLE = "not separable (within 2 se)"
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
    never at an estimator limit). R is on target when |R - r| <= tolerance * r (:func:`on_target`),
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


def compare_marginal_kl(a: float, b: float, se_a: float, se_b: float, *, a_at_floor: bool = False,
                        b_at_floor: bool = False, a_at_limit: bool = False, b_at_limit: bool = False,
                        separation: float = SEPARATION) -> str:
    """Order two marginal-KL estimates, or say why they cannot be ordered.

    Rule, in this order: either estimate at its estimator's limit (e.g. an aggregate-posterior
    estimate whose MI is at the log N ceiling) -> :data:`AT_LIMIT`; both at the calibration floor
    (:func:`at_floor`) -> :data:`AT_FLOOR`; |a - b| <= ``separation`` * sqrt(se_a**2 + se_b**2)
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
