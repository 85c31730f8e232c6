"""The evaluation's per-sentence ELBO and IW bound: each value belongs to its sentence in the
split's order (the IW bound runs shortest sentence first), their means are the published bounds,
and two runs are compared sentence by sentence only on the same sentences
(tvae_core.analysis.iw_difference, elbo_difference)."""
import dataclasses
import math

import pytest
import torch

from helpers import tiny_config, write_corpus
from tvae_core.analysis import B_BELOW_A, NOT_SEPARABLE, iw_difference
from tvae_core.build import build_model, training_corpus
from tvae_core.evaluation import evaluate_model
from tvae_core.profiles import get_profile

SIZE = dataclasses.replace(get_profile("smoke").estimators, iw_num_samples=1, iw_max_sentences=12, batch_size=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    config = tiny_config(corpus, "lm", injection="none")
    data = training_corpus(config)
    torch.manual_seed(0)
    lm = build_model(config, data.vocab).eval()
    sequences = data.token_ids("train")[:40]
    assert len({len(s) for s in sequences[:SIZE.iw_max_sentences]}) > 2   # the sort reorders them
    return lm, sequences, data.vocab.pad_id


def _evaluate(model, sequences, pad_id, size=SIZE):
    result, _ = evaluate_model(model, sequences, pad_id, size, progress=False)
    return result


def test_each_iw_value_is_its_sentences_exact_log_likelihood_in_the_splits_order(setup):
    """A model without a latent has exact importance weights at K = 1: the value stored for
    sentence i is log p(x_i), the same as that sentence evaluated alone; the values' mean and
    standard error are the published bound and its error."""
    lm, sequences, pad_id = setup
    result = _evaluate(lm, sequences, pad_id)
    values = result.iw_log_likelihood_per_sentence
    assert len(values) == result.iw_num_sentences == SIZE.iw_max_sentences
    one = dataclasses.replace(SIZE, iw_max_sentences=1)   # the IW bound on the first sentence only
    alone = [_evaluate(lm, [sequences[i], sequences[i + 1]], pad_id, one) for i in (0, 5, 11)]
    for i, single in zip((0, 5, 11), alone):
        assert values[i] == pytest.approx(single.iw_log_likelihood, abs=1e-4)
    assert sum(values) / len(values) == pytest.approx(result.iw_log_likelihood, abs=1e-9)
    assert torch.tensor(values, dtype=torch.float64).std() / math.sqrt(len(values)) == \
        pytest.approx(result.iw_log_likelihood_se, rel=1e-9)
    # the ELBO per sentence: the whole split, in its order; without a latent it is log p(x) too
    elbos = result.elbo_per_sentence
    assert len(elbos) == result.num_sentences == len(sequences)
    assert sum(elbos) / len(elbos) == pytest.approx(result.elbo, abs=1e-9)
    assert elbos[:len(values)] == pytest.approx(values, abs=1e-4)


def test_a_permuted_split_permutes_the_values_and_is_not_paired_with_the_original(setup):
    lm, sequences, pad_id = setup
    first = sequences[:SIZE.iw_max_sentences]
    order = list(reversed(range(len(first))))
    straight = _evaluate(lm, first, pad_id)
    permuted = _evaluate(lm, [first[i] for i in order], pad_id)
    assert permuted.iw_log_likelihood_per_sentence == \
        pytest.approx([straight.iw_log_likelihood_per_sentence[i] for i in order], abs=1e-5)
    assert permuted.sentences_sha256 != straight.sentences_sha256
    with pytest.raises(ValueError, match="different sentences"):
        iw_difference(straight, permuted)


def test_a_model_against_itself_and_against_a_worse_copy(setup):
    """The same model twice: difference 0, standard error 0, not separable. A copy that puts
    probability on the padding token loses likelihood on every sentence: the paired difference
    orders the two, its mean is the difference of the two bounds."""
    lm, sequences, pad_id = setup
    result = _evaluate(lm, sequences, pad_id)
    same = iw_difference(result, result)
    assert (same.mean, same.standard_error, same.num_sentences) == (0.0, 0.0, SIZE.iw_max_sentences)
    assert same.ordering() == NOT_SEPARABLE
    worse = _evaluate(_favouring_padding(lm, pad_id), sequences, pad_id)
    diff = iw_difference(result, worse)
    assert all(a > b for a, b in zip(result.iw_log_likelihood_per_sentence, worse.iw_log_likelihood_per_sentence))
    assert diff.mean > 0 and diff.ordering() == B_BELOW_A
    assert diff.mean == pytest.approx(result.iw_log_likelihood - worse.iw_log_likelihood, abs=1e-9)


def _favouring_padding(lm, pad_id):
    """A copy of ``lm`` whose output layer adds 2 to the padding token's logit everywhere: the
    padding token is never a target, so every target's log-softmax falls (its normaliser grows)."""
    import copy

    from tvae_core.model import _lm_head

    worse = copy.deepcopy(lm)
    head = _lm_head(worse.decoder)
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[pad_id] = 2.0
    worse.decoder.lm_head = biased
    return worse
