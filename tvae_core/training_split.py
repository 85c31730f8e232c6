"""Aggregate-posterior index-code MI and marginal KL on the whole *training* split, cached.

The self-term estimator of index-code MI cannot exceed log N (notebook 00); on the PTB test split
that ceiling is log 3,761 = 8.2 nats, below the rate of most runs that carry information, so for
them the test-split estimate says only "at least 8.2". The training split has N = 42,068 sentences
(log N = 10.6): the same estimators see further. :func:`training_split_aggregate` encodes every
training sentence, runs :func:`tvae_core.estimators.self_and_leave_one_out_terms` (the estimators
:func:`tvae_core.budget.budget_measures` and :func:`tvae_core.evaluation.evaluate_run` call) and
counts active units, with each estimate's limit and a flag when it is reached:

* MI with the self term: a lower estimate, ceiling log N (``mutual_information_at_ceiling``);
* marginal KL with the self term: an upper estimate, floor rate - log N (``marginal_kl_at_floor``;
  the same samples give MI + marginal KL = rate, so the two flags agree);
* both leave-one-out values: no ceiling, biased the other way (MI up, marginal KL down).

An estimate at its limit is a bound on the estimator, not a value of the model: pages draw it as a
bound and keep it out of comparisons.

Cost: the outer Monte Carlo average runs over z drawn for :data:`SAMPLED_POINTS` of the N
sentences (chosen at random with ``seed``) while every log q(z) mixes all N posteriors
(``sampled_points`` of :func:`tvae_core.estimators.self_and_leave_one_out_terms`): the ceiling
stays log N and the expectation that of the full estimator, the standard errors are stored beside
each estimate, and the float64 pass is 10,000 x 42,068 instead of 42,068 x 42,068 (~4 s instead
of ~18 s on one core of the target machine, measured). Plus one encoder pass over the split, its
sentences batched by length (half the time of batching them in corpus order; the posteriors are
put back in corpus order). The result is cached next to the run as
``training-split-aggregate-<key>.json``, published atomically with its key and checksum
(:mod:`tvae_core.cache`); the key covers the run key, the split, ``seed``, ``max_sentences``, a
format version and a hash of this module and of the estimators it calls. On load the key, the
checksum, the run key, the SHA-256 of the weights and every field's type and finiteness are
checked; a damaged or stale entry is set aside with one warning naming the file and recomputed.

This is a module of its own, not part of :mod:`tvae_core.evaluation`, on purpose: evaluation.py is
hashed into every test-split evaluation's cache key, so adding a function there would recompute
every evaluation of every run.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import estimators as est
from .cache import (DamagedCacheError, canonical_json, non_finite_numbers, read_checked_json, set_aside,
                    source_fingerprint, write_checked_json)
from .data import iterate_batches
from .runs import Run

TRAINING_SPLIT_FORMAT_VERSION = 2  # 2: z from SAMPLED_POINTS sentences, standard errors stored
# sentences whose z form the Monte Carlo average (every log q(z) mixes all N): a standard error of
# ~0.01-0.05 nats on the book's runs, well under the differences the pages compare
SAMPLED_POINTS = 10_000
ENCODE_BATCH_SIZE = 256   # the encoder pass only; the numbers do not depend on it (no padding leaks, defect 1)

_PACKAGE_DIR = Path(__file__).resolve().parent
# The code these numbers depend on beyond the run itself (whose key covers the model and the corpus)
TRAINING_SPLIT_SOURCES = ("training_split.py", "estimators/__init__.py", "estimators/_checks.py",
                          "estimators/aggregate.py", "estimators/bounds.py", "estimators/units.py")


@dataclass(frozen=True)
class TrainingSplitAggregate:
    """Aggregate-posterior estimates of one run on ``num_sentences`` sentences of ``split``, nats per sentence."""
    label: str
    run_key: str
    split: str
    num_sentences: int                  # N: the sentences encoded, the components of q(z)
    rate: float                         # Monte Carlo rate of the same samples: MI + marginal KL = rate
    analytic_rate: float                # E_x KL(q(z|x) || p(z)) in closed form, on the same sentences
    sampled_points: int                 # sentences whose z ~ q(z|x_n) form the average (<= N)
    mutual_information: float           # self term included: a lower estimate, capped at log N
    mutual_information_se: float        # Monte Carlo standard error (both estimators' MI and KL alike)
    mutual_information_ceiling: float   # log N
    mutual_information_at_ceiling: bool
    mutual_information_loo: float       # leave-one-out: an upper estimate, no ceiling
    marginal_kl: float                  # self term included: an upper estimate, floored at rate - log N
    marginal_kl_se: float
    marginal_kl_floor: float            # rate - log N
    marginal_kl_at_floor: bool
    marginal_kl_loo: float              # leave-one-out: a lower estimate
    active_units: int                   # Var_x E_q[z_d] > 0.01 over the N sentences
    seed: int
    seconds: float                      # encoder pass + the aggregate pass, when computed

    @property
    def at_limit(self) -> bool:
        """The self-term estimates sit at their limit: MI is only "at least log N" and marginal KL
        only "at most rate - log N"."""
        return self.mutual_information_at_ceiling or self.marginal_kl_at_floor

    def as_dict(self) -> dict:
        return asdict(self)


def aggregate_from_posteriors(loc: torch.Tensor, scale: torch.Tensor, *, seed: int = 0, label: str = "",
                              run_key: str = "", split: str = "train", progress: bool = False,
                              sampled_points: int | None = SAMPLED_POINTS) -> TrainingSplitAggregate:
    """The estimates from the posterior parameters ``loc``, ``scale`` ``[N, D]`` of N sentences
    (one sample z ~ q(z|x_n) for each of ``sampled_points`` of them, chosen and drawn with ``seed``;
    None or >= N: every sentence; the ceiling tolerance is the estimators' default, 0.1 nats).

    With q_hat(z) = 1/N sum_n q(z | x_n) (self term kept) or its leave-one-out version:
    MI = mean_i [log q(z_i | x_i) - log q_hat(z_i)], a lower estimate that cannot exceed log N,
    and marginal KL = mean_i [log q_hat(z_i) - log p(z_i)], an upper estimate that cannot go below
    R^ - log N (R^ their sum, the Monte Carlo rate); leaving one out reverses both biases and
    removes the ceiling (:func:`tvae_core.estimators.self_and_leave_one_out_terms`)."""
    started = time.time()
    with_self, loo = est.self_and_leave_one_out_terms(loc, scale, generator=torch.Generator().manual_seed(seed),
                                                      progress=progress, sampled_points=sampled_points)
    mi, kl = with_self.mutual_information, with_self.marginal_kl
    return TrainingSplitAggregate(
        label=label, run_key=run_key, split=split, num_sentences=with_self.num_points, rate=with_self.rate,
        analytic_rate=float(est.kl_per_dimension(loc, scale).sum()),
        sampled_points=with_self.sampled_points or with_self.num_points,
        mutual_information=mi.value, mutual_information_se=mi.standard_error, mutual_information_ceiling=mi.ceiling,
        mutual_information_at_ceiling=bool(mi.at_ceiling), mutual_information_loo=loo.mutual_information.value,
        marginal_kl=kl.value, marginal_kl_se=kl.standard_error, marginal_kl_floor=kl.floor,
        marginal_kl_at_floor=bool(kl.at_floor),
        marginal_kl_loo=loo.marginal_kl.value, active_units=int(est.active_units(loc).num_active),
        seed=seed, seconds=time.time() - started)


def encode_in_length_order(model, sequences: list[list[int]], pad_id: int, *, progress: bool = False):
    """q(z|x) of every sentence (float64 ``loc``, ``scale`` [N, D], in the order of ``sequences``),
    encoded in batches of sentences of similar length: less padding, the same posteriors (the
    encoder masks padding; what changes is float rounding, ~1e-6)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    params = est.collect_posterior_parameters(
        model, iterate_batches([sequences[i] for i in order], ENCODE_BATCH_SIZE, pad_id, shuffle=False,
                               bucket=False), progress=progress)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return est.PosteriorParameters(loc=params.loc[back], scale=params.scale[back])


@functools.lru_cache(maxsize=1)
def training_split_code_version() -> str:
    """Hash of :data:`TRAINING_SPLIT_SOURCES` (ASTs without docstrings, see
    :func:`tvae_core.cache.source_fingerprint`): editing an estimator recomputes these entries."""
    fingerprint = source_fingerprint((_PACKAGE_DIR / name for name in TRAINING_SPLIT_SOURCES), root=_PACKAGE_DIR)
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:16]


def training_split_key(run_key: str, *, split: str = "train", seed: int = 0, max_sentences: int | None = None) -> str:
    """Cache key of one entry: the run, the split, the seed, the number of sentences and the code."""
    payload = {"run": run_key, "split": split, "seed": seed, "max_sentences": max_sentences,
               "format": TRAINING_SPLIT_FORMAT_VERSION, "code": training_split_code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def training_split_path(run_dir: Path, run_key: str, **key_args) -> Path:
    """Where the entry of the run ``run_key``, stored in ``run_dir``, lives (``key_args``: those
    of :func:`training_split_key`)."""
    return Path(run_dir) / f"training-split-aggregate-{training_split_key(run_key, **key_args)}.json"


def _check_result(result: TrainingSplitAggregate) -> None:
    """Every field has its annotated type and every number is finite (ValueError naming them)."""
    hints = typing.get_type_hints(TrainingSplitAggregate)
    for f in dataclasses.fields(result):
        value, expected = getattr(result, f.name), hints[f.name]
        ok = (isinstance(value, bool) if expected is bool else
              isinstance(value, int) and not isinstance(value, bool) if expected is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else
              isinstance(value, expected))
        if not ok:
            raise ValueError(f"{f.name}={value!r} is not a {expected.__name__}")
    bad = non_finite_numbers({k: v for k, v in result.as_dict().items() if k not in ("label", "run_key", "split")})
    if bad:
        raise ValueError(f"non-finite {bad}")


def _load(run: Run, key: str, path: Path, expected: dict) -> TrainingSplitAggregate:
    """The cached entry, verified against its key, its run, its weights and its parameters;
    raises :class:`DamagedCacheError` naming the file otherwise."""
    stored = read_checked_json(path, key)
    try:
        if stored["run_key"] != run.config.key:
            raise ValueError(f"comes from run {stored['run_key']!r}, not {run.config.key!r}")
        if stored["weights_sha256"] != run.weights_sha256:
            raise ValueError("comes from other weights than this run's model.safetensors")
        result = TrainingSplitAggregate(**stored["result"])
        _check_result(result)
        wrong = {k: getattr(result, k) for k, v in expected.items() if getattr(result, k) != v}
        if wrong:
            raise ValueError(f"holds {wrong}, expected {expected}")
    except (ValueError, TypeError, KeyError) as err:
        raise DamagedCacheError(f"{path}: {type(err).__name__}: {err}") from None
    return result


def training_split_aggregate(run: Run, *, split: str = "train", seed: int = 0, max_sentences: int | None = None,
                             progress: bool = False) -> TrainingSplitAggregate:
    """Index-code MI, marginal KL (self-term and leave-one-out) and active units of ``run`` on
    the first ``max_sentences`` sentences of ``split`` (None: all of them), cached next to the
    run (see the module docstring)."""
    if max_sentences is not None and max_sentences < 2:
        raise ValueError(f"max_sentences must be None or >= 2; got {max_sentences}")
    key = training_split_key(run.config.key, split=split, seed=seed, max_sentences=max_sentences)
    path = training_split_path(run.path, run.config.key, split=split, seed=seed, max_sentences=max_sentences)
    expected = {"run_key": run.config.key, "split": split, "seed": seed}
    if path.is_file():
        try:
            return _load(run, key, path, expected)
        except DamagedCacheError as err:  # set aside (one warning naming the file), recompute
            set_aside(path, str(err))

    from .build import training_corpus

    started = time.time()
    model = run.model.eval()
    sequences = training_corpus(run.config).token_ids(split)
    if max_sentences is not None:
        sequences = sequences[:max_sentences]
    params = encode_in_length_order(model, sequences, run.vocab.pad_id, progress=progress)
    result = aggregate_from_posteriors(params.loc, params.scale, seed=seed, label=run.label,
                                       run_key=run.config.key, split=split, progress=progress)
    result = dataclasses.replace(result, seconds=time.time() - started)
    try:  # nothing non-finite is published
        _check_result(result)
    except ValueError as err:
        raise FloatingPointError(f"training-split estimates of run {run.label} ({run.config.key}) are unusable: "
                                 f"{err}; not cached") from None
    write_checked_json(path, {"result": result.as_dict(), "run_key": run.config.key,
                              "weights_sha256": run.weights_sha256}, key)
    return result


def limited_value(value: float, limit: float, at_limit: bool, sign: str) -> str:
    """'9.87', or '>= 10.61 (ceiling 10.65)' / '<= 1.24 (floor 1.20)' for an estimate at its limit.

    At its limit an estimate is a bound, not a value: the self-term MI is a lower estimate (so
    ``>=`` the estimate) and the self-term marginal KL an upper one (``<=``). The bound is the
    estimate itself, not the limit: within the at-limit tolerance the two differ, and the limit
    would claim more than the estimate shows (I_q >= log N, or a marginal KL below the estimate)."""
    if not at_limit:
        return f"{value:.2f}"
    return f"{sign} {value:.2f} ({'ceiling' if sign == '>=' else 'floor'} {limit:.2f})"


def compare_marginal_kl(first: TrainingSplitAggregate, second: TrainingSplitAggregate) -> str:
    """Which of two runs has the larger marginal KL, decided only where the estimators can tell.

    Each run's marginal KL lies between its leave-one-out (lower) and self-term (upper) estimates
    in expectation. Returns ``"at the ceiling"`` when either run's self-term estimates sit at
    their limit (MI at log N, marginal KL at rate - log N: bounds on the estimator, never compared),
    ``"greater"`` / ``"less"`` when ``first``'s bracket lies wholly above / below ``second``'s,
    and ``"overlap"`` otherwise.
    """
    if first.at_limit or second.at_limit:
        return "at the ceiling"
    if first.marginal_kl_loo > second.marginal_kl:
        return "greater"
    if first.marginal_kl < second.marginal_kl_loo:
        return "less"
    return "overlap"
