"""The TransformerVAE: a Hugging Face transformer encoder with a Gaussian head, and a Hugging Face
causal LM decoder that reads the latent Optimus-style (Li et al., 2020).

    q(z|x) = N(mu(x), diag sigma^2(x)),   p(z) = N(0, I),   p(x|z) = prod_t p(x_t | x_<t, z)

Latent injection (``ModelConfig.injection``):

* ``memory``: z -> one extra key/value slot per decoder layer, prepended to the KV cache, so every
  position can attend to it (sized to the decoder: ``num_key_value_heads x head_dim``, which covers
  grouped-query attention). Positions of the words are not shifted by the slot.
* ``embedding``: z -> a vector added to every input token embedding.
* ``both``: the two together (Optimus' default).
* ``none``: the decoder-only language model. ``encode`` then returns the prior, so the ELBO is
  exactly log p(x) and every estimator still applies.

Pooling: ``mean`` averages the encoder's last hidden states over *real* tokens only (the thesis
code pooled the last padded position, making q(z|x) depend on the batch); ``first`` takes the
``[BOS]``/``[CLS]`` position.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from .config import ModelConfig
from .lm_head import linear_cross_entropy
from .protocols import standard_normal_prior


def decoder_geometry(config) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of any HF causal-LM config: the shape of the
    latent's memory slot per layer (grouped-query attention shares a key/value head between several
    query heads)."""
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_layers, kv_heads, head_dim


_OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "camembert")


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The name under which ``model_class.forward`` takes a KV cache: ``cache`` in newer
    transformers 5.x, ``past_key_values`` before (5.17 has only the old name, 5.24 only the new
    one, the old kept as a deprecated alias). Passed under the wrong name the cache falls into
    ``**kwargs`` unused, the memory slot silently disappears, and the mask (one column longer for
    the slot) no longer matches the keys: SDPA fails with "size ... (34) must match ... (35)"."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _lm_head(decoder) -> nn.Module:
    """The decoder's whole LM head: hidden states -> logits. For GPT-2 and Llama that is the
    output embedding; RoBERTa's and BERT's heads add a dense layer and a layer norm before it."""
    for name in ("lm_head", "cls"):
        head = getattr(decoder, name, None)
        if isinstance(head, nn.Module):
            return head
    return decoder.get_output_embeddings()


def build_scratch_encoder(config: ModelConfig, vocab_size: int, pad_id: int, max_length: int):
    from transformers import BertConfig, BertModel

    depth = config.encoder_layers or config.num_layers
    bert_config = BertConfig(vocab_size=vocab_size, hidden_size=config.hidden_size,
                             num_hidden_layers=depth, num_attention_heads=config.num_heads,
                             intermediate_size=4 * config.hidden_size, max_position_embeddings=max_length,
                             hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
                             pad_token_id=pad_id)
    return BertModel(bert_config, add_pooling_layer=False)


def build_scratch_decoder(config: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                          max_length: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2_config = GPT2Config(vocab_size=vocab_size, n_embd=config.hidden_size, n_layer=config.num_layers,
                             n_head=config.num_heads, n_positions=max_length, resid_pdrop=config.dropout,
                             embd_pdrop=config.dropout, attn_pdrop=config.dropout, bos_token_id=bos_id,
                             eos_token_id=eos_id, pad_token_id=pad_id,
                             # the exact (erf) GELU of BERT/RoBERTa, the thesis's models; GPT-2's
                             # tanh form costs 4.4x more per element in bfloat16 on CPU (its tanh
                             # kernel), and its 8-op "gelu_new" default ~25% of an IW evaluation
                             activation_function="gelu")
    return GPT2LMHeadModel(gpt2_config)


class TransformerVAE(nn.Module):
    """Implements :class:`tvae_core.protocols.LatentVariableModel`.

    Batches: ``input_ids`` / ``attention_mask`` [B, T] hold ``[BOS] w_1..w_n [EOS]`` in the
    decoder's vocabulary; optional ``encoder_input_ids`` / ``encoder_attention_mask`` when the
    encoder has its own tokenizer (pretrained encoders).

    ``fuse_lm_head`` (default True) computes a plain linear LM head and its cross-entropy in
    blocks (:mod:`tvae_core.lm_head`) also when training; False trains with the unfused
    computation (kept for comparison, ``benchmarks/bench_core.py``). Evaluation without gradients
    uses the blocked head unless ``fuse_lm_head_in_evaluation`` is False; it bounds the memory.
    Both give the same numbers to float rounding. Measured with a blocked backward pass that
    recomputed each block's logits, blocking was a win when the head is memory-bound (hidden 64:
    1.4x per training step) and a loss when it is compute-bound (SmolLM2, hidden 576: 4.03 vs
    3.60 s per step, ``benchmarks/bench_pretrained.py``), so pretrained models train unfused. The
    blocked head now keeps its logits for the backward pass; that comparison has not been repeated.
    """

    fuse_lm_head: bool = True
    fuse_lm_head_in_evaluation: bool = True

    def __init__(self, config: ModelConfig, encoder: nn.Module | None, decoder: nn.Module, *,
                 pad_id: int, bos_id: int, eos_id: int, unk_id: int,
                 training_head_dtype: torch.dtype | None = None, training_head_native: bool = False):
        """``training_head_dtype`` (None: float32): the dtype of the blocked LM head's matmuls in
        training; its log-softmax, the target logits and the weight-gradient sums stay float32.
        ``training_head_native``: train the blocked head with the compiled kernels of
        :mod:`tvae_core.native` (the same numbers to float rounding). Both need the blocked head (a
        plain linear head, ``fuse_lm_head``); :func:`tvae_core.build.build_model` passes them from
        ``TrainConfig.lm_head_dtype`` / ``lm_head_kernel`` (part of the run's key)."""
        super().__init__()
        self.config = config
        self.latent_dim = config.latent_dim
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id
        self.decoder = decoder
        self.uses_latent = config.injection != "none"
        if self.uses_latent:
            if encoder is None:
                raise ValueError(f"model.injection={config.injection!r} needs an encoder")
            self.encoder = encoder
            self.posterior_head = nn.Linear(encoder.config.hidden_size, 2 * config.latent_dim)
        num_layers, kv_heads, head_dim = decoder_geometry(decoder.config)
        self._kv_shape = (num_layers, 2, kv_heads, head_dim)
        # RoBERTa-family decoders number positions from padding_idx + 1 (pretrained that way)
        self._position_offset = ((decoder.config.pad_token_id or 0) + 1
                                 if decoder.config.model_type in _OFFSET_POSITION_MODELS else 0)
        if config.injection in ("memory", "both"):
            self.latent_to_memory = nn.Linear(config.latent_dim, num_layers * 2 * kv_heads * head_dim)
        if config.injection in ("embedding", "both"):
            self.latent_to_embedding = nn.Linear(config.latent_dim, decoder.config.hidden_size)
        self.init_latent_projections(getattr(decoder.config, "initializer_range", 0.02))
        refused = []
        if training_head_dtype not in (None, torch.float32):
            name = str(training_head_dtype).removeprefix("torch.")
            refused.append(f"train.lm_head_dtype={name!r} (accepted value here: 'float32')")
        if training_head_native:
            refused.append("train.lm_head_kernel='native' (accepted value here: 'torch')")
        if refused and not self.trains_blocked_lm_head:
            raise ValueError(f"{' and '.join(refused)}: needs the blocked LM head (a plain linear head, "
                             "fuse_lm_head=True); this model trains its head unfused")
        self.training_head_dtype = None if training_head_dtype == torch.float32 else training_head_dtype
        self.training_head_native = training_head_native

    def init_latent_projections(self, std: float = 0.02) -> None:
        """Start z's influence at the scale of what it is added to, with zero biases (``std``: the
        decoder's ``initializer_range``, 0.02 for GPT-2, BERT and Llama).

        * z -> embedding: weights N(0, std^2 / D), so for z ~ N(0, I_D) the added vector has a
          token embedding's per-component std (``std``). With N(0, std^2) weights it was sqrt(D)
          = 5.7x larger (norm 0.87 vs 0.16 at the default size), with PyTorch's default init ~30x.
          Measured (default profile, 600 steps, whole PTB test split / IW K = 500 on 100
          sentences): the collapsed VAE's IW bound -126.67 -> -125.38 nats (the LM: -124.44), FB 16
          at the same rate (12.48 -> 12.51 nats) -134.25 -> -130.27. The larger init adds noise
          5.7x the size of the words' embeddings at the start, and 600 steps do not recover.
        * z -> memory: weights N(0, std^2): the slot's keys and values then have about the scale of
          the decoder's own (per-component std 0.11 vs 0.16 at the default size). Scaling these
          by 1/sqrt(D) too moved the same two numbers by only 0.2 and 0.13 nats (measured).

        With zero biases, z = 0 leaves the embedding path exactly the plain LM; the memory slot's key
        and value are then 0, and the slot still takes a share exp(0) / (exp(0) + sum_j exp(s_j)) of
        every attention row, which dilutes attention slightly."""
        with torch.no_grad():
            for name, scale in (("latent_to_memory", std), ("latent_to_embedding", std / self.latent_dim ** 0.5)):
                layer = getattr(self, name, None)
                if layer is not None:
                    layer.weight.normal_(0.0, scale)
                    layer.bias.zero_()

    @classmethod
    def from_scratch(cls, config: ModelConfig, vocab_size: int, *, pad_id: int, bos_id: int, eos_id: int,
                     unk_id: int, max_length: int, **head_options) -> "TransformerVAE":
        """A small encoder and decoder built from ``config`` (``head_options``: the training-head
        arguments of ``__init__``)."""
        encoder = None
        if config.injection != "none":
            encoder = build_scratch_encoder(config, vocab_size, pad_id, max_length)
        decoder = build_scratch_decoder(config, vocab_size, pad_id, bos_id, eos_id, max_length)
        return cls(config, encoder, decoder, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id,
                   **head_options)

    def at_precision(self, evaluation_dtype: torch.dtype | str | None) -> "PrecisionView":
        """This model for gradient-free estimators with its decoder at ``evaluation_dtype`` (see
        :meth:`log_likelihood`); the model itself is not changed."""
        return PrecisionView(self, evaluation_dtype)

    # ------------------------------------------------------------------ inference network
    def encode(self, batch: dict[str, torch.Tensor]) -> Normal:
        """q(z|x) with batch shape [B, D]; the prior itself for the decoder-only LM."""
        ids = batch.get("encoder_input_ids", batch["input_ids"])
        mask = batch.get("encoder_attention_mask", batch["attention_mask"])
        if not self.uses_latent:
            prior = standard_normal_prior(self.latent_dim, device=ids.device)
            return Normal(prior.loc.expand(ids.shape[0], -1), prior.scale.expand(ids.shape[0], -1),
                          validate_args=False)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        if self.config.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, H]
        else:
            pooled = hidden[:, 0]
        # the Gaussian's parameters in float32 also under mixed precision: the rate (and the MDR
        # constraint on it) is a sum of D small KL terms that bfloat16 would round visibly
        device_type = pooled.device.type
        with torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
                else nullcontext():
            loc, raw_logvar = self.posterior_head(pooled.float()).chunk(2, dim=-1)  # [B, D] each
            bound = self.config.logvar_bound
            logvar = bound * torch.tanh(raw_logvar / bound)  # soft clamp to [-bound, bound]
            # positive by construction; validating would read the scale back to the host (a device
            # synchronisation per call on a GPU). A non-finite value stops training (tvae_core.train)
            return Normal(loc, torch.exp(0.5 * logvar), validate_args=False)

    def sample_latent(self, posterior: Normal, num_samples: int = 1) -> torch.Tensor:
        """Reparameterised z ~ q(z|x): [S, B, D] (the mean, repeated, for a deterministic encoder)."""
        if self.config.deterministic_encoder:
            return posterior.loc.unsqueeze(0).expand(num_samples, -1, -1)
        return posterior.rsample((num_samples,))

    # ------------------------------------------------------------------ generative network
    def _memory_cache(self, z: torch.Tensor):
        """A KV cache whose only entry per layer is the latent's memory slot. z: [N, D]."""
        from transformers import DynamicCache

        num_layers, _, kv_heads, head_dim = self._kv_shape
        memory = self.latent_to_memory(z).view(z.shape[0], num_layers, 2, kv_heads, 1, head_dim)
        cache = DynamicCache(config=self.decoder.config)
        for layer in range(num_layers):
            cache.update(memory[:, layer, 0], memory[:, layer, 1], layer)  # [N, kv, 1, head_dim]
        return cache

    def _decoder_inputs(self, input_ids: torch.Tensor, z: torch.Tensor | None):
        embeds = self.decoder.get_input_embeddings()(input_ids)  # [N, T, H]
        if z is not None and self.config.injection in ("embedding", "both"):
            embeds = embeds + self.latent_to_embedding(z).unsqueeze(1)
        return embeds

    def _decoder_call(self, module, input_ids, attention_mask, z):
        n, length = input_ids.shape
        cache = None
        if z is not None and self.config.injection in ("memory", "both"):
            cache = self._memory_cache(z)
            attention_mask = torch.cat([attention_mask.new_ones(n, 1), attention_mask], dim=1)
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(n, -1) + self._position_offset
        return module(inputs_embeds=self._decoder_inputs(input_ids, z), attention_mask=attention_mask,
                      position_ids=positions, use_cache=False, **{_cache_argument(type(module)): cache})

    def decoder_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       z: torch.Tensor | None) -> torch.Tensor:
        """Teacher-forced logits [N, T, V] for decoder inputs [N, T] given z [N, D]."""
        return self._decoder_call(self.decoder, input_ids, attention_mask, z).logits

    def decoder_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              z: torch.Tensor | None) -> torch.Tensor:
        """Last hidden states [N, T, H] of the decoder's base model (no LM head)."""
        return self._decoder_call(self.decoder.base_model, input_ids, attention_mask, z).last_hidden_state

    def _word_dropout(self, inputs: torch.Tensor) -> torch.Tensor:
        rate = self.config.word_dropout
        if not self.training or rate <= 0:
            return inputs
        drop = torch.rand(inputs.shape, device=inputs.device) < rate
        drop[:, 0] = False  # [BOS] always stays
        return inputs.masked_fill(drop, self.unk_id)

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor, *,
                       evaluation_dtype: torch.dtype | None = None) -> torch.Tensor:
        """log p(x|z) in nats per sequence, summed over predicted tokens. z: [S, B, D] -> [S, B].

        The LM head (the most expensive layer: hidden x vocabulary) is applied to the real target
        positions only, never to padding; a plain linear head (GPT-2, Llama) is fused with the
        cross-entropy in cache-sized blocks (:mod:`tvae_core.lm_head`).

        ``evaluation_dtype`` (gradient-free calls only; None: float32 throughout): the dtype of the
        decoder's matmuls, the transformer's under autocast and the vocabulary matmul's; the target
        logits and every log-softmax stay float32. :meth:`at_precision` binds it for estimators.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        num_samples, batch_size = z.shape[0], ids.shape[0]
        inputs = self._word_dropout(ids[:, :-1]).repeat(num_samples, 1)  # [S*B, T-1]
        targets = ids[:, 1:].repeat(num_samples, 1)
        target_mask = mask[:, 1:].repeat(num_samples, 1).bool()
        latent = z.reshape(num_samples * batch_size, -1) if self.uses_latent else None  # [S*B, D]
        training = torch.is_grad_enabled()
        low_precision = evaluation_dtype
        if training or low_precision == torch.float32:
            low_precision = None
        head_dtype = self.training_head_dtype if training else low_precision
        # evaluation in low precision opens an autocast region; otherwise the caller's autocast
        # state holds (training under Accelerate's mixed precision keeps the decoder in it)
        with torch.autocast(ids.device.type, dtype=low_precision) if low_precision is not None else nullcontext():
            hidden = self.decoder_hidden_states(inputs, mask[:, :-1].repeat(num_samples, 1), latent)  # [S*B, T-1, H]
        if ids.device.type != "cpu":
            # on an accelerator the head reads every position and padding is masked out after:
            # selecting the real targets first needs their count on the host (a synchronisation)
            token_nll = self._token_nll(hidden.flatten(0, 1), targets.flatten(), training, head_dtype)
            nll = (token_nll.view_as(targets) * target_mask).sum(1)  # [S*B]
            return -nll.view(num_samples, batch_size)
        # on the CPU the head, most of the step, reads the real targets only, never padding
        token_nll = self._token_nll(hidden[target_mask], targets[target_mask], training, head_dtype)  # [M]
        rows = torch.arange(targets.shape[0], device=ids.device).unsqueeze(1).expand_as(targets)[target_mask]
        nll = torch.zeros(targets.shape[0], dtype=token_nll.dtype, device=ids.device).index_add(0, rows, token_nll)
        return -nll.view(num_samples, batch_size)

    def _token_nll(self, hidden: torch.Tensor, targets: torch.Tensor, training: bool, head_dtype) -> torch.Tensor:
        """-log p(target | hidden state) per row: hidden [M, H], targets [M] -> [M] (float32)."""
        head = _lm_head(self.decoder)
        if self._uses_blocked_lm_head(training):
            return linear_cross_entropy(hidden, head.weight, head.bias, targets, compute_dtype=head_dtype,
                                        native_training=training and self.training_head_native)
        # heads with a transform before the vocabulary projection (RoBERTa, BERT)
        return F.cross_entropy(head(hidden).float(), targets, reduction="none")

    def _uses_blocked_lm_head(self, training: bool) -> bool:
        """Whether the LM head is computed by :func:`tvae_core.lm_head.linear_cross_entropy` (a plain
        linear head, fused in this mode) or unfused (heads with a transform: RoBERTa, BERT)."""
        fused = self.fuse_lm_head if training else self.fuse_lm_head_in_evaluation
        return fused and isinstance(_lm_head(self.decoder), nn.Linear)

    @property
    def trains_blocked_lm_head(self) -> bool:
        """Whether training computes the LM head with :func:`tvae_core.lm_head.linear_cross_entropy`."""
        return self._uses_blocked_lm_head(training=True)

    def num_predicted_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["attention_mask"].sum(-1) - 1  # [BOS] is read, never predicted

    # ------------------------------------------------------------------ training terms
    def forward_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One-sample terms for the objectives: ``distortion`` [B] = -log p(x|z), z ~ q(z|x),
        ``kl_per_dim`` [B, D] = KL(q(z_d|x) || N(0, 1)) (analytic), and the posterior."""
        posterior = self.encode(batch)
        z = self.sample_latent(posterior, 1)  # [1, B, D]
        distortion = -self.log_likelihood(batch, z)[0]
        prior = standard_normal_prior(self.latent_dim, dtype=posterior.loc.dtype, device=posterior.loc.device)
        kl_per_dim = torch.distributions.kl_divergence(posterior, prior)  # [B, D]
        if not self.uses_latent:
            kl_per_dim = torch.zeros_like(kl_per_dim)
        return {"distortion": distortion, "kl_per_dim": kl_per_dim, "posterior": posterior}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, z: torch.Tensor | None, max_new_tokens: int = 40, *, greedy: bool = False,
                 temperature: float = 1.0, num_sequences: int | None = None,
                 generator: torch.Generator | None = None, return_logits: bool = False):
        """Ancestral (or greedy) decoding with a KV cache. The latent stays in the cache (memory)
        and is added to every new token's embedding (embedding), for every mechanism.

        z: [B, D] (or None for the LM, then ``num_sequences`` rows). Returns token ids without
        [BOS], cut after [EOS]; with ``return_logits`` also the per-step logits [N, steps, V]
        (before temperature and masking), which must equal teacher-forced logits (tested).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        limit = getattr(self.decoder.config, "max_position_embeddings", None) or \
            getattr(self.decoder.config, "n_positions", None)
        if limit is not None and max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the decoder's {limit} positions")
        device = next(self.parameters()).device
        if z is None or not self.uses_latent:
            n = num_sequences if z is None else z.shape[0]
            z = None
        else:
            n = z.shape[0]
            z = z.to(device)
        cache = None
        prefix = 0
        if z is not None and self.config.injection in ("memory", "both"):
            cache, prefix = self._memory_cache(z), 1
        tokens = torch.full((n, 1), self.bos_id, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        outputs, step_logits = [], []
        for step in range(max_new_tokens):
            attention = torch.ones(n, prefix + step + 1, dtype=torch.long, device=device)
            positions = torch.full((n, 1), step + self._position_offset, dtype=torch.long, device=device)
            if cache is None:
                from transformers import DynamicCache
                cache = DynamicCache(config=self.decoder.config)
            out = self.decoder(inputs_embeds=self._decoder_inputs(tokens, z), attention_mask=attention,
                               position_ids=positions, use_cache=True,
                               **{_cache_argument(type(self.decoder)): cache})
            step_logits.append(out.logits[:, -1].float())
            logits = out.logits[:, -1].float() / temperature  # [N, V]
            # pad and bos are never generated, unless they share eos's id (GPT-2: one
            # <|endoftext|> for all three), which must stay reachable
            for banned in {self.pad_id, self.bos_id} - {self.eos_id}:
                logits[:, banned] = -float("inf")
            if greedy:
                tokens = logits.argmax(-1, keepdim=True)
            else:
                # drawn on the generator's device: a CPU generator gives the same words on any device
                where = generator.device if generator is not None else device
                tokens = torch.multinomial(logits.softmax(-1).to(where), 1, generator=generator).to(device)
            tokens = torch.where(finished.unsqueeze(1), torch.full_like(tokens, self.pad_id), tokens)
            outputs.append(tokens)
            finished |= tokens.squeeze(1) == self.eos_id
            if finished.all():
                break
        ids = torch.cat(outputs, dim=1).tolist()
        result = []
        for row in ids:  # padding only follows eos (pad is banned above unless it is eos)
            result.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        if return_logits:
            return result, torch.stack(step_logits, dim=1)
        return result

    # ------------------------------------------------------------------ Hugging Face-style files
    PRETRAINED_CONFIG = "config.json"
    PRETRAINED_WEIGHTS = "model.safetensors"

    def save_pretrained(self, directory) -> Path:
        """Write ``config.json`` (the :class:`~tvae_core.config.ModelConfig`, the special token ids
        and the encoder's and decoder's own Hugging Face configs) and ``model.safetensors`` into
        ``directory``, the layout of ``PreTrainedModel.save_pretrained``; :meth:`from_pretrained`
        reads it back without the run's configuration or the original pretrained weights.
        Returns the directory."""
        from safetensors.torch import save_model

        if self.config.encoder == "shared":
            # the encoder is the decoder's own network: rebuilding it from two configs would
            # silently untie the weights
            raise ValueError("save_pretrained does not support model.encoder='shared'; accepted: an encoder "
                             "of its own ('scratch' or a Hugging Face id/path)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "model_type": "tvae_core.TransformerVAE",
            "model_config": dataclasses.asdict(self.config),
            "special_ids": {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
                            "unk_id": self.unk_id},
            "encoder_config": self.encoder.config.to_dict() if self.uses_latent else None,
            "decoder_config": self.decoder.config.to_dict(),
        }
        (directory / self.PRETRAINED_CONFIG).write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
        save_model(self, str(directory / self.PRETRAINED_WEIGHTS))  # tied tensors stored once
        return directory

    @classmethod
    def from_pretrained(cls, directory, device: str = "cpu") -> "TransformerVAE":
        """The model :meth:`save_pretrained` wrote to ``directory``, in evaluation mode. The encoder
        and decoder are rebuilt from their stored Hugging Face configs (``AutoModel`` /
        ``AutoModelForCausalLM.from_config``), so no hub access is needed."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from .config import ModelConfig

        directory = Path(directory)
        payload = json.loads((directory / cls.PRETRAINED_CONFIG).read_text())
        if payload.get("model_type") != "tvae_core.TransformerVAE":
            raise ValueError(f"{directory / cls.PRETRAINED_CONFIG} was not written by TransformerVAE.save_pretrained")
        config = ModelConfig(**payload["model_config"])

        def hf_config(stored: dict):
            stored = dict(stored)
            return AutoConfig.for_model(stored.pop("model_type"), **stored)

        from safetensors import safe_open

        with safe_open(str(directory / cls.PRETRAINED_WEIGHTS), framework="pt") as handle:
            stored_names = list(handle.keys())
        encoder = None
        if payload["encoder_config"] is not None:
            kwargs = {}
            if payload["encoder_config"].get("model_type") in ("bert", "roberta"):
                # scratch encoders are built without BERT's pooler; pretrained ones may have it
                kwargs["add_pooling_layer"] = any(n.startswith("encoder.pooler.") for n in stored_names)
            encoder = AutoModel.from_config(hf_config(payload["encoder_config"]), **kwargs)
        decoder = AutoModelForCausalLM.from_config(hf_config(payload["decoder_config"]))
        model = cls(config, encoder, decoder, **payload["special_ids"])
        load_model(model, str(directory / cls.PRETRAINED_WEIGHTS), strict=True, device=device)
        return model.eval()



class PrecisionView:
    """A :class:`TransformerVAE` seen by the estimators (:class:`tvae_core.protocols.LatentVariableModel`)
    with its decoder's evaluation precision bound: ``log_likelihood`` runs at ``evaluation_dtype``
    (None: float32), everything else is the model's own. Build it with
    :meth:`TransformerVAE.at_precision`; the model keeps no precision state of its own."""

    def __init__(self, model: TransformerVAE, evaluation_dtype: torch.dtype | str | None):
        if isinstance(evaluation_dtype, str):
            if evaluation_dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"evaluation_dtype={evaluation_dtype!r}; accepted values: 'float32', 'bfloat16', "
                                 "'float16' or a torch.dtype")
            evaluation_dtype = getattr(torch, evaluation_dtype)
        self.model = model
        self.evaluation_dtype = evaluation_dtype
        self.latent_dim = model.latent_dim
        self.uses_latent = model.uses_latent

    def encode(self, batch: dict[str, torch.Tensor]) -> Normal:
        return self.model.encode(batch)

    def log_likelihood(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        return self.model.log_likelihood(batch, z, evaluation_dtype=self.evaluation_dtype)

    def num_predicted_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.num_predicted_tokens(batch)

    def parameters(self):
        """The model's parameters (the estimators find the device from them)."""
        return self.model.parameters()