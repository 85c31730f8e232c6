"""Corpora in a pretrained decoder's tokens, with the encoder's own ids where it has its own
tokenizer, and their batches."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import DEFAULT_CACHE_DIR, SPLITS, Corpus, collate, encode_sentences, load_sentences, publish_splits
from .vocabulary import decoder_vocabulary, needs_encoder_tokenizer
from .weights import load_tokenizer

def _encoder_max_length(tokenizer, max_length: int) -> int:
    # the encoder's own tokens for a sentence of max_length decoder tokens: allow 4x, within the model
    model_max = getattr(tokenizer, "model_max_length", None) or 512
    return int(min(model_max if model_max < 100_000 else 512, 4 * max_length))


def encode_for_encoder(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """The encoder's ids of each text, with its own specials (``[CLS] ... [SEP]``)."""
    limit = _encoder_max_length(tokenizer, max_length)
    return tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate(sequences, pad_id)
    return batch["input_ids"], batch["attention_mask"]


def collate_pairs(decoder_ids: list[list[int]], encoder_ids: list[list[int]] | None, pad_id: int,
                  encoder_pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` [B, T] (decoder) and, given encoder ids,
    ``encoder_input_ids``/``encoder_attention_mask`` [B, T_enc]."""
    ids, mask = pad_sequences(decoder_ids, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if encoder_ids is not None:
        enc_ids, enc_mask = pad_sequences(encoder_ids, encoder_pad_id if encoder_pad_id is not None else 0)
        batch.update(encoder_input_ids=enc_ids, encoder_attention_mask=enc_mask)
    return batch


@dataclass
class PretrainedCorpus(Corpus):
    """A :class:`tvae_core.data.Corpus` in the decoder's tokens (``token_ids``) plus, when the
    encoder tokenizes differently, its ids in column ``encoder_input_ids``."""

    encoder_tokenizer: object = None

    def encoder_token_ids(self, split: str) -> list[list[int]] | None:
        if "encoder_input_ids" not in self.splits[split].column_names:
            return None
        return self._column(split, "encoder_input_ids")

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                bucket: bool = True):
        """Like :func:`tvae_core.data.iterate_batches` (same order for the same arguments), with
        the encoder's ids in every batch."""
        from ..data import iterate_batches

        decoder_ids = self.token_ids(split)
        encoder_ids = self.encoder_token_ids(split)
        index_batches = iterate_batches([[i] * len(s) for i, s in enumerate(decoder_ids)], batch_size, -1,
                                        shuffle=shuffle, seed=seed, epoch=epoch, bucket=bucket)
        encoder_pad = getattr(self.encoder_tokenizer, "pad_token_id", None)
        for index_batch in index_batches:
            rows = index_batch["input_ids"][:, 0].tolist()
            yield collate_pairs([decoder_ids[i] for i in rows],
                                [encoder_ids[i] for i in rows] if encoder_ids is not None else None,
                                self.vocab.pad_id, encoder_pad)


def _pretrained_corpus_key(config: RunConfig) -> str:
    from ..config import corpus_fingerprint

    payload = {"data": config.data.__dict__, "seed": config.train.seed, "format": 2,
               "decoder": config.model.decoder, "encoder": config.model.encoder,
               "encoder_ids": needs_encoder_tokenizer(config), "corpus": corpus_fingerprint(config.data)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_pretrained_corpus(config: RunConfig, cache_dir: str | Path | None = DEFAULT_CACHE_DIR) -> PretrainedCorpus:
    """Sentences of ``config.data`` in the decoder's tokens (``[BOS] ... [EOS]``) and, when the
    encoder has its own tokenizer, in the encoder's (the same text, decoded back from the decoder
    ids so both sides see exactly what is reconstructed). Cached under
    ``cache_dir/corpus-pretrained-<hash>`` (atomic)."""
    import datasets

    datasets.disable_progress_bars()
    if config.data.tokenizer != "pretrained":
        raise ValueError("load_pretrained_corpus needs data.tokenizer='pretrained'")
    vocab = decoder_vocabulary(config)
    encoder_tokenizer = load_tokenizer(config.model.encoder) if needs_encoder_tokenizer(config) else None
    key = _pretrained_corpus_key(config)
    target = Path(cache_dir) / f"corpus-pretrained-{key}" if cache_dir is not None else None
    if target is not None and target.is_dir():
        from ..cache import set_aside, verify_dir

        try:
            verify_dir(target, target.name)
            splits = {s: datasets.load_from_disk(str(target / s)) for s in SPLITS}
            return PretrainedCorpus(splits, vocab, config.data, encoder_tokenizer)
        except Exception as err:  # damaged entry: set aside (one warning naming it), rebuild
            set_aside(target, str(err))
    raw = load_sentences(config.data, seed=config.train.seed)
    splits = {}
    for split in SPLITS:
        ids = encode_sentences(raw[split], vocab, config.data.max_length, split)
        columns = {"text": raw[split], "input_ids": ids, "length": [len(x) for x in ids]}
        if encoder_tokenizer is not None:
            columns["encoder_input_ids"] = encode_for_encoder([vocab.decode(x) for x in ids], encoder_tokenizer,
                                                              config.data.max_length)
        splits[split] = datasets.Dataset.from_dict(columns)
    if target is not None:
        splits = publish_splits(splits, target)
    return PretrainedCorpus(splits, vocab, config.data, encoder_tokenizer)
