"""The latent space helpers: reconstructions, prior samples, homotopies, their measures, and
loading a run from its folder."""
import dataclasses
import functools
import shutil

import pytest
import torch

from helpers import WORDS, tiny_config, write_corpus
from tvae_core.config import ModelConfig
from tvae_core.data import Vocabulary, train_word_tokenizer
from tvae_core.latent_space import (Homotopy, Reconstruction, distinct_outputs, interpolate, length_correlation,
                                    nearest_neighbours, overlap_against_chance, posterior_means, reconstruct,
                                    sample, token_accuracy, word_overlap)
from tvae_core.model import TransformerVAE
from tvae_core.runs import load_run_dir, train_or_load

SENTENCE_A = "the cat sat on a mat"
SENTENCE_B = "a big dog ran and the small cat sat"


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.from_word_tokenizer(train_word_tokenizer([" ".join(WORDS)], 50))


def fresh_model(vocab, injection, seed=0):
    """A freshly initialised tiny model whose latent projections are scaled up, so that z
    visibly changes what it decodes (as in tests/test_model.py)."""
    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, latent_dim=4, injection=injection, dropout=0.0)
    model = TransformerVAE.from_scratch(config, vocab.size, pad_id=vocab.pad_id, unk_id=vocab.unk_id,
                                        bos_id=vocab.bos_id, eos_id=vocab.eos_id, max_length=24)
    with torch.no_grad():
        for name in ("latent_to_memory", "latent_to_embedding"):
            if hasattr(model, name):
                getattr(model, name).weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny AE trained for 40 steps (seconds) in a temporary runs folder, its corpus cache
    there too."""
    root = tmp_path_factory.mktemp("latent-space")
    corpus = write_corpus(root / "corpus.txt")
    import tvae_core.data
    import tvae_core.build

    with pytest.MonkeyPatch.context() as patch:
        # load_corpus binds its default cache folder at import: pass the temporary one explicitly
        patch.setattr(tvae_core.build, "load_corpus",
                      functools.partial(tvae_core.data.load_corpus, cache_dir=root / "data-cache"))
        yield train_or_load(tiny_config(corpus, "ae", max_steps=40), root / "runs", progress=False, device="cpu")


# ------------------------------------------------------------------------------------ measures
@pytest.mark.parametrize("predicted,expected", [
    ([5, 6, 7, 3], 1.0),       # identical
    ([6, 7, 3], 0.0),          # shifted by one: nothing lines up
    ([5, 6, 3], 0.5),          # shorter, [EOS] early: 5 6 right, 7 and [EOS] wrong
    ([5, 6], 0.5),             # shorter, cut: the missing positions are wrong
    ([5, 6, 7, 8, 3], 0.75),   # longer: no [EOS] where the reference has it
    ([], 0.0),
])
def test_token_accuracy_exact_values(predicted, expected):
    assert token_accuracy([5, 6, 7, 3], predicted) == expected


def test_token_accuracy_refuses_an_empty_reference():
    with pytest.raises(ValueError, match="reference_ids"):
        token_accuracy([], [3])


def test_distinct_outputs_counts_different_strings():
    assert distinct_outputs(["a b", "a b", "c", "a  b"]) == 3
    assert distinct_outputs([]) == 0


# ------------------------------------------------------------------------------------ reconstruct
@pytest.mark.parametrize("reference,candidate,expected", [
    ("the cat sat", "the cat sat", 1.0),
    ("the cat sat", "sat the cat", 1.0),           # order-free
    ("the cat sat on the mat", "a cat", 0.2),      # 1 of 5 distinct words
    ("the cat", "dog", 0.0),
    ("", "dog", 0.0),
])
def test_word_overlap_exact_values(reference, candidate, expected):
    assert word_overlap(reference, candidate) == pytest.approx(expected)


def test_overlap_against_chance_known_answers():
    # every matched pair identical, every chance pair disjoint: 1 against 0, clearly above chance
    same = [("a b", "a b"), ("c d", "c d"), ("e f", "e f")]
    other = [("a b", "c d"), ("c d", "e f"), ("e f", "a b")]
    result = overlap_against_chance(same, other)
    assert (result.matched, result.chance, result.difference, result.standard_error) == (1.0, 0.0, 1.0, 0.0)
    assert result.above_chance and result.num_pairs == 3
    # one decoding for every input (collapse): matched and chance overlaps alike, not above chance
    collapsed = overlap_against_chance([("a b", "a x"), ("a c", "a x")], [("a c", "a x"), ("a b", "a x")])
    assert collapsed.difference == 0.0 and not collapsed.above_chance
    # differences 0.5 and 0: mean 0.25, SE = std([0.5, 0]) / sqrt(2) = 0.25, not above 2 SE
    mixed = overlap_against_chance([("a b", "a"), ("c d", "x")], [("a b", "x"), ("c d", "x")])
    assert mixed.difference == pytest.approx(0.25) and mixed.standard_error == pytest.approx(0.25)
    assert not mixed.above_chance
    single = overlap_against_chance([("a", "a")], [("a", "b")])
    assert single.standard_error == float("inf") and not single.above_chance
    with pytest.raises(ValueError, match="same"):
        overlap_against_chance(same, other[:2])


def test_length_correlation_known_answers():
    originals = ["a", "a b", "a b c"]
    assert length_correlation(originals, ["x", "x y", "x y z"]) == pytest.approx(1.0)
    assert length_correlation(originals, ["x y z", "x y", "x"]) == pytest.approx(-1.0)
    assert torch.isnan(torch.tensor(length_correlation(originals, ["x y"] * 3)))  # one length: undefined
    with pytest.raises(ValueError, match="at least two"):
        length_correlation(["a"], ["b"])


def test_nearest_neighbours_known_answers():
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    queries = torch.tensor([[0.9, 0.1], [0.0, 2.0]])
    assert nearest_neighbours(queries, keys, k=2).tolist() == [[1, 3], [2, 0]]  # tie: lower index first
    assert nearest_neighbours(keys, keys).squeeze(1).tolist() == [0, 1, 2, 1]   # a point is its own nearest
    with pytest.raises(ValueError, match="k="):
        nearest_neighbours(queries, keys, k=5)
    with pytest.raises(ValueError, match="accepted"):
        nearest_neighbours(queries, keys[:, :1])


def test_posterior_means_are_the_encoders_means_in_input_order(vocab):
    model = fresh_model(vocab, "memory")
    sentences = [SENTENCE_A, SENTENCE_B, "the dog"]
    together = posterior_means(model, sentences, vocab=vocab, batch_size=2)
    assert together.shape == (3, model.latent_dim) and together.device.type == "cpu"
    for i, sentence in enumerate(sentences):
        assert torch.allclose(posterior_means(model, [sentence], vocab=vocab)[0], together[i], atol=1e-5)


def test_reconstructions_of_a_trained_run(trained_run):
    results = reconstruct(trained_run, [SENTENCE_A, SENTENCE_B, "dog"])
    assert len(results) == 3 and all(isinstance(r, Reconstruction) for r in results)
    assert [r.input_text for r in results] == [SENTENCE_A, SENTENCE_B, "dog"]
    for r in results:
        assert isinstance(r.output_text, str) and 0.0 <= r.token_accuracy <= 1.0
        assert r.token_accuracy == token_accuracy(r.input_ids[1:], r.output_ids)
        assert r.output_text == trained_run.vocab.decode(r.output_ids)
        assert len(r.output_ids) <= trained_run.config.data.max_length - 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        results[0].token_accuracy = 1.0
    # the same sentences given as [BOS] .. [EOS] ids give the same result
    ids = [list(r.input_ids) for r in results]
    assert reconstruct(trained_run, ids) == results


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_reconstruct_supports_every_injection(vocab, injection):
    model = fresh_model(vocab, injection)
    results = reconstruct(model, [SENTENCE_A, SENTENCE_B], vocab=vocab, max_new_tokens=12)
    assert len(results) == 2
    # greedy decoding from z = mu(x), computed here by hand
    from tvae_core.data import collate

    mu = model.encode(collate([list(r.input_ids) for r in results], vocab.pad_id)).loc
    assert [list(r.output_ids) for r in results] == model.generate(mu, 12, greedy=True)
    for r in results:
        assert 1 <= len(r.output_ids) <= 12


def test_reconstruct_is_reproducible_with_a_seeded_generator(vocab):
    model = fresh_model(vocab, "both")

    def draw(seed):
        return reconstruct(model, [SENTENCE_A, SENTENCE_B] * 3, vocab=vocab, use_mean=False, greedy=False,
                           max_new_tokens=10, generator=torch.Generator().manual_seed(seed))

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_reconstruct_batches_in_input_order(vocab):
    model = fresh_model(vocab, "both")
    sentences = [SENTENCE_B, "dog", SENTENCE_A, "red log"]
    together = reconstruct(model, sentences, vocab=vocab, max_new_tokens=10)
    one_by_one = reconstruct(model, sentences, vocab=vocab, max_new_tokens=10, batch_size=1)
    assert [r.input_text for r in together] == sentences
    assert [r.output_ids for r in together] == [r.output_ids for r in one_by_one]


# ------------------------------------------------------------------------------------ sample
def test_sample_from_the_prior_is_reproducible(trained_run, vocab):
    samples = sample(trained_run, 4, generator=torch.Generator().manual_seed(0))
    assert len(samples) == 4 and all(isinstance(s, str) for s in samples)
    assert samples == sample(trained_run, 4, generator=torch.Generator().manual_seed(0))
    model = fresh_model(vocab, "both")
    draws = [sample(model, 6, vocab=vocab, max_new_tokens=10, generator=torch.Generator().manual_seed(seed))
             for seed in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]


# ------------------------------------------------------------------------------------ interpolate
def test_homotopy_endpoints_are_the_greedy_reconstructions(trained_run):
    homotopy = interpolate(trained_run, SENTENCE_A, SENTENCE_B, num_steps=5)
    assert isinstance(homotopy, Homotopy)
    assert homotopy.steps == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(homotopy.sentences) == len(homotopy.output_ids) == 5
    assert (homotopy.sentence_a, homotopy.sentence_b) == (SENTENCE_A, SENTENCE_B)
    ends = reconstruct(trained_run, [SENTENCE_A, SENTENCE_B])
    assert homotopy.output_ids[0] == ends[0].output_ids and homotopy.output_ids[-1] == ends[1].output_ids
    assert homotopy.sentences[0] == ends[0].output_text and homotopy.sentences[-1] == ends[1].output_text


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_homotopy_counts_its_distinct_sentences(vocab, injection):
    model = fresh_model(vocab, injection)
    homotopy = interpolate(model, SENTENCE_A, SENTENCE_B, num_steps=9, vocab=vocab, max_new_tokens=10)
    assert homotopy.num_distinct == len(set(homotopy.sentences)) == distinct_outputs(homotopy.sentences)
    assert 1 <= homotopy.num_distinct <= 9
    ends = reconstruct(model, [SENTENCE_A, SENTENCE_B], vocab=vocab, max_new_tokens=10)
    assert (homotopy.output_ids[0], homotopy.output_ids[-1]) == (ends[0].output_ids, ends[1].output_ids)


def test_a_homotopy_across_the_decoder_passes_through_more_than_one_sentence(vocab):
    """The count is not stuck at 1: with mu(a) and mu(b) spread apart (the posterior head scaled
    up; seeded, so the same sentences every run) the path decodes at least two sentences."""
    model = fresh_model(vocab, "embedding")
    with torch.no_grad():
        model.posterior_head.weight.mul_(10)
    homotopy = interpolate(model, SENTENCE_A, SENTENCE_B, num_steps=9, vocab=vocab, max_new_tokens=10)
    assert homotopy.num_distinct >= 2


# ------------------------------------------------------------------------------------ refusals
def test_the_language_model_samples_but_refuses_reconstruction_and_homotopies(vocab):
    lm = fresh_model(vocab, "none")
    samples = sample(lm, 3, vocab=vocab, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert len(samples) == 3
    with pytest.raises(ValueError, match="injection='none'"):
        reconstruct(lm, [SENTENCE_A], vocab=vocab)
    with pytest.raises(ValueError, match="injection='none'"):
        interpolate(lm, SENTENCE_A, SENTENCE_B, vocab=vocab)


@pytest.mark.parametrize("call,match", [
    (lambda m, v: reconstruct(m, [], vocab=v), "sentences"),
    (lambda m, v: reconstruct(m, SENTENCE_A, vocab=v), "sentences"),
    (lambda m, v: reconstruct(m, [SENTENCE_A]), "vocab"),
    (lambda m, v: reconstruct(m, [[5, 6, 7]], vocab=v), r"sentences\[0\]"),
    (lambda m, v: reconstruct(m, [3.5], vocab=v), r"sentences\[0\]"),
    (lambda m, v: reconstruct(m, [SENTENCE_A], vocab=v, batch_size=0), "batch_size"),
    (lambda m, v: reconstruct("runs/abc", [SENTENCE_A], vocab=v), "run_or_model"),
    (lambda m, v: sample(m, 0, vocab=v), "num_sentences"),
    (lambda m, v: sample(m, 2), "vocab"),
    (lambda m, v: interpolate(m, SENTENCE_A, SENTENCE_B, num_steps=1, vocab=v), "num_steps"),
    (lambda m, v: interpolate(m, SENTENCE_A, SENTENCE_B, num_steps=2.5, vocab=v), "num_steps"),
])
def test_bad_inputs_fail_early_naming_the_parameter(vocab, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(fresh_model(vocab, "both"), vocab)


# ------------------------------------------------------------------------------------ load_run_dir
def test_load_run_dir_round_trip(trained_run):
    again = load_run_dir(trained_run.path, device="cpu")
    assert again.config == trained_run.config and again.metrics == trained_run.metrics
    for (name, a), (_, b) in zip(trained_run.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert reconstruct(again, [SENTENCE_A]) == reconstruct(trained_run, [SENTENCE_A])


def test_load_run_dir_refuses_folders_that_are_not_runs(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_run_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*lacks config\.json"):
        load_run_dir(tmp_path / "empty")
    renamed = tmp_path / "my-run"
    shutil.copytree(trained_run.path, renamed)
    with pytest.raises(ValueError, match=f"my-run.*{trained_run.config.key}"):
        load_run_dir(renamed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"data": {}}')
    with pytest.raises(ValueError, match=r"broken.config\.json"):
        load_run_dir(broken)
