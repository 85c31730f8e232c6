"""A run's parts from its config, in one place: the corpus (with its vocabulary) and the model,
from scratch or pretrained.

Training (:mod:`tvae_core.train`), the run cache (:mod:`tvae_core.runs`) and evaluation all come
here, so the choice between the small from-scratch parts (:mod:`tvae_core.data`,
:mod:`tvae_core.model`) and the pretrained ones (:mod:`tvae_core.pretrained`) is made once:
``data.tokenizer == "pretrained"`` selects the pretrained corpus and vocabulary, a pretrained
``model.encoder`` or ``model.decoder`` the pretrained model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig
from .data import Corpus, Vocabulary, load_corpus
from .model import TransformerVAE


def _is_pretrained_corpus(config: RunConfig) -> bool:
    return config.data.tokenizer == "pretrained"


def _is_pretrained_model(config: RunConfig) -> bool:
    return config.model.encoder != "scratch" or config.model.decoder != "scratch"


def training_corpus(config: RunConfig) -> Corpus:
    """The corpus ``config`` trains and is evaluated on (tokenised once and cached on disk):
    PTB in the word vocabulary, or in the pretrained decoder's tokens."""
    if _is_pretrained_corpus(config):
        from .pretrained.corpus import load_pretrained_corpus

        return load_pretrained_corpus(config)
    return load_corpus(config.data, seed=config.train.seed)


def load_vocabulary(config: RunConfig, path: str | Path):
    """The vocabulary a run of ``config`` stored at ``path`` (its ``tokenizer.json``)."""
    if _is_pretrained_corpus(config):  # a Hugging Face tokenizer, its special ids stored alongside
        from .pretrained.vocabulary import PretrainedVocabulary

        return PretrainedVocabulary.load(path)
    return Vocabulary.load(path)


def build_model(config: RunConfig, vocab) -> TransformerVAE:
    """The untrained model of ``config`` in ``vocab``'s ids (the decoder's vocabulary), with the
    training-head settings of ``config.train`` (a model whose head cannot take them is refused,
    naming the accepted values)."""
    head_options = {"training_head_dtype": getattr(torch, config.train.lm_head_dtype),
                    "training_head_native": config.trains_native_head}
    if _is_pretrained_model(config):
        from .pretrained.model import build_pretrained_model

        return build_pretrained_model(config, vocab, **head_options)
    return TransformerVAE.from_scratch(config.model, vocab.size, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
                                       eos_id=vocab.eos_id, unk_id=vocab.unk_id, max_length=config.data.max_length,
                                       **head_options)
