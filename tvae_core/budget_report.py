"""What notebook 07 and ``benchmarks/budget_study.py`` make of the training-budget study's rows
(:func:`tvae_core.budget.budget_measures`): the table of them, and which of the thesis's phenomena
hold at which budget.

Kept apart from :mod:`tvae_core.budget`, whose source is in each stored row's cache key: a change
to how the rows are shown or judged never sends the runs to be measured again.
"""
from __future__ import annotations

from dataclasses import dataclass

from .analysis import B_BELOW_A, ON_TARGET_TOLERANCE, marginal_kl_floor, on_target, relative_deviation
from .budget import ReconstructionAccuracy
from .training_split import limited_value


def _method(row: dict) -> str:
    names = {"vae": "VAE", "ae": "AE", "fb": "FB", "mdr": "MDR"}
    name = names.get(row["objective"], row["objective"])
    return name if row["target_rate"] is None else f"{name} {row['target_rate']:g}"


def budget_table(rows: list[dict]) -> str:
    """A markdown table, one row per method x budget (ordered by method, then budget).

    MI with the self term is a lower estimate capped at log N; marginal KL with the self term an
    upper estimate with floor R^ - log N, R^ the rate of the estimator's own samples (on the test
    split within Monte Carlo noise of the table's rate; on the training split the training
    sentences' rate, not shown); each shown as a bound when within 0.1 nat of its limit.
    """
    order = {("vae", None): 0, ("ae", None): 1}
    def key(row):
        return (order.get((row["objective"], row["target_rate"]), 2), row["objective"],
                row["target_rate"] or 0.0, row["steps"])
    header = ("| method | steps | rate | distortion | ELBO | IW LL (K, n) | MI test | MI train | "
              "marginal KL test | marginal KL train [LOO] | AU | recon acc z=mean / other x / z=0 | train s (s/step) |")
    lines = [header, "|" + "|".join(["---"] + ["---:"] * 12) + "|"]
    for row in sorted(rows, key=key):
        t, tr = row["test"], row["train_split"]
        mi_test = limited_value(t["mutual_information"], t["mutual_information_ceiling"], t["mutual_information_at_ceiling"], ">=")
        # the KL is at its floor exactly when the MI is at its ceiling (the evaluation stores the one flag)
        kl_floor = marginal_kl_floor(t["marginal_kl"], t["mutual_information"], t["mutual_information_ceiling"])
        kl_test = limited_value(t["marginal_kl"], kl_floor, t["mutual_information_at_ceiling"], "<=")
        mi_train = limited_value(tr["mutual_information"], tr["mutual_information_ceiling"],
                                 tr["mutual_information_at_ceiling"], ">=")
        kl_train = limited_value(tr["marginal_kl"], tr["marginal_kl_floor"], tr["marginal_kl_at_floor"], "<=")
        if "marginal_kl_loo" in tr:  # the leave-one-out estimate is biased down: with the above, a bracket
            kl_train += f" [{tr['marginal_kl_loo']:.2f}]"
        sps = row.get("seconds_per_step")
        seconds = f"{row['train_seconds']:.0f} ({sps:.3f})" if row.get("train_seconds") and sps else "-"
        lines.append(
            f"| {_method(row)} | {row['steps']} | {t['rate']:.2f} | {t['distortion']:.2f} | {t['elbo']:.2f} | "
            f"{t['iw_log_likelihood']:.2f} ({t['iw_num_samples']}, {t['iw_num_sentences']}) | {mi_test} | {mi_train} | "
            f"{kl_test} | {kl_train} | {t['active_units']} | "
            f"{row['reconstruction']['token_accuracy']:.3f} / "
            f"{row['reconstruction_from_other_sentence']['token_accuracy']:.3f} / "
            f"{row['reconstruction_from_prior_mean']['token_accuracy']:.3f} | "
            f"{seconds} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Which of the thesis's phenomena hold at which budget
# --------------------------------------------------------------------------------------------
YES, NO = "yes", "no"
NOT_TRAINED = "not trained"      # a run the comparison needs was not trained at this budget
AT_CEILING = "at ceiling"        # an MI estimate at log N: a lower bound, so no comparison
AT_FLOOR = "at floor"            # a marginal-KL estimate at rate - log N: an upper bound, ditto
WITHIN_2SE = "within 2 se"       # the MMM difference is smaller than twice its standard error
UNDECIDED = (NOT_TRAINED, AT_CEILING, AT_FLOOR)


@dataclass(frozen=True)
class Phenomenon:
    """One of the thesis's findings and whether it holds at each budget (steps -> verdict)."""
    key: str
    name: str
    verdicts: dict

    def holds_from(self) -> int | None:
        """The first budget where it holds and after which no budget says it does not (budgets
        where it cannot be decided do not count either way); None when there is none."""
        budgets = sorted(self.verdicts)
        for i, steps in enumerate(budgets):
            later = [self.verdicts[b] for b in budgets[i:]]
            if later[0] == YES and all(v == YES or v in UNDECIDED for v in later):
                return steps
        return None


def _targets(rows) -> tuple[float, float]:
    targets = sorted({float(r["target_rate"]) for r in rows if r["objective"] in ("fb", "mdr")})
    if len(targets) < 2:
        raise ValueError(f"the targeted runs have targets {targets}; the comparisons need two")
    return targets[0], targets[-1]


def phenomena_table(rows: list[dict], mmm: dict, *, collapse_rate: float = 0.5,
                    tolerance: float | None = None) -> list[Phenomenon]:
    """Whether each phenomenon of the study holds at each budget, from the runs' rows
    (:func:`tvae_core.budget.budget_measures`) and the per-budget MMM fits (steps ->
    :func:`tvae_core.budget.budget_mmm`, with the ``run_keys`` of
    :func:`tvae_core.budget.budget_mmm_by_steps`: a row finds its MMM group by its ``run_key``).

    ``collapse_rate``: the VAE counts as collapsed below this test rate (nats). ``tolerance``:
    relative, the book's one on-target tolerance by default
    (:data:`tvae_core.analysis.ON_TARGET_TOLERANCE`). A comparison whose estimate sits at its
    ceiling or floor is "at ceiling" / "at floor", never compared; the MMM's marginal KLs count
    as ordered only when they differ by more than twice the standard error of the difference.
    """
    tol = ON_TARGET_TOLERANCE if tolerance is None else tolerance
    by = {(r["objective"], None if r["target_rate"] is None else float(r["target_rate"]), int(r["steps"])): r
          for r in rows}
    budgets = sorted({int(r["steps"]) for r in rows})
    low, high = _targets(rows)

    def per_budget(judge):
        return {steps: judge(steps) for steps in budgets}

    def row(objective, target, steps):
        return by.get((objective, target, steps))

    def yes(flag: bool) -> str:
        return YES if flag else NO

    def collapsed(steps):
        r = row("vae", None, steps)
        return NOT_TRAINED if r is None else yes(r["test"]["rate"] < collapse_rate)

    def fb_below(target):
        def judge(steps):
            r = row("fb", target, steps)
            return NOT_TRAINED if r is None else yes(relative_deviation(r["test"]["rate"], target) < -tol)
        return judge

    def mdr_on(target):
        def judge(steps):
            r = row("mdr", target, steps)
            return NOT_TRAINED if r is None else yes(on_target(r["test"]["rate"], target, tol))
        return judge

    def elbo_worse(method):
        def judge(steps):
            a, b = row(method, low, steps), row(method, high, steps)
            return NOT_TRAINED if a is None or b is None else yes(b["test"]["elbo"] < a["test"]["elbo"])
        return judge

    def mi_grows(method):
        def judge(steps):
            a, b = row(method, low, steps), row(method, high, steps)
            if a is None or b is None:
                return NOT_TRAINED
            a, b = a["train_split"], b["train_split"]
            if a["mutual_information_at_ceiling"] or b["mutual_information_at_ceiling"]:
                return AT_CEILING
            return yes(b["mutual_information"] > a["mutual_information"])
        return judge

    def mmm_group(r, steps):
        # by run key, never by the row's label: a run shared with the grid (the study's run at the
        # book's budget) keeps the label it was first trained under
        fit = mmm.get(steps) or {}
        label = {key: name for name, key in fit.get("run_keys", {}).items()}.get(r["run_key"])
        return fit.get("groups", {}).get(label)

    def mdr_below_fb_mmm(target):
        def judge(steps):
            f, m = row("fb", target, steps), row("mdr", target, steps)
            f, m = (None, None) if f is None or m is None else (mmm_group(f, steps), mmm_group(m, steps))
            if f is None or m is None:
                return NOT_TRAINED
            difference = f["marginal_kl"] - m["marginal_kl"]
            se = (f["marginal_kl_se"] ** 2 + m["marginal_kl_se"] ** 2) ** 0.5
            return YES if difference > 2 * se else NO if difference < -2 * se else WITHIN_2SE
        return judge

    def mdr_below_fb_aggregate(target):
        def judge(steps):
            f, m = row("fb", target, steps), row("mdr", target, steps)
            if f is None or m is None:
                return NOT_TRAINED
            f, m = f["train_split"], m["train_split"]
            if f["marginal_kl_at_floor"] or m["marginal_kl_at_floor"]:
                return AT_FLOOR
            return yes(m["marginal_kl"] < f["marginal_kl"])
        return judge

    def recon_above_baseline(steps):
        chosen = [r for (objective, _, s), r in by.items() if s == steps and objective != "vae"]
        if not chosen:
            return NOT_TRAINED
        # against another sentence's code, not z = 0: a code offset from the prior beats z = 0 alone;
        # by more than two paired standard errors over the same sentences
        def gain(r):
            own, other = (ReconstructionAccuracy(**r[k]) for k in ("reconstruction", "reconstruction_from_other_sentence"))
            return own.gain_over(other)
        return yes(all(gain(r).ordering() == B_BELOW_A for r in chosen))

    lo, hi = f"{low:g}", f"{high:g}"
    table = [Phenomenon("vae_collapsed", f"VAE collapsed (test rate < {collapse_rate:g} nats)", per_budget(collapsed))]
    for target, name in ((low, lo), (high, hi)):
        table.append(Phenomenon(f"fb{name}_below_target", f"FB {name} below its target (by more than "
                                f"{tol:.0%})", per_budget(fb_below(target))))
    for target, name in ((low, lo), (high, hi)):
        table.append(Phenomenon(f"mdr{name}_on_target", f"MDR {name} on its target (within {tol:.0%})",
                                per_budget(mdr_on(target))))
    for method in ("fb", "mdr"):
        table.append(Phenomenon(f"{method}_elbo_worse", f"{method.upper()}: ELBO worse at target {hi} than {lo}",
                                per_budget(elbo_worse(method))))
    for method in ("fb", "mdr"):
        table.append(Phenomenon(f"{method}_mi_grows", f"{method.upper()}: index-code MI (training split) higher at "
                                f"target {hi} than {lo}", per_budget(mi_grows(method))))
    for target, name in ((low, lo), (high, hi)):
        table.append(Phenomenon(f"mdr_below_fb_mmm_{name}", f"marginal KL of MDR {name} below FB {name}'s (MMM)",
                                per_budget(mdr_below_fb_mmm(target))))
    for target, name in ((low, lo), (high, hi)):
        table.append(Phenomenon(f"mdr_below_fb_aggregate_{name}", f"marginal KL of MDR {name} below FB {name}'s "
                                "(aggregate, training split)", per_budget(mdr_below_fb_aggregate(target))))
    table.append(Phenomenon("recon_above_baseline", "reconstruction accuracy above decoding another sentence's "
                            "code by > 2 paired SE (every run but the VAE)", per_budget(recon_above_baseline)))
    return table
