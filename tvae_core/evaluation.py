"""Cached evaluation of a trained run on held-out data, shared by the notebooks.

:func:`evaluate_run` computes, for one run and one set of estimator sizes (a profile's
``estimators``), on the test split:

* single-sample rate / distortion / ELBO (nats per sentence, per token, perplexity bound), and
  each sentence's ELBO;
* the importance-weighted bound on log p(x) with K = ``estimators.iw_num_samples``, its mean and
  each sentence's value (two runs' bounds on the same sentences are compared pairwise:
  :func:`tvae_core.analysis.iw_difference`, :func:`tvae_core.analysis.elbo_difference`);
* the posterior parameters of every test sentence (kept as safetensors, for histograms, MMD and
  the mixed membership model) and, from them, the aggregate-posterior index-code MI and marginal
  KL (self-term and leave-one-out estimators, each with its ceiling), total correlation and
  dimension-wise KL;
* active units and KL per dimension;
* an MMD two-sample test of q(z) samples against prior samples.

Every decoder pass runs its matmuls in ``estimators.decoder_dtype`` (bfloat16 in the default
profile: the transformer under autocast, the vocabulary matmul in :mod:`tvae_core.lm_head`; target
logits and log-softmax in float32; its measured effect is in :class:`~tvae_core.profiles.EstimatorSize`).
The IW bound runs ``torch.get_num_threads()`` batches at once, one thread each.

Results are written next to the run (``evaluation-<key>.json`` + ``posterior-<key>.safetensors``)
atomically. The key covers the run key, the estimator sizes, split, seed and a hash of the
evaluation code (:data:`EVALUATION_SOURCES`). The JSON is checksummed and records the evaluation
key, the run key and the SHA-256 of the weights and of the posterior file it came from
(:mod:`tvae_core.cache`); on load all of them are checked, and so are the result's field types,
finiteness and the posterior's shape, finiteness and positive scales. A damaged or stale entry is
set aside with one warning naming the file and recomputed; nothing non-finite is published.
Re-executing the book recomputes nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import estimators as est
from .cache import (DamagedCacheError, canonical_json, non_finite_numbers, read_checked_json, set_aside,
                    sha256_file, source_fingerprint, staging_path, write_checked_json)
from .build import training_corpus
from .data import iterate_batches
from .device import module_device
from .profiles import EstimatorSize
from .runs import Run

log = logging.getLogger(__name__)
EVALUATION_FORMAT_VERSION = 5  # 2: IW batches bucketed by length, bfloat16 head option; 3: bfloat16 decoder, float32 target logit; 4: the compiled bfloat16 LM-head kernel (tvae_core.native); 5: the ELBO and the IW bound per sentence, the split's hash


@dataclass(frozen=True)
class RunEvaluation:
    label: str
    run_key: str
    split: str
    num_sentences: int
    num_tokens: int
    rate: float
    distortion: float
    elbo: float
    elbo_per_sentence: list            # one single-sample ELBO per sentence of the split, in its order
    elbo_per_token: float
    perplexity_bound: float
    iw_num_samples: int
    iw_num_sentences: int
    iw_log_likelihood: float
    iw_log_likelihood_se: float
    iw_perplexity: float
    # one IW estimate per sentence, in the split's order (its first iw_num_sentences sentences)
    iw_log_likelihood_per_sentence: list
    # of the split's token ids as the decoder read them: two runs with the same hash are compared
    # sentence by sentence (analysis.elbo_difference, analysis.iw_difference)
    sentences_sha256: str
    elbo_on_iw_sentences: float
    mutual_information: float          # self term included: a lower estimate, capped at log N
    mutual_information_ceiling: float
    mutual_information_at_ceiling: bool
    mutual_information_loo: float      # leave-one-out: an upper estimate
    marginal_kl: float                 # self term included: an upper estimate
    marginal_kl_loo: float             # leave-one-out: a lower estimate
    total_correlation: float
    dimensionwise_kl: float
    active_units: int
    kl_per_dimension: list
    mmd_statistic: float               # unbiased MMD^2, median-heuristic kernel mix
    mmd_p_value: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IWBatching:
    """How the importance-weighted bound is batched: sentences per decoder call, z samples per
    chunk (so a call decodes ``sentences_per_call x chunk_size`` sequences) and CPU threads."""
    sentences_per_call: int
    chunk_size: int
    workers: int


def iw_batching(num_samples: int, device: torch.device, sequences_per_call: int | None = None) -> IWBatching:
    """On the CPU ~500 decoder sequences per call (~20% faster than 2,000: a smaller working set),
    one batch per thread; on an accelerator ~8,000 (all K samples of 16 sentences at K = 500), so
    each call fills the device, on one thread. ``sequences_per_call`` overrides the size (large
    pretrained decoders: :attr:`EstimatorSize.iw_sequences_per_call`). Sentences of similar length
    go together either way (less padding)."""
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if sequences_per_call is not None:
        chunk = min(num_samples, sequences_per_call)
        return IWBatching(max(1, sequences_per_call // chunk), chunk, workers)
    if device.type == "cpu":
        chunk = min(num_samples, 100)
        return IWBatching(max(1, 512 // chunk), chunk, torch.get_num_threads())
    return IWBatching(max(1, 8192 // num_samples), num_samples, 1)


def _evaluation_key(run: Run, size: EstimatorSize, split: str, seed: int) -> str:
    return evaluation_key(run.config.key, size, split, seed)


_PACKAGE_DIR = Path(__file__).resolve().parent
# The code an evaluation's numbers depend on beyond the run itself (whose key covers the model)
EVALUATION_SOURCES = ("evaluation.py", "lm_head.py", "estimators/__init__.py", "estimators/_checks.py",
                      "estimators/aggregate.py", "estimators/bounds.py", "estimators/decomposition.py",
                      "estimators/mmd.py", "estimators/units.py", "native/__init__.py", "native/lm_head_nll.cpp")


@functools.lru_cache(maxsize=1)
def evaluation_code_version() -> str:
    """Hash of :data:`EVALUATION_SOURCES` (ASTs without docstrings; see
    :func:`tvae_core.cache.source_fingerprint`): editing an estimator recomputes evaluations."""
    fingerprint = source_fingerprint((_PACKAGE_DIR / name for name in EVALUATION_SOURCES), root=_PACKAGE_DIR)
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:16]


def evaluation_key(run_key: str, size: EstimatorSize, split: str = "test", seed: int = 0) -> str:
    """Cache key of a run's evaluation: the run, the estimator sizes, the split, the seed and the
    evaluation code."""
    payload = {"run": run_key, "size": asdict(size), "split": split, "seed": seed,
               "format": EVALUATION_FORMAT_VERSION, "code": evaluation_code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def evaluation_is_cached(run_dir: Path, run_key: str, size: EstimatorSize, split: str = "test",
                         seed: int = 0) -> bool:
    """Whether ``run_dir`` holds an unaltered evaluation of these weights (checksums, keys and
    the weights' hash; the model is not loaded)."""
    key = evaluation_key(run_key, size, split, seed)
    try:
        stored = read_checked_json(run_dir / f"evaluation-{key}.json", key)
        weights = json.loads((run_dir / "manifest.json").read_text())["files"]["model.safetensors"]
        return (stored["run_key"] == run_key and stored["weights_sha256"] == weights
                and sha256_file(run_dir / f"posterior-{key}.safetensors") == stored["posterior_sha256"])
    except (DamagedCacheError, OSError, ValueError, KeyError, TypeError):
        return False


def posterior_parameters(run: Run, size: EstimatorSize, split: str = "test", seed: int = 0):
    """loc, scale [N, D] (float64) of q(z|x) for every sentence of ``split`` (cached with the
    evaluation of ``size``, :func:`evaluate_run`)."""
    evaluate_run(run, size, split, seed)
    from safetensors.torch import load_file

    key = _evaluation_key(run, size, split, seed)
    tensors = load_file(str(run.path / f"posterior-{key}.safetensors"))
    return tensors["loc"], tensors["scale"]


def _check_result(result: RunEvaluation) -> None:
    """Every field has its annotated type and every number is finite (ValueError naming them)."""
    hints = typing.get_type_hints(RunEvaluation)
    for f in dataclasses.fields(result):
        value, expected = getattr(result, f.name), hints[f.name]
        ok = (isinstance(value, bool) if expected is bool else
              isinstance(value, int) and not isinstance(value, bool) if expected is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else
              isinstance(value, expected))
        if not ok:
            raise ValueError(f"{f.name}={value!r} is not a {expected.__name__}")
    if len(result.iw_log_likelihood_per_sentence) != result.iw_num_sentences:
        raise ValueError(f"iw_log_likelihood_per_sentence has {len(result.iw_log_likelihood_per_sentence)} values, "
                         f"iw_num_sentences={result.iw_num_sentences}")
    if len(result.elbo_per_sentence) != result.num_sentences:
        raise ValueError(f"elbo_per_sentence has {len(result.elbo_per_sentence)} values, "
                         f"num_sentences={result.num_sentences}")
    text = ("label", "run_key", "split", "sentences_sha256")
    bad = non_finite_numbers({k: v for k, v in result.as_dict().items() if k not in text})
    if bad:
        raise ValueError(f"non-finite {bad}")


def _check_posterior(loc: torch.Tensor, scale: torch.Tensor, num_sentences: int, latent_dim: int) -> None:
    for name, t in (("loc", loc), ("scale", scale)):
        if tuple(t.shape) != (num_sentences, latent_dim):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{num_sentences}, {latent_dim}]")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} is not finite")
    if not bool((scale > 0).all()):
        raise ValueError("scale is not positive")


def _load_evaluation(run: Run, key: str, json_path: Path, tensor_path: Path) -> RunEvaluation:
    """The cached evaluation, verified against its key, its run, its weights and its posterior
    file; raises :class:`DamagedCacheError` naming the file otherwise."""
    from safetensors.torch import load_file

    stored = read_checked_json(json_path, key)
    try:
        if stored["run_key"] != run.config.key:
            raise ValueError(f"comes from run {stored['run_key']!r}, not {run.config.key!r}")
        if stored["weights_sha256"] != run.weights_sha256:
            raise ValueError("comes from other weights than this run's model.safetensors")
        result = RunEvaluation(**stored["result"])
        _check_result(result)
        if result.run_key != run.config.key:
            raise ValueError(f"result of run {result.run_key!r}, not {run.config.key!r}")
    except (ValueError, TypeError, KeyError) as err:
        raise DamagedCacheError(f"{json_path}: {type(err).__name__}: {err}") from None
    try:
        if not tensor_path.is_file():
            raise ValueError("missing")
        if sha256_file(tensor_path) != stored["posterior_sha256"]:
            raise ValueError("checksum mismatch (content changed after publishing)")
        tensors = load_file(str(tensor_path))
        _check_posterior(tensors["loc"], tensors["scale"], result.num_sentences, run.config.model.latent_dim)
    except Exception as err:
        raise DamagedCacheError(f"{tensor_path}: {type(err).__name__}: {err}") from None
    return result


@torch.no_grad()
def evaluate_model(model, sequences: list[list[int]], pad_id: int, size: EstimatorSize, *, seed: int = 0,
                   label: str = "", run_key: str = "", split: str = "test", progress: bool = True):
    """The held-out numbers of :class:`RunEvaluation` for any :class:`~tvae_core.model.TransformerVAE`
    on ``sequences`` (token ids in its decoder's vocabulary), uncached: the one evaluation path of
    trained runs (:func:`evaluate_run` caches it) and of models that are no run (a pretrained
    decoder as it ships). Returns ``(result, posterior)``: the posterior parameters of every
    sentence (``loc``, ``scale`` [N, D], float64). A model without a latent has exact
    importance weights, so ``size.iw_num_samples = 1`` already gives its exact log p(x)."""
    if not isinstance(size, EstimatorSize):
        raise TypeError(f"size={size!r}: accepted values: an EstimatorSize, e.g. get_profile('default').estimators")
    started = time.time()
    device = module_device(model)  # evaluated where the model is (tvae_core.device)
    model = model.eval().at_precision(size.decoder_dtype)  # the decoder's matmuls at the sizes' dtype
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def batches(seqs, batch_size=size.batch_size):
        return iterate_batches(seqs, batch_size, pad_id, shuffle=False, bucket=False)

    bounds = est.evaluate_bounds(model, batches(sequences), generator=generator, progress=progress,
                                 keep_posterior=True, device=device)
    iw_seqs = sequences[: size.iw_max_sentences] if size.iw_max_sentences else sequences
    plan = iw_batching(size.iw_num_samples, device, size.iw_sequences_per_call)
    # shortest first (less padding), then every value put back in the split's order
    by_length = sorted(range(len(iw_seqs)), key=lambda i: len(iw_seqs[i]))
    iw = est.evaluate_log_likelihood(model, batches([iw_seqs[i] for i in by_length], plan.sentences_per_call),
                                     num_samples=size.iw_num_samples, chunk_size=plan.chunk_size,
                                     generator=generator, progress=progress, device=device,
                                     workers=plan.workers)
    iw_per_sentence = torch.empty_like(iw.log_likelihood)
    iw_per_sentence[torch.tensor(by_length, dtype=torch.long)] = iw.log_likelihood
    elbo_iw = est.evaluate_bounds(model, batches(iw_seqs), generator=generator, progress=False,
                                  device=device).elbo
    params = bounds.posterior  # q(z|x) of the whole split, from the bounds' encoder pass
    with_self, loo = est.self_and_leave_one_out_terms(params.loc, params.scale, generator=generator,
                                                      decompose=True)
    units = est.active_units(params.loc)
    kl_dims = est.kl_per_dimension(params.loc, params.scale)
    n_mmd = min(size.mmd_num_samples, params.loc.shape[0])
    z_q = est.sample_aggregate_posterior(params.loc[:n_mmd], params.scale[:n_mmd], 1, generator).reshape(n_mmd, -1)
    z_p = torch.randn(n_mmd, params.loc.shape[1], generator=generator, dtype=torch.float64)
    mmd = est.mmd_permutation_test(z_q, z_p, num_permutations=size.mmd_permutations, generator=generator)

    result = RunEvaluation(
        label=label, run_key=run_key, split=split, num_sentences=bounds.num_sequences,
        num_tokens=bounds.num_tokens, rate=bounds.rate, distortion=bounds.distortion, elbo=bounds.elbo,
        elbo_per_sentence=[float(v) for v in bounds.elbo_per_sequence],
        elbo_per_token=bounds.elbo_per_token, perplexity_bound=bounds.perplexity,
        iw_num_samples=size.iw_num_samples, iw_num_sentences=iw.num_sequences,
        iw_log_likelihood=iw.mean, iw_log_likelihood_se=iw.standard_error, iw_perplexity=iw.perplexity,
        iw_log_likelihood_per_sentence=[float(v) for v in iw_per_sentence],
        sentences_sha256=hashlib.sha256(canonical_json([list(map(int, s)) for s in sequences]).encode()).hexdigest(),
        elbo_on_iw_sentences=elbo_iw,
        mutual_information=with_self.mutual_information.value,
        mutual_information_ceiling=with_self.mutual_information.ceiling,
        mutual_information_at_ceiling=bool(with_self.mutual_information.at_ceiling),
        mutual_information_loo=loo.mutual_information.value,
        marginal_kl=with_self.marginal_kl.value, marginal_kl_loo=loo.marginal_kl.value,
        total_correlation=float(with_self.total_correlation),
        dimensionwise_kl=float(with_self.dimensionwise_kl),
        active_units=int(units.num_active), kl_per_dimension=[float(v) for v in kl_dims],
        mmd_statistic=float(mmd.mmd2), mmd_p_value=float(mmd.p_value),
        seconds=time.time() - started,
    )
    return result, params


def evaluate_run(run: Run, size: EstimatorSize, split: str = "test", seed: int = 0, *,
                 progress: bool = True) -> RunEvaluation:
    """All held-out numbers of one run with the estimator sizes ``size`` (a profile's
    ``estimators``), cached next to the run; see the module docstring.

    A run trained with ``model.deterministic_encoder`` is measured as the Gaussian-encoder model
    its weights define (the estimators need q(z|x)'s density and draws): its decoder was trained
    on the posterior means only, so the IW bound and the MI estimates describe a model that
    training never sampled from."""
    from safetensors.torch import save_file

    if not isinstance(size, EstimatorSize):
        raise TypeError(f"size={size!r}: accepted values: an EstimatorSize, e.g. get_profile('default').estimators")
    key = _evaluation_key(run, size, split, seed)
    json_path = run.path / f"evaluation-{key}.json"
    tensor_path = run.path / f"posterior-{key}.safetensors"
    if json_path.is_file() or tensor_path.is_file():
        try:
            return _load_evaluation(run, key, json_path, tensor_path)
        except DamagedCacheError as err:  # set aside (one warning naming the file), recompute
            for path in (json_path, tensor_path):
                if path.is_file():
                    set_aside(path, str(err))

    result, params = evaluate_model(run.model, training_corpus(run.config).token_ids(split), run.vocab.pad_id, size,
                                    seed=seed, label=run.label, run_key=run.config.key, split=split,
                                    progress=progress)
    try:  # nothing non-finite (or of the wrong shape) is published
        _check_result(result)
        _check_posterior(params.loc, params.scale, result.num_sentences, run.config.model.latent_dim)
    except ValueError as err:
        raise FloatingPointError(f"evaluation of run {run.label} ({run.config.key}) is unusable: {err}; "
                                 "not cached") from None
    tmp = staging_path(tensor_path)
    save_file({"loc": params.loc.contiguous(), "scale": params.scale.contiguous()}, str(tmp),
              metadata={"key": key, "run_key": run.config.key})
    posterior_sha256 = sha256_file(tmp)
    tmp.replace(tensor_path)
    write_checked_json(json_path, {"result": result.as_dict(), "run_key": run.config.key,
                                   "weights_sha256": run.weights_sha256, "posterior_sha256": posterior_sha256},
                       key)
    return result
