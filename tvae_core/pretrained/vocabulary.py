"""The vocabulary of a pretrained tokenizer, with the package's special-token conventions."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from .weights import PYPI_PREFIX, SCRATCH, SHARED, SPECIALS_FILE, load_tokenizer, packaged_weights_spec

def _attribute_id(tokenizer, *attributes: str) -> int | None:
    for attribute in attributes:
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            return int(value)
    return None


def _token_id(tokenizer, token: str | None) -> int | None:
    if token is None:
        return None
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
    return int(token_id)


@dataclass
class PretrainedVocabulary:
    """The interface of :class:`tvae_core.data.Vocabulary` for a Hugging Face tokenizer.

    Specials follow the tokenizer (``bos``/``eos``; ``[CLS]``/``[SEP]`` for BERT-style ones),
    unless overridden. ``pad`` falls back to ``eos`` (GPT-2 has no pad token); padding is only
    ever read through the attention mask, so sharing an id with ``eos`` is harmless.
    """

    tokenizer: object
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, bos_token: str | None = None,
                       eos_token: str | None = None) -> "PretrainedVocabulary":
        eos = _token_id(tokenizer, eos_token)
        eos = eos if eos is not None else _attribute_id(tokenizer, "eos_token_id", "sep_token_id")
        bos = _token_id(tokenizer, bos_token)
        bos = bos if bos is not None else _attribute_id(tokenizer, "bos_token_id", "cls_token_id")
        if eos is None and bos is None:
            raise ValueError("the tokenizer has neither an end (eos/sep) nor a start (bos/cls) token")
        eos = eos if eos is not None else bos
        bos = bos if bos is not None else eos
        pad = _attribute_id(tokenizer, "pad_token_id")
        unk = _attribute_id(tokenizer, "unk_token_id")
        # a tokenizer without an unknown token (byte-level BPE, as GPT-2's): word dropout then replaces
        # words by the end token, not by a neutral symbol (the book trains none of these with it)
        return cls(tokenizer, pad if pad is not None else eos, unk if unk is not None else eos, bos, eos)

    @property
    def size(self) -> int:
        return len(self.tokenizer)

    def encode(self, sentence: str) -> list[int]:
        return self.tokenizer(sentence, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, path: Path) -> None:
        """``path`` gets the ``tokenizers`` JSON; ``tokenizer_specials.json`` next to it the ids."""
        path = Path(path)
        self.tokenizer.backend_tokenizer.save(str(path))
        (path.parent / SPECIALS_FILE).write_text(json.dumps(
            {"pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id}))

    @classmethod
    def load(cls, path: Path) -> "PretrainedVocabulary":
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        specials = json.loads((path.parent / SPECIALS_FILE).read_text())
        return cls(PreTrainedTokenizerFast(tokenizer_file=str(path)), **specials)


def _tokenizer_source(config: RunConfig) -> str:
    """The decoder's tokenizer; the encoder's if the decoder is built from scratch."""
    source = config.model.decoder if config.model.decoder != SCRATCH else config.model.encoder
    if source == SCRATCH:
        raise ValueError("data.tokenizer='pretrained' needs a pretrained model.decoder or model.encoder")
    return source


def decoder_vocabulary(config: RunConfig) -> PretrainedVocabulary:
    source = _tokenizer_source(config)
    overrides = {}
    if source.startswith(PYPI_PREFIX) and source == config.model.decoder:
        spec_info = packaged_weights_spec(source)
        overrides = {"bos_token": spec_info.bos_token, "eos_token": spec_info.eos_token}
    return PretrainedVocabulary.from_tokenizer(load_tokenizer(source), **overrides)


def needs_encoder_tokenizer(config: RunConfig) -> bool:
    """True when the encoder reads its own ids (a pretrained encoder other than the tokenizer source)."""
    if config.model.injection == "none" or config.model.encoder in (SCRATCH, SHARED):
        return False
    return config.data.tokenizer != "pretrained" or config.model.encoder != _tokenizer_source(config)
