"""The TransformerVAE with pretrained encoder and/or decoder."""
from __future__ import annotations

import torch

from ..config import RunConfig
from ..model import TransformerVAE, build_scratch_decoder, build_scratch_encoder
from .corpus import encode_for_encoder, pad_sequences
from .vocabulary import needs_encoder_tokenizer
from .weights import SCRATCH, SHARED, load_decoder, load_encoder, load_tokenizer, shared_bidirectional_encoder

class PretrainedTransformerVAE(TransformerVAE):
    """:class:`TransformerVAE` whose encoder may read its own tokenizer's ids.

    A batch without ``encoder_input_ids`` gets them here: each row's decoder ids are decoded to
    text and re-tokenised for the encoder (the same rule as :func:`~tvae_core.pretrained.corpus.load_pretrained_corpus`), so
    decoder-only batches from :func:`tvae_core.data.iterate_batches` (training loop, validation,
    estimators) give the encoder its own input. The tokenizers are not parameters: the state
    dict is that of :class:`TransformerVAE`.
    """

    fuse_lm_head = False  # compute-bound head (hidden 576 x 49k): unfused training is faster (measured)

    def __init__(self, *args, decoder_vocab=None, encoder_tokenizer=None, max_length: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoder_vocab = decoder_vocab
        self.encoder_tokenizer = encoder_tokenizer
        self.max_length = max_length

    def encoder_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``encoder_input_ids`` / ``encoder_attention_mask`` [B, T_enc] for decoder-id batches."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        texts = [self.decoder_vocab.decode(row[m.bool()].tolist()) for row, m in zip(ids.cpu(), mask.cpu())]
        encoded = encode_for_encoder(texts, self.encoder_tokenizer, self.max_length)
        enc_ids, enc_mask = pad_sequences(encoded, self.encoder_tokenizer.pad_token_id or 0)
        return {"encoder_input_ids": enc_ids.to(ids.device), "encoder_attention_mask": enc_mask.to(ids.device)}

    def encode(self, batch):
        if self.uses_latent and self.encoder_tokenizer is not None and "encoder_input_ids" not in batch:
            batch = {**batch, **self.encoder_batch(batch)}
        return super().encode(batch)


def build_pretrained_model(config: RunConfig, vocab, **head_options) -> PretrainedTransformerVAE:
    """The VAE of ``config`` with pretrained encoder and/or decoder (``scratch`` sides are built
    from ``config.model`` in ``vocab``'s ids). ``vocab`` is the decoder's (see
    :func:`~tvae_core.pretrained.vocabulary.decoder_vocabulary`); ``head_options``: the training-head
    arguments of :class:`~tvae_core.model.TransformerVAE` (a pretrained head trains unfused, so only
    the float32 torch head is accepted)."""
    m = config.model
    if m.decoder != SCRATCH and config.data.tokenizer != "pretrained":
        raise ValueError(f"model.decoder={m.decoder!r} predicts its own tokens: set data.tokenizer='pretrained'")
    max_length = config.data.max_length
    if m.decoder == SCRATCH:
        decoder = build_scratch_decoder(m, vocab.size, vocab.pad_id, vocab.bos_id, vocab.eos_id, max_length)
    else:
        decoder = load_decoder(m.decoder)
        if decoder.get_input_embeddings().num_embeddings < vocab.size:
            decoder.resize_token_embeddings(vocab.size)
    encoder, encoder_tokenizer = None, None
    if m.injection != "none":
        if m.encoder == SCRATCH:
            encoder = build_scratch_encoder(m, vocab.size, vocab.pad_id, max_length)
        elif m.encoder == SHARED:
            encoder = shared_bidirectional_encoder(decoder)
        else:
            encoder = load_encoder(m.encoder)
            if needs_encoder_tokenizer(config):
                encoder_tokenizer = load_tokenizer(m.encoder)
    model = PretrainedTransformerVAE(m, encoder, decoder, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
                                     eos_id=vocab.eos_id, unk_id=vocab.unk_id, decoder_vocab=vocab,
                                     encoder_tokenizer=encoder_tokenizer, max_length=max_length,
                                     **head_options)
    return model  # the latent projections use the decoder's initializer_range (TransformerVAE)


def zero_shot_language_model(config: RunConfig, vocab) -> PretrainedTransformerVAE:
    """The pretrained decoder as it ships, as a decoder-only LM (no latent, no training): its
    exact log p(x) is the reference a fine-tuned VAE is compared with."""
    lm_config = config.replace(model={"injection": "none", "encoder": SCRATCH}, objective={"name": "lm",
                                                                                          "target_rate": None})
    return build_pretrained_model(lm_config, vocab).eval()
