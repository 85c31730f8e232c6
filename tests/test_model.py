"""TransformerVAE: pooling, shapes, generation that keeps the latent, word dropout."""
import pytest
import torch

from tvae_core.config import ModelConfig
from tvae_core.data import collate
from tvae_core.model import TransformerVAE

INJECTIONS = ["memory", "embedding", "both", "none"]


def make_model(injection, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, latent_dim=4, injection=injection, dropout=0.0, **kw)
    model = TransformerVAE.from_scratch(cfg, 40, pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_length=24)
    # larger latent projections so z visibly changes the decoder's output
    with torch.no_grad():
        for name in ("latent_to_memory", "latent_to_embedding"):
            if hasattr(model, name):
                getattr(model, name).weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("injection", INJECTIONS)
def test_posterior_does_not_depend_on_padding_or_batch(injection):
    model = make_model(injection)
    alone = model.encode(collate([[2, 8, 9, 3]], 0))
    padded = model.encode(collate([[2, 5, 6, 7, 10, 11, 3], [2, 8, 9, 3]], 0))
    assert torch.allclose(alone.loc[0], padded.loc[1], atol=1e-5)
    assert torch.allclose(alone.scale[0], padded.scale[1], atol=1e-5)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_log_likelihood_shape_and_matches_full_logits(injection):
    model = make_model(injection)
    batch = collate([[2, 5, 6, 7, 3], [2, 8, 3]], 0)
    z = torch.randn(3, 2, 4)
    ll = model.log_likelihood(batch, z)
    assert ll.shape == (3, 2) and torch.all(ll < 0)
    # reference: full LM-head logits, masked by hand
    logits = model.decoder_logits(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1],
                                  z[1] if model.uses_latent else None)
    logp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    reference = (logp * batch["attention_mask"][:, 1:]).sum(-1)
    assert torch.allclose(ll[1], reference, atol=1e-4)


@pytest.mark.parametrize("injection", ["memory", "both"])
def test_memory_slot_is_read_with_sdpa_and_a_padded_batch(injection):
    """The shape path that broke under transformers 5.17 (its decoders take the cache as
    ``past_key_values``, not ``cache``; the slot was dropped and SDPA's mask, one column longer,
    no longer matched the keys): memory injection, SDPA, rows of different lengths. A padded row
    scores as it does alone, the slot moves log p(x|z), and eager attention agrees."""
    model = make_model(injection)
    assert model.decoder.config._attn_implementation == "sdpa"
    batch = collate([[2, 5, 6, 7, 10, 11, 3], [2, 8, 9, 3]], 0)
    z = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        padded = model.log_likelihood(batch, z)  # [S, B]
        alone = model.log_likelihood(collate([[2, 8, 9, 3]], 0), z[:, 1:])
        assert torch.allclose(padded[:, 1], alone[:, 0], atol=1e-4)
        assert (model.log_likelihood(batch, -z) - padded).abs().max() > 1e-2
        model.decoder.set_attn_implementation("eager")
        assert torch.allclose(model.log_likelihood(batch, z), padded, atol=1e-4)


def test_bfloat16_evaluation_stays_close_and_applies_only_without_gradients():
    """evaluation_dtype (an argument of log_likelihood, bound by at_precision for the estimators):
    float32 is the plain computation (no autocast warning); bfloat16 moves log p(x|z) a little
    without gradients and nothing while training (gradients on)."""
    import warnings

    model = make_model("both")
    batch = collate([[2, 5, 6, 7, 3], [2, 8, 9, 10, 11, 12, 3]], 0)
    z = torch.randn(3, 2, 4)
    with torch.no_grad():
        exact = model.log_likelihood(batch, z)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(model.log_likelihood(batch, z, evaluation_dtype=torch.float32), exact)
            assert torch.equal(model.at_precision("float32").log_likelihood(batch, z), exact)
        low = model.log_likelihood(batch, z, evaluation_dtype=torch.bfloat16)
        assert torch.equal(model.at_precision(torch.bfloat16).log_likelihood(batch, z), low)
        assert torch.equal(model.log_likelihood(batch, z), exact)  # the view left the model as it was
    assert 0 < (low - exact).abs().max() < 0.1
    # grad enabled: float32 whatever the argument
    assert torch.equal(model.log_likelihood(batch, z, evaluation_dtype=torch.bfloat16).detach(), exact)
    with pytest.raises(ValueError, match="evaluation_dtype='half'.*accepted values"):
        model.at_precision("half")


def test_train_config_lm_head_dtype_reaches_the_head_in_training_only():
    """build_model wires TrainConfig.lm_head_dtype to the head: with gradients, bfloat16 moves
    log p(x|z) a little (and back-propagates); without them the evaluation dtype rules."""
    from tvae_core.config import DataConfig, RunConfig, TrainConfig
    from tvae_core.data import Vocabulary, train_word_tokenizer
    from tvae_core.build import build_model

    vocab = Vocabulary.from_word_tokenizer(train_word_tokenizer(["the cat sat on the mat", "a dog ran"], 40))
    models = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        config = RunConfig(data=DataConfig(max_length=24),
                           model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, latent_dim=4, dropout=0.0),
                           train=TrainConfig(lm_head_dtype=dtype))
        models[dtype] = build_model(config, vocab).eval()
    assert models["float32"].training_head_dtype is None
    assert models["bfloat16"].training_head_dtype == torch.bfloat16
    ids = [vocab.bos_id, *vocab.encode("the cat sat on the mat"), vocab.eos_id]
    batch, z = collate([ids], vocab.pad_id), torch.randn(2, 1, 4)
    trained = {name: m.log_likelihood(batch, z) for name, m in models.items()}  # gradients on
    assert 0 < (trained["bfloat16"] - trained["float32"]).abs().max() < 0.1
    trained["bfloat16"].sum().backward()
    assert models["bfloat16"].decoder.lm_head.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(models["bfloat16"].log_likelihood(batch, z), models["float32"].log_likelihood(batch, z))


def test_scratch_decoder_uses_the_exact_gelu():
    assert make_model("both").decoder.config.activation_function == "gelu"


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_generation_keeps_the_latent_at_every_step(injection):
    """Incremental decoding with the KV cache must give the same logits as teacher forcing on the
    generated prefix, at every step (the thesis code lost the latent after the first step)."""
    model = make_model(injection)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 2
    ids, step_logits = model.generate(z, 10, greedy=True, return_logits=True)
    steps = step_logits.shape[1]
    prefix = [[2] + row + [0] * (steps - len(row)) for row in ids]
    inputs = torch.tensor(prefix)[:, :steps]
    full = model.decoder_logits(inputs, torch.ones_like(inputs), z)
    for row, generated in enumerate(ids):
        n = min(len(generated), steps)
        assert torch.allclose(step_logits[row, :n], full[row, :n], atol=1e-4)
    # and the latent matters at the last steps, not only the first one
    _, other_logits = model.generate(-z, 10, greedy=True, return_logits=True)
    assert (step_logits[:, -1] - other_logits[:, -1]).abs().max() > 1e-3


def test_decoder_only_generation_uses_the_kv_cache():
    """The LM's incremental decoding equals teacher forcing: the cache it builds step by step is
    read (passed under the name the installed transformers takes, ``cache`` or ``past_key_values``)."""
    model = make_model("none")
    ids, step_logits = model.generate(None, 8, greedy=True, num_sequences=2, return_logits=True)
    steps = step_logits.shape[1]
    inputs = torch.tensor([[2] + row + [0] * (steps - len(row)) for row in ids])[:, :steps]
    full = model.decoder_logits(inputs, torch.ones_like(inputs), None)
    for row, generated in enumerate(ids):
        n = min(len(generated), steps)
        assert torch.allclose(step_logits[row, :n], full[row, :n], atol=1e-4)


def test_decoder_only_lm_returns_prior_and_ignores_z():
    model = make_model("none")
    batch = collate([[2, 5, 6, 3]], 0)
    posterior = model.encode(batch)
    assert torch.equal(posterior.loc, torch.zeros(1, 4)) and torch.equal(posterior.scale, torch.ones(1, 4))
    ll = model.log_likelihood(batch, torch.randn(2, 1, 4))
    assert torch.allclose(ll[0], ll[1])
    assert len(model.generate(None, 5, num_sequences=3)) == 3


def test_word_dropout_one_removes_all_context_in_training():
    model = make_model("none", word_dropout=1.0).train()
    batch = collate([[2, 5, 6, 7, 3]], 0)
    other = collate([[2, 9, 10, 11, 3]], 0)
    # with every previous word replaced by UNK, the two sequences see identical inputs, so the
    # prediction of position t depends on nothing but t
    hid_a = model.decoder_hidden_states(model._word_dropout(batch["input_ids"][:, :-1]), batch["attention_mask"][:, :-1], None)
    hid_b = model.decoder_hidden_states(model._word_dropout(other["input_ids"][:, :-1]), other["attention_mask"][:, :-1], None)
    model.eval()
    assert torch.allclose(hid_a, hid_b)


def test_log_variance_is_bounded():
    model = make_model("both", logvar_bound=2.0)
    with torch.no_grad():
        model.posterior_head.bias.fill_(1e4)
    posterior = model.encode(collate([[2, 5, 3]], 0))
    assert torch.all(posterior.scale <= torch.exp(torch.tensor(1.0)) + 1e-5)


def test_generation_longer_than_the_decoder_positions_fails_early():
    model = make_model("both")
    with pytest.raises(ValueError, match="max_new_tokens=25 exceeds the decoder's 24 positions"):
        model.generate(torch.zeros(1, 4), 25)


def test_latent_projections_use_the_decoders_initialisation():
    """Zero biases; memory weights N(0, 0.02^2); embedding weights N(0, 0.02^2 / D), so that
    z ~ N(0, I) adds a vector of a token embedding's scale (PyTorch's default made it ~30x larger);
    with zero biases, z = 0 leaves the embedding-injected decoder the plain LM."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, latent_dim=16, injection="both", dropout=0.0)
    model = TransformerVAE.from_scratch(cfg, 40, pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_length=24).eval()
    for layer, std in ((model.latent_to_memory, 0.02), (model.latent_to_embedding, 0.02 / 4)):
        assert torch.all(layer.bias == 0)
        assert layer.weight.std().item() == pytest.approx(std, rel=0.2)
    token_scale = model.decoder.get_input_embeddings().weight.std().item()
    injected = model.latent_to_embedding(torch.randn(4000, 16)).std().item()
    assert injected == pytest.approx(token_scale, rel=0.2)
    embedding_only = TransformerVAE(cfg.__class__(**{**cfg.__dict__, "injection": "embedding"}), model.encoder,
                                    model.decoder, pad_id=0, bos_id=2, eos_id=3, unk_id=1).eval()
    batch = collate([[2, 5, 6, 7, 3]], 0)
    ids, mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    torch.testing.assert_close(embedding_only.decoder_logits(ids, mask, torch.zeros(1, 16)),
                               embedding_only.decoder_logits(ids, mask, None))


def test_encoder_depth_is_set_apart_from_the_decoder():
    """``encoder_layers`` sizes the scratch encoder only (the default profile's 1-layer encoder with a
    2-layer decoder); left unset, both have ``num_layers``."""
    cfg = ModelConfig(hidden_size=32, num_layers=2, encoder_layers=1, num_heads=2, latent_dim=4)
    model = TransformerVAE.from_scratch(cfg, 40, pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_length=24)
    assert len(model.encoder.encoder.layer) == 1 and model.decoder.config.n_layer == 2
    assert model._kv_shape[0] == 2  # the latent's memory slot goes into every decoder layer
    same = TransformerVAE.from_scratch(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, latent_dim=4), 40,
                                       pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_length=24)
    assert len(same.encoder.encoder.layer) == 2


def test_profiles_encoder_depth_reaches_the_runs_but_not_pretrained_ones():
    from tvae_core.experiments import method_config
    from tvae_core.experiments import pretrained_study
    from tvae_core.profiles import get_profile

    assert method_config("VAE", "default").model.encoder_layers == get_profile("default").model.encoder_layers == 1
    assert method_config("VAE", "smoke").model.encoder_layers is None
    assert all(cfg.model.encoder_layers is None for cfg in pretrained_study("default").values())


@pytest.mark.parametrize("injection", INJECTIONS)
def test_save_pretrained_and_from_pretrained_round_trip(injection, tmp_path):
    model = make_model(injection)
    batch = collate([[2, 5, 6, 7, 3], [2, 8, 3]], 0)
    z = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "vae")
    assert {p.name for p in (tmp_path / "vae").iterdir()} == {"config.json", "model.safetensors"}
    loaded = TransformerVAE.from_pretrained(tmp_path / "vae")
    assert not loaded.training and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.log_likelihood(batch, z), model.log_likelihood(batch, z))
        assert torch.equal(loaded.encode(batch).loc, model.encode(batch).loc)


def test_from_pretrained_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="save_pretrained"):
        TransformerVAE.from_pretrained(tmp_path)


def test_runs_live_in_the_checkout_or_the_user_cache_never_in_site_packages(tmp_path, monkeypatch):
    from pathlib import Path

    import tvae_core.data as data

    checkout = Path(data.__file__).resolve().parent.parent
    assert data.default_data_dir() == checkout / "data"
    # the same module file inside an installed tree (no pyproject.toml beside the package)
    site = tmp_path / "site-packages" / "tvae_core"
    site.mkdir(parents=True)
    monkeypatch.setattr(data, "__file__", str(site / "data.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.default_data_dir() == tmp_path / "cache" / "tvae_core"
