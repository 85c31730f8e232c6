"""The training-budget study (issue 18): what each run of :func:`tvae_core.experiments.budget_study`
measures, and the table of them.

Per run: the cached test-split evaluation (:func:`tvae_core.evaluation.evaluate_run`), the
aggregate-posterior index-code MI and marginal KL on the whole *training* split (log N = 10.6 for
PTB, where the test split's ceiling is log 3761 = 8.2), active units, and the greedy
reconstruction token accuracy from the posterior mean and, as the baseline that ignores x, from
z = 0 (the prior mean). An estimate at its ceiling (MI) or floor (marginal KL) is flagged in the
table, never reported as the value.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import asdict, dataclass

import torch

from .data import iterate_batches
from .device import module_device, move_batch
from .latent_space import token_accuracy
from .training_split import limited_value, training_split_aggregate


@dataclass(frozen=True)
class ReconstructionAccuracy:
    """Greedy reconstruction of held-out sentences, compared position by position."""
    token_accuracy: float        # matching tokens / target tokens (w_1..w_n [EOS]), micro-averaged
    sentence_accuracy: float     # sentences reproduced exactly, [EOS] included
    num_sentences: int
    num_tokens: int


@torch.no_grad()
def reconstruction_accuracy(model, sequences: list[list[int]], pad_id: int, *, from_prior_mean: bool = False,
                            batch_size: int = 64) -> ReconstructionAccuracy:
    """Encode each ``[BOS] w_1..w_n [EOS]`` sequence, decode z = E_q[z|x] greedily (or z = 0 with
    ``from_prior_mean``: what the decoder writes without information about x) and count the
    positions i where the generated token equals w_i (the target being w_1..w_n [EOS]).

    A generated sentence shorter than the target counts its missing positions as wrong; longer,
    its extra tokens are ignored (they cost nothing in token accuracy, only in the sentence one).
    """
    if not sequences:
        raise ValueError("sequences is empty")
    device = module_device(model)
    correct = total = exact = 0
    for batch in iterate_batches(sequences, batch_size, pad_id, shuffle=False, bucket=False):
        batch = move_batch(batch, device)
        z = model.encode(batch).loc                                               # [B, D]
        if from_prior_mean:
            z = torch.zeros_like(z)
        mask = batch["attention_mask"].bool()
        targets = [row[m][1:].tolist() for row, m in zip(batch["input_ids"], mask)]   # drop [BOS]
        generated = model.generate(z, max_new_tokens=max(len(t) for t in targets), greedy=True)
        for target, output in zip(targets, generated):
            correct += round(token_accuracy(target, output) * len(target))  # matching positions
            total += len(target)
            exact += int(output == target)
    return ReconstructionAccuracy(token_accuracy=correct / total, sentence_accuracy=exact / len(sequences),
                                  num_sentences=len(sequences), num_tokens=total)


def budget_measures(run, profile, *, recon_sentences: int = 200, seed: int = 0, progress: bool = False) -> dict:
    """Everything the budget table shows for one finished run (a JSON-able dict). The method,
    target and budget come from the run's config, never from its label."""
    from .build import training_corpus
    from .evaluation import evaluate_run
    from .profiles import get_profile

    cfg = run.config
    p = get_profile(profile) if isinstance(profile, str) else profile
    ev = evaluate_run(run, p.estimators, progress=progress)
    started = time.time()
    corpus = training_corpus(cfg)
    model = run.model.eval()
    # the cached training-split estimates notebook 03 shows too: one N x N pass per run for both
    split = training_split_aggregate(run, seed=seed, progress=progress)
    test_seqs = corpus.token_ids("test")[:recon_sentences]
    recon = reconstruction_accuracy(model, test_seqs, run.vocab.pad_id)
    recon_prior = reconstruction_accuracy(model, test_seqs, run.vocab.pad_id, from_prior_mean=True)
    return {
        "label": cfg.label, "objective": cfg.objective.name, "target_rate": cfg.objective.target_rate,
        "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "run_key": cfg.key,
        "train_seconds": run.meta.get("train_seconds_this_process"),
        "seconds_per_step": (run.meta.get("timing") or {}).get("seconds_per_step"),
        "test": {k: v for k, v in ev.as_dict().items() if k != "kl_per_dimension"},
        "train_split": {
            "num_points": split.num_sentences, "rate": split.rate,
            "mutual_information": split.mutual_information,
            "mutual_information_ceiling": split.mutual_information_ceiling,
            "mutual_information_at_ceiling": split.mutual_information_at_ceiling,
            "mutual_information_loo": split.mutual_information_loo,
            "marginal_kl": split.marginal_kl, "marginal_kl_floor": split.marginal_kl_floor,
            "marginal_kl_at_floor": split.marginal_kl_at_floor,
            "marginal_kl_loo": split.marginal_kl_loo, "active_units": split.active_units,
        },
        "reconstruction": asdict(recon), "reconstruction_from_prior_mean": asdict(recon_prior),
        "seconds": time.time() - started,
    }


def _method(row: dict) -> str:
    names = {"vae": "VAE", "ae": "AE", "fb": "FB", "mdr": "MDR"}
    name = names.get(row["objective"], row["objective"])
    return name if row["target_rate"] is None else f"{name} {row['target_rate']:g}"


def budget_table(rows: list[dict]) -> str:
    """A markdown table, one row per method x budget (ordered by method, then budget).

    MI with the self term is a lower estimate capped at log N; marginal KL with the self term an
    upper estimate with floor rate - log N; each shown as a bound when within 0.1 nat of its limit.
    """
    order = {("vae", None): 0, ("ae", None): 1}
    def key(row):
        return (order.get((row["objective"], row["target_rate"]), 2), row["objective"],
                row["target_rate"] or 0.0, row["steps"])
    header = ("| method | steps | rate | distortion | ELBO | IW LL (K, n) | MI test | MI train | "
              "marginal KL test | marginal KL train [LOO] | AU | recon acc z=mean / z=0 | train s (s/step) |")
    lines = [header, "|" + "|".join(["---"] + ["---:"] * 12) + "|"]
    for row in sorted(rows, key=key):
        t, tr = row["test"], row["train_split"]
        mi_test = limited_value(t["mutual_information"], t["mutual_information_ceiling"], t["mutual_information_at_ceiling"], ">=")
        # the same samples give MI + marginal KL = rate, so the KL is at its floor exactly when the
        # MI is at its ceiling (the test evaluation stores the one flag)
        kl_test = limited_value(t["marginal_kl"], t["marginal_kl"], t["mutual_information_at_ceiling"], "<=")
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
            f"{row['reconstruction']['token_accuracy']:.3f} / {row['reconstruction_from_prior_mean']['token_accuracy']:.3f} | "
            f"{seconds} |")
    return "\n".join(lines) + "\n"


def budget_mmm(runs: dict, profile, *, seed: int = 0, family: str = "RD", progress: bool = False) -> dict:
    """The mixed membership model (notebook 04's recipe) on the runs of one budget: one group of
    z ~ q(z|x) per run (``samples_per_group`` test sentences at random), a prior group and a
    second prior group (the calibration: what the estimator reports for marginal KL 0), built by
    :func:`tvae_core.mmm.latent_sample_groups`.

    ``runs``: label -> finished run. Returns ``{"floor": (kl, se), "groups": {label: {...}}}``
    with each group's rate (of its sampled sentences), marginal KL, its standard error and the
    index-code MI R - KL, all in nats.
    """
    from .evaluation import posterior_parameters
    from .mmm import CALIBRATION, MixedMembershipConfig, fit_mixed_membership, latent_sample_groups
    from .profiles import get_profile

    p = get_profile(profile) if isinstance(profile, str) else profile
    posteriors = {label: posterior_parameters(run, p.estimators, seed=seed) for label, run in runs.items()}
    samples, rates = latent_sample_groups(posteriors, p.mmm.samples_per_group, seed)
    n = len(samples[CALIBRATION])
    config = MixedMembershipConfig.from_profile(p.mmm, family=family, seed=seed)
    fit = fit_mixed_membership(samples, config, rates=rates, calibration_group=CALIBRATION, progress=progress)
    groups = {}
    for label in runs:
        g = fit.index(label)
        groups[label] = {"rate": rates[label], "marginal_kl": float(fit.marginal_kl[g]),
                         "marginal_kl_se": float(fit.marginal_kl_se[g]),
                         "index_code_mi": float(fit.index_code_mi[g])}
    return {"family": family, "floor": fit.calibration_floor(), "groups": groups,
            "samples_per_group": n, "fit_seconds": fit.fit_seconds}


# --------------------------------------------------------------------------------------------
# The cached row of one run
# --------------------------------------------------------------------------------------------
# Bump when budget_measures changes what it measures or stores: every stored row is then
# recomputed (the key changes; the evaluation code is in the key already).
MEASURES_VERSION = 2


def budget_row_key(run_key: str, profile, *, seed: int = 0, recon_sentences: int = 200) -> str:
    """Cache key of a run's budget row: the run, the estimator sizes, the seed, the number of
    reconstructed sentences, :data:`MEASURES_VERSION`, the evaluation and training-split code and
    this module."""
    import hashlib

    from .cache import canonical_json
    from .cache import source_fingerprint
    from .evaluation import evaluation_code_version
    from .profiles import get_profile
    from .training_split import training_split_code_version

    p = get_profile(profile) if isinstance(profile, str) else profile
    payload = {"run": run_key, "size": asdict(p.estimators), "seed": seed, "recon_sentences": recon_sentences,
               "version": MEASURES_VERSION,
               "code": [evaluation_code_version(), training_split_code_version(), source_fingerprint([Path(__file__)])]}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def budget_row_path(run_dir, run_key: str, profile, *, seed: int = 0, recon_sentences: int = 200):
    """Where a run's budget row lives: next to the run, ``budget-row-<key>.json``."""
    from pathlib import Path

    key = budget_row_key(run_key, profile, seed=seed, recon_sentences=recon_sentences)
    return Path(run_dir) / f"budget-row-{key}.json"


def load_budget_row(run_dir, run_key: str, profile, *, seed: int = 0, recon_sentences: int = 200) -> dict | None:
    """The stored row of a run (None when missing or damaged; a damaged one is set aside), without
    loading the model: the script's table reads the rows of runs it did not load."""
    from .cache import DamagedCacheError, read_checked_json, set_aside

    path = budget_row_path(run_dir, run_key, profile, seed=seed, recon_sentences=recon_sentences)
    if not path.is_file():
        return None
    try:
        row = read_checked_json(path, path.stem.removeprefix("budget-row-"))
    except DamagedCacheError as err:  # one warning naming the file; the caller recomputes
        set_aside(path, str(err))
        return None
    return row if row.get("run_key") == run_key else None


def cached_budget_measures(run, profile, *, seed: int = 0, recon_sentences: int = 200,
                           progress: bool = False) -> dict:
    """:func:`budget_measures` of a finished run, stored next to it with its key and checksum
    (published atomically, :func:`tvae_core.cache.write_checked_json`): a second call reads the
    row; a damaged row is set aside with a warning and measured again."""
    from .cache import write_checked_json

    args = dict(seed=seed, recon_sentences=recon_sentences)
    row = load_budget_row(run.path, run.config.key, profile, **args)
    if row is not None:
        return row
    row = budget_measures(run, profile, progress=progress, **args)
    path = budget_row_path(run.path, run.config.key, profile, **args)
    write_checked_json(path, row, path.stem.removeprefix("budget-row-"))
    return row


def runs_at_budget(runs: dict, steps: int) -> dict:
    """The runs (label -> run) trained for ``steps`` optimiser steps, by their config."""
    return {label: run for label, run in runs.items() if run.config.train.max_steps == steps}


def budget_mmm_by_steps(runs: dict, profile, *, seed: int = 0, family: str = "RD",
                        progress: bool = False) -> dict[int, dict]:
    """:func:`budget_mmm` once per budget, on the study's runs of that budget (steps -> result,
    each with the ``run_keys`` it was fitted on)."""
    results = {}
    for steps in sorted({run.config.train.max_steps for run in runs.values()}):
        chosen = runs_at_budget(runs, steps)
        result = budget_mmm(chosen, profile, seed=seed, family=family, progress=progress)
        result["run_keys"] = {label: run.config.key for label, run in chosen.items()}
        results[steps] = result
    return results


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
    (:func:`budget_measures`) and the per-budget MMM fits (steps -> :func:`budget_mmm`, with the
    ``run_keys`` of :func:`budget_mmm_by_steps`: a row finds its MMM group by its ``run_key``).

    ``collapse_rate``: the VAE counts as collapsed below this test rate (nats). ``tolerance``:
    relative, the book's one on-target tolerance by default
    (:data:`tvae_core.analysis.ON_TARGET_TOLERANCE`). A comparison whose estimate sits at its
    ceiling or floor is "at ceiling" / "at floor", never compared; the MMM's marginal KLs count
    as ordered only when they differ by more than twice the standard error of the difference.
    """
    from .analysis import ON_TARGET_TOLERANCE, on_target, relative_deviation

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
        return yes(all(r["reconstruction"]["token_accuracy"] > r["reconstruction_from_prior_mean"]["token_accuracy"]
                       for r in chosen))

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
    table.append(Phenomenon("recon_above_baseline", "reconstruction accuracy above the z = 0 baseline "
                            "(every run but the VAE)", per_budget(recon_above_baseline)))
    return table
