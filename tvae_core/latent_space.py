"""The latent space of a trained run, as a reader sees it: reconstructions, samples from the
prior and homotopies between two sentences (Bowman et al., 2016, "Generating sentences from a
continuous space").

* :func:`reconstruct`: x -> z = mu(x) (or z ~ q(z|x)) -> greedy (or ancestral) decoding x_hat,
  scored by :func:`token_accuracy`.
* :func:`sample`: z ~ p(z) = N(0, I) -> decoding; the decoder-only LM samples p(x) directly.
* :func:`interpolate`: z_t = (1 - t) mu(a) + t mu(b) for t evenly spaced in [0, 1], each decoded,
  with :func:`distinct_outputs` counting how many different sentences the path passes through
  (a collapsed posterior decodes one sentence all along).
* :func:`posterior_means` and :func:`nearest_neighbours`: which sentences share a region of the
  latent space, whether or not the decoder reads it.
* Measures that stay honest for small models whose greedy decodings rarely line up word by word:
  :func:`word_overlap` against a chance level (:func:`overlap_against_chance`) and
  :func:`length_correlation`.

Every function takes a :class:`tvae_core.runs.Run` (its vocabulary and maximum length come with
it) or a bare :class:`tvae_core.model.TransformerVAE` (then pass ``vocab`` to read or write text).
Work runs on the model's device (:func:`tvae_core.device.module_device`); random draws come from
the ``generator`` given (a CPU ``torch.Generator`` gives the same words on any device).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import iterate_batches
from .device import module_device, move_batch
from .model import TransformerVAE
from .runs import Run

# the longest decoding of a bare model (a Run decodes up to its data.max_length): the thesis
# truncates sentences at 64 tokens
DEFAULT_MAX_NEW_TOKENS = 64


# ------------------------------------------------------------------------------------ measures
def token_accuracy(reference_ids, predicted_ids) -> float:
    """Position-wise accuracy of a decoding against its reference:

        acc = (1 / n) * sum_{t=1..n} 1[p_t = r_t],   n = len(reference_ids)

    ``reference_ids``: the reference's *predicted* tokens ``w_1 .. w_m [EOS]`` (no ``[BOS]``);
    ``predicted_ids``: the decoding, as :meth:`TransformerVAE.generate` returns it (cut after
    ``[EOS]``). A shorter prediction counts its missing positions as wrong; tokens beyond the
    reference's length are not counted, but a longer prediction has no ``[EOS]`` where the
    reference has one, so that position is wrong."""
    reference, predicted = [int(i) for i in reference_ids], [int(i) for i in predicted_ids]
    if not reference:
        raise ValueError("reference_ids is empty; accepted: at least one token (the [EOS] of an empty sentence)")
    hits = sum(r == p for r, p in zip(reference, predicted))
    return hits / len(reference)


def distinct_outputs(sentences) -> int:
    """The number of different sentences in ``sentences``: ``len(set(sentences))`` (exact string match).
    1 along a homotopy means the decoder ignores where z is on the path."""
    return len(set(sentences))


def word_overlap(reference: str, candidate: str) -> float:
    """The share of the reference's distinct words (split on spaces) that appear in the candidate:

        overlap = size(W(reference) & W(candidate)) / size(W(reference)),   0 for an empty reference,

    W(s) being the set of words of s. Order-free, so it credits a decoding that keeps the content
    words but not their positions, which :func:`token_accuracy` scores as wrong."""
    words = set(reference.split())
    if not words:
        return 0.0
    return len(words & set(candidate.split())) / len(words)


@dataclass(frozen=True)
class OverlapComparison:
    """Mean :func:`word_overlap` of N matched (reference, candidate) pairs against the same
    score of N unrelated pairs (the chance level: frequent words such as "the" overlap anyway).
    ``standard_error``: of the mean paired difference; ``above_chance``: difference > 2 SE."""

    matched: float
    chance: float
    difference: float
    standard_error: float
    above_chance: bool
    num_pairs: int


def overlap_against_chance(matched_pairs, chance_pairs) -> OverlapComparison:
    """Compare the word overlap of matched pairs with that of unrelated pairs, pair by pair:

        d_i = overlap(matched_i) - overlap(chance_i),   SE = std(d) / sqrt(N)

    ``matched_pairs``/``chance_pairs``: N (reference, candidate) text pairs each, the i-th chance
    pair sharing one side with the i-th matched pair (e.g. a reconstruction scored against its
    own sentence and against another one), so that the difference is paired. With N = 1 the
    standard error is infinite and nothing counts as above chance."""
    matched_pairs, chance_pairs = list(matched_pairs), list(chance_pairs)
    if not matched_pairs or len(matched_pairs) != len(chance_pairs):
        raise ValueError(f"{len(matched_pairs)} matched and {len(chance_pairs)} chance pairs; accepted: the same "
                         "number, at least one")
    matched = torch.tensor([word_overlap(r, c) for r, c in matched_pairs], dtype=torch.float64)
    chance = torch.tensor([word_overlap(r, c) for r, c in chance_pairs], dtype=torch.float64)
    difference = matched - chance
    n = len(difference)
    standard_error = float(difference.std(unbiased=True)) / n ** 0.5 if n > 1 else float("inf")
    mean_difference = float(difference.mean())
    return OverlapComparison(matched=float(matched.mean()), chance=float(chance.mean()), difference=mean_difference,
                             standard_error=standard_error, above_chance=mean_difference > 2 * standard_error,
                             num_pairs=n)


def length_correlation(originals, decodings) -> float:
    """Pearson correlation of the word counts of N decodings with those of their originals
    (a code that holds nothing else often still holds the length). NaN when either side has
    one length only (a collapsed model decodes one sentence for every input)."""
    originals, decodings = list(originals), list(decodings)
    if len(originals) != len(decodings) or len(originals) < 2:
        raise ValueError(f"{len(originals)} originals and {len(decodings)} decodings; accepted: the same "
                         "number, at least two")
    x = torch.tensor([len(s.split()) for s in originals], dtype=torch.float64)
    y = torch.tensor([len(s.split()) for s in decodings], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = float(x.norm() * y.norm())
    return float((x * y).sum()) / norm if norm > 0 else float("nan")


def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices of the ``k`` keys nearest (Euclidean) to each query, nearest first.
    ``queries`` [M, D], ``keys`` [N, D] -> [M, k] (long). Ties go to the lower index."""
    _check_positive("k", k)
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)}; accepted: [M, D] and [N, D]")
    if k > keys.shape[0]:
        raise ValueError(f"k={k} but only {keys.shape[0]} keys; accepted: k <= number of keys")
    distances = torch.cdist(queries.double(), keys.double().to(queries.device))  # [M, N]
    # a stable sort keeps the lower index first among equal distances
    return torch.sort(distances, dim=1, stable=True).indices[:, :k]  # [M, k]


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Reconstruction:
    """One sentence through q(z|x) and back. ``input_ids``: ``[BOS] w_1..w_m [EOS]`` as encoded;
    ``output_ids``: the decoding (no ``[BOS]``, cut after ``[EOS]``); texts are None when no
    vocabulary was given."""

    input_text: str | None
    output_text: str | None
    token_accuracy: float
    input_ids: tuple[int, ...]
    output_ids: tuple[int, ...]


@dataclass(frozen=True)
class Homotopy:
    """Decodings along z_t = (1 - t) mu(a) + t mu(b): ``steps[i]`` is t_i, ``sentences[i]`` its
    decoding (its ids joined by spaces when no vocabulary was given); ``num_distinct`` =
    :func:`distinct_outputs` (sentences)."""

    sentence_a: str | None
    sentence_b: str | None
    steps: tuple[float, ...]
    sentences: tuple[str, ...]
    output_ids: tuple[tuple[int, ...], ...]
    num_distinct: int


# ------------------------------------------------------------------------------------ inputs
def _unpack(run_or_model, vocab, max_new_tokens):
    """(model, vocabulary, max_new_tokens, max_length) of a Run or a bare model."""
    if isinstance(run_or_model, Run):
        model, vocab = run_or_model.model, vocab if vocab is not None else run_or_model.vocab
        max_length = run_or_model.config.data.max_length
        default_new = max_length - 1  # [BOS] takes one position
    elif isinstance(run_or_model, TransformerVAE):
        model, max_length, default_new = run_or_model, None, DEFAULT_MAX_NEW_TOKENS
    else:
        raise TypeError(f"run_or_model is a {type(run_or_model).__name__}; accepted: a tvae_core.runs.Run "
                        "(load_run_dir, train_or_load) or a tvae_core.model.TransformerVAE")
    limit = getattr(model.decoder.config, "max_position_embeddings", None) or \
        getattr(model.decoder.config, "n_positions", None)
    if max_new_tokens is None:
        max_new_tokens = default_new if limit is None else min(default_new, limit)
    if max_length is None:
        max_length = limit  # a from-scratch model's encoder and decoder share this many positions
    return model, vocab, max_new_tokens, max_length


def _refuse_without_latent(model, what: str) -> None:
    if not model.uses_latent:
        raise ValueError(f"{what} needs a latent variable, but this model has injection='none' (the "
                         "decoder-only LM: no q(z|x), no z); accepted: a model with injection 'memory', "
                         "'embedding' or 'both'. sample() works for the LM.")


def _as_sequences(sentences, model, vocab, max_length, name: str) -> list[list[int]]:
    """``[BOS] w_1..w_m [EOS]`` id lists for sentences given as text or as such id lists."""
    if isinstance(sentences, (str, bytes)) or not isinstance(sentences, (list, tuple)) or not sentences:
        raise ValueError(f"{name} must be a non-empty list of sentences; accepted: list[str] (needs a "
                         "vocabulary) or list of token id lists [BOS] w_1..w_m [EOS]")
    sequences = []
    for index, sentence in enumerate(sentences):
        if isinstance(sentence, str):
            if vocab is None:
                raise ValueError(f"{name}[{index}] is text but no vocabulary was given; accepted: vocab=... "
                                 "(a Run brings its own) or token id lists")
            words = vocab.encode(sentence)
            if max_length is not None and len(words) + 2 > max_length:
                words = words[: max_length - 2]  # as the corpus is cut (tvae_core.data.encode_sentences)
            sequences.append([model.bos_id, *words, model.eos_id])
        elif isinstance(sentence, (list, tuple)) or torch.is_tensor(sentence):
            ids = [int(i) for i in sentence]
            if len(ids) < 2 or ids[0] != model.bos_id or ids[-1] != model.eos_id:
                raise ValueError(f"{name}[{index}] = {ids[:8]}... is not a sequence [BOS] w_1..w_m [EOS] "
                                 f"(bos_id={model.bos_id}, eos_id={model.eos_id}); accepted: ids as in "
                                 "Corpus.token_ids, or text")
            sequences.append(ids)
        else:
            raise TypeError(f"{name}[{index}] is a {type(sentence).__name__}; accepted: str or a list of token ids")
    return sequences


def _decode_text(vocab, ids) -> str | None:
    return vocab.decode(ids) if vocab is not None else None


@torch.no_grad()
def _posterior_latents(model, sequences, *, use_mean, generator, batch_size) -> torch.Tensor:
    """z for each sequence: mu(x) or one draw of q(z|x) (the mean for a deterministic encoder).
    -> [N, D] on the model's device, in the order given."""
    device = module_device(model)
    latents = []
    # bucket=False keeps the input order; q(z|x) does not depend on the batch (mean pooling over
    # real tokens only, tested in tests/test_model.py)
    for batch in iterate_batches(sequences, batch_size, model.pad_id, bucket=False):
        posterior = model.encode(move_batch(batch, device))
        z = posterior.loc  # [B, D]
        if not use_mean and not model.config.deterministic_encoder:
            where = generator.device if generator is not None else "cpu"
            noise = torch.randn(z.shape, generator=generator, device=where)
            z = z + posterior.scale * noise.to(device)
        latents.append(z)
    return torch.cat(latents)  # [N, D]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= 1")


# ------------------------------------------------------------------------------------ public
def reconstruct(run_or_model, sentences, *, vocab=None, greedy: bool = True, use_mean: bool = True,
                max_new_tokens: int | None = None, temperature: float = 1.0,
                generator: torch.Generator | None = None, batch_size: int = 64) -> list[Reconstruction]:
    """Encode each sentence with q(z|x), decode from its z, and score the decoding.

    z = mu(x) (``use_mean``) or z = mu(x) + sigma(x) * eps, eps ~ N(0, I) from ``generator``;
    decoding greedy (argmax per step) or ancestral (``greedy=False``, at ``temperature``), up to
    ``max_new_tokens`` (default: the run's ``data.max_length - 1``, 64 for a bare model).

    ``sentences``: N texts (tokenised by the vocabulary, cut like the corpus) or N id lists
    ``[BOS] w_1..w_m [EOS]``; encoded in batches of ``batch_size`` on the model's device, z [N, D].
    Returns N :class:`Reconstruction` in the input order, each with :func:`token_accuracy` of the
    decoding against ``w_1..w_m [EOS]``. Refuses the decoder-only LM (no z)."""
    model, vocab, max_new_tokens, max_length = _unpack(run_or_model, vocab, max_new_tokens)
    _refuse_without_latent(model, "reconstruct")
    _check_positive("batch_size", batch_size)
    sequences = _as_sequences(sentences, model, vocab, max_length, "sentences")
    z = _posterior_latents(model, sequences, use_mean=use_mean, generator=generator, batch_size=batch_size)
    outputs = []
    for start in range(0, len(sequences), batch_size):
        outputs += model.generate(z[start:start + batch_size], max_new_tokens, greedy=greedy,
                                  temperature=temperature, generator=generator)
    return [Reconstruction(input_text=_decode_text(vocab, ids), output_text=_decode_text(vocab, out),
                           token_accuracy=token_accuracy(ids[1:], out), input_ids=tuple(ids), output_ids=tuple(out))
            for ids, out in zip(sequences, outputs)]


def sample(run_or_model, num_sentences: int, *, vocab=None, temperature: float = 1.0, greedy: bool = False,
           max_new_tokens: int | None = None, generator: torch.Generator | None = None) -> list[str]:
    """``num_sentences`` sentences x ~ p(x|z), z ~ p(z) = N(0, I_D) (z [N, D] drawn from
    ``generator`` on its device, then moved to the model's); ancestral decoding at
    ``temperature`` (or greedy). For the decoder-only LM, x ~ p(x) directly. Needs a vocabulary
    (a Run brings its own) to return text."""
    model, vocab, max_new_tokens, _ = _unpack(run_or_model, vocab, max_new_tokens)
    _check_positive("num_sentences", num_sentences)
    if vocab is None:
        raise ValueError("sample returns text and needs a vocabulary; accepted: vocab=... or a Run")
    if model.uses_latent:
        where = generator.device if generator is not None else "cpu"
        z = torch.randn(num_sentences, model.latent_dim, generator=generator, device=where)  # [N, D]
        ids = model.generate(z.to(module_device(model)), max_new_tokens, greedy=greedy, temperature=temperature,
                             generator=generator)
    else:
        ids = model.generate(None, max_new_tokens, greedy=greedy, temperature=temperature,
                             num_sequences=num_sentences, generator=generator)
    return [vocab.decode(row) for row in ids]


def posterior_means(run_or_model, sentences, *, vocab=None, batch_size: int = 64) -> torch.Tensor:
    """mu(x) of each sentence (text or ``[BOS] .. [EOS]`` id lists), [N, D] on the CPU in the
    order given. Refuses the LM (no z)."""
    model, vocab, _, max_length = _unpack(run_or_model, vocab, None)
    _refuse_without_latent(model, "posterior_means")
    _check_positive("batch_size", batch_size)
    sequences = _as_sequences(sentences, model, vocab, max_length, "sentences")
    return _posterior_latents(model, sequences, use_mean=True, generator=None, batch_size=batch_size).cpu()


def interpolate(run_or_model, sentence_a, sentence_b, num_steps: int = 7, *, vocab=None, greedy: bool = True,
                max_new_tokens: int | None = None, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> Homotopy:
    """Bowman et al. (2016)'s linear homotopy between two posterior means:

        z_t = (1 - t) mu(a) + t mu(b),   t = 0, 1/(K-1), ..., 1   (K = ``num_steps`` >= 2)

    z [K, D], each decoded greedily (or ancestrally at ``temperature``). The endpoints are
    exactly mu(a) and mu(b), so with greedy decoding they read as :func:`reconstruct` of a and b.
    ``sentence_a``/``sentence_b``: text or ``[BOS] .. [EOS]`` id lists. Refuses the LM (no z)."""
    model, vocab, max_new_tokens, max_length = _unpack(run_or_model, vocab, max_new_tokens)
    _refuse_without_latent(model, "interpolate")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps={num_steps!r}; accepted: an integer >= 2 (the two endpoints included)")
    sequences = _as_sequences([sentence_a, sentence_b], model, vocab, max_length, "[sentence_a, sentence_b]")
    ends = _posterior_latents(model, sequences, use_mean=True, generator=None, batch_size=2)  # [2, D]
    steps = torch.linspace(0.0, 1.0, num_steps, device=ends.device).unsqueeze(1)  # [K, 1]
    z = (1 - steps) * ends[0] + steps * ends[1]  # [K, D]; t = 0 and 1 give the means exactly
    ids = model.generate(z, max_new_tokens, greedy=greedy, temperature=temperature, generator=generator)
    sentences = tuple(vocab.decode(row) if vocab is not None else " ".join(map(str, row)) for row in ids)
    return Homotopy(sentence_a=_decode_text(vocab, sequences[0]), sentence_b=_decode_text(vocab, sequences[1]),
                    steps=tuple(steps.squeeze(1).tolist()), sentences=sentences,
                    output_ids=tuple(tuple(row) for row in ids), num_distinct=distinct_outputs(sentences))
