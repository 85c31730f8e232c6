"""The training-budget study: what each run of :func:`tvae_core.experiments.budget_study`
measures (stored next to the run, keyed by this module's source), and the mixed membership fit
of each budget. The table and the verdicts drawn from the rows are :mod:`tvae_core.budget_report`.

Per run: the cached test-split evaluation (:func:`tvae_core.evaluation.evaluate_run`), the
aggregate-posterior index-code MI and marginal KL on the whole *training* split (log N = 10.6 for
PTB, where the test split's ceiling is log 3761 = 8.2), active units, and the greedy
reconstruction token accuracy from the posterior mean and, as baselines that carry nothing about x,
from z = 0 (the prior mean) and from another sentence's posterior mean (the next one's: a code
from where q(z) puts its mass, so that a code offset from the prior does not pass for
information). An estimate at its ceiling (MI) or floor (marginal KL) is flagged in the
table, never reported as the value.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import asdict, dataclass

import torch

from .analysis import PairedDifference, paired_difference
from .data import iterate_batches
from .device import module_device, move_batch
from .latent_space import token_accuracy
from .training_split import training_split_aggregate


@dataclass(frozen=True)
class ReconstructionAccuracy:
    """Greedy reconstruction of held-out sentences, compared position by position."""
    token_accuracy: float        # matching tokens / target tokens (w_1..w_n [EOS]), micro-averaged
    sentence_accuracy: float     # sentences reproduced exactly, [EOS] included
    num_sentences: int
    num_tokens: int
    # matching positions of each sentence, in the order given: two reconstructions of the same
    # sentences (their targets are the same) are compared sentence by sentence (gain_over)
    correct_per_sentence: tuple = ()

    def gain_over(self, baseline: "ReconstructionAccuracy"):
        """This token accuracy minus ``baseline``'s on the same sentences, with its standard error
        from the per-sentence differences of matching positions
        (:func:`~tvae_core.analysis.paired_difference`, scaled by sentences / tokens: the targets,
        and so the denominator, are the same). Returns a
        :class:`~tvae_core.analysis.PairedDifference` in token accuracy."""
        if (self.num_sentences, self.num_tokens) != (baseline.num_sentences, baseline.num_tokens):
            raise ValueError(f"baseline has {baseline.num_sentences} sentences / {baseline.num_tokens} tokens, this "
                             f"{self.num_sentences} / {self.num_tokens}: not the same sentences")
        per_sentence = paired_difference(self.correct_per_sentence, baseline.correct_per_sentence)
        scale = self.num_sentences / self.num_tokens
        return PairedDifference(per_sentence.mean * scale, per_sentence.standard_error * scale, self.num_sentences)


@torch.no_grad()
def reconstruction_accuracy(model, sequences: list[list[int]], pad_id: int, *, from_prior_mean: bool = False,
                            from_other_sentence: bool = False, batch_size: int = 64) -> ReconstructionAccuracy:
    """Encode each ``[BOS] w_1..w_n [EOS]`` sequence, decode z = E_q[z|x] greedily and count the
    positions i where the generated token equals w_i (the target being w_1..w_n [EOS]).

    Baselines without information about x: ``from_prior_mean`` decodes z = 0, the prior's mean;
    ``from_other_sentence`` decodes sentence i from the posterior mean of sentence i + 1 (the last
    from the first's), a code drawn from where the encoder puts its codes. z = 0 is information-
    free only where q(z) sits on the prior: a run whose codes all sit away from it beats z = 0
    through that offset alone, never another sentence's code.

    A generated sentence shorter than the target counts its missing positions as wrong; longer,
    its extra tokens are ignored (they cost nothing in token accuracy, only in the sentence one).
    """
    if not sequences:
        raise ValueError("sequences is empty")
    if from_prior_mean and from_other_sentence:
        raise ValueError("from_prior_mean and from_other_sentence are exclusive: choose one baseline")
    device = module_device(model)
    batches = [move_batch(b, device) for b in iterate_batches(sequences, batch_size, pad_id, shuffle=False,
                                                                 bucket=False)]
    codes = torch.cat([model.encode(b).loc for b in batches])                    # [N, D], in order
    if from_prior_mean:
        codes = torch.zeros_like(codes)
    elif from_other_sentence:   # each sentence gets the next one's posterior mean
        codes = codes.roll(-1, dims=0)
    per_sentence, total, exact, done = [], 0, 0, 0
    for batch in batches:
        size = batch["input_ids"].shape[0]
        z, done = codes[done:done + size], done + size                           # [B, D]
        mask = batch["attention_mask"].bool()
        targets = [row[m][1:].tolist() for row, m in zip(batch["input_ids"], mask)]   # drop [BOS]
        generated = model.generate(z, max_new_tokens=max(len(t) for t in targets), greedy=True)
        for target, output in zip(targets, generated):
            per_sentence.append(round(token_accuracy(target, output) * len(target)))   # matching positions
            total += len(target)
            exact += int(output == target)
    return ReconstructionAccuracy(token_accuracy=sum(per_sentence) / total, sentence_accuracy=exact / len(sequences),
                                  num_sentences=len(sequences), num_tokens=total,
                                  correct_per_sentence=tuple(per_sentence))


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
    recon_other = reconstruction_accuracy(model, test_seqs, run.vocab.pad_id, from_other_sentence=True)
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
        "reconstruction_from_other_sentence": asdict(recon_other),
        "seconds": time.time() - started,
    }


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
MEASURES_VERSION = 4


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
