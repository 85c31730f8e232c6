"""One switch sets the run size: ``smoke`` (tests, CI), ``default`` (the book, 2-core CPU),
``full`` (thesis scale, GPU).

Every size-dependent setting of every notebook lives here, grouped by concern, so notebooks only
take ``profile`` as a parameter and look the rest up with :func:`get_profile`. A profile's runs
are :class:`~tvae_core.config.RunConfig`'s defaults with the profile's overrides
(:attr:`Profile.run`, the same sections and field names, nothing mirrored); beside them the
sizes of the estimators, the exact linear-Gaussian models, the mixed membership fits, the
pretrained study, the target rates and the training budgets of the budget study.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import ObjectiveConfig, RunConfig
from .device import HEAD_DTYPES, cpu_head_dtype

PROFILE_NAMES = ("smoke", "default", "full")


@dataclass(frozen=True)
class EstimatorSize:
    iw_num_samples: int            # K for importance-weighted log-likelihood
    iw_max_sentences: int | None   # None = whole test split
    mmd_num_samples: int
    mmd_permutations: int
    # dtype of the decoder's matmuls in evaluation (the evaluation_dtype that evaluate_run passes to
    # TransformerVAE.log_likelihood through TransformerVAE.at_precision): "bfloat16"
    # runs the transformer under autocast and the vocabulary matmul in bfloat16 (target logits and
    # log-softmax in float32); on the default PTB models it moves a sentence's log p(x|z) by
    # 0.010-0.011 nats (sd; max 0.045) and makes IW 1.8x faster than float32 (both measured)
    decoder_dtype: str = "float32"
    # sentences per call of the single-sample bounds, and decoder sequences (sentences x z samples)
    # per call of the IW bound (None: tvae_core.evaluation.iw_batching's rule for the device); small
    # for a large pretrained decoder, whose activations per sequence are ~10x the small models'
    batch_size: int = 128
    iw_sequences_per_call: int | None = None

    def __post_init__(self):
        if self.decoder_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"estimators.decoder_dtype={self.decoder_dtype!r} is not accepted; "
                             "accepted values: ('float32', 'bfloat16')")
        for name in ("iw_num_samples", "mmd_num_samples", "mmd_permutations", "batch_size", "iw_max_sentences",
                     "iw_sequences_per_call"):
            value = getattr(self, name)
            optional = name in ("iw_max_sentences", "iw_sequences_per_call")
            if (value is None and not optional) or (value is not None and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1)):
                raise ValueError(f"estimators.{name}={value!r} is not accepted; accepted values: an integer >= 1"
                                 + (" or None" if optional else ""))


@dataclass(frozen=True)
class ExactVAESize:
    num_points_ladder: tuple[int, ...]   # N for aggregate-posterior estimators vs the exact answer
    num_samples_ladder: tuple[int, ...]  # K for the importance-weighted bound vs exact log p(x)
    num_repeats: int                      # independent repeats to show the spread


@dataclass(frozen=True)
class MixedMembershipSize:
    samples_per_group: int
    num_components: int
    num_steps: int
    low_rank: int


@dataclass(frozen=True)
class PretrainedStudySize:
    """Run and evaluation sizes of the pretrained encoder/decoder study (notebook 06). A 135M
    parameter decoder with a 49k-token vocabulary costs ~5 s per training step at batch 8 on one
    CPU thread (measured), and the estimator sizes above (K = 500 per sentence) would take hours:
    these keep the study affordable and every decoder call small."""

    max_steps: int
    batch_size: int
    max_train_sentences: int | None
    max_eval_sentences: int | None     # validation and test sentences
    latent_dim: int
    estimators: EstimatorSize          # the study's evaluation (tvae_core.evaluation.evaluate_run)


RUN_SECTIONS = ("data", "model", "train")   # what a profile sets; the objective is each run's own


@dataclass(frozen=True)
class Profile:
    name: str
    # overrides of RunConfig's defaults, by section: {"data": {...}, "model": {...}, "train": {...}};
    # without train.lr_warmup_steps the warm-up is a tenth of max_steps, at most 100 steps
    run: Mapping[str, Mapping[str, Any]]
    estimators: EstimatorSize
    exact_vae: ExactVAESize
    mmm: MixedMembershipSize
    pretrained: PretrainedStudySize
    target_rates: tuple[float, ...] = field(default=(4.0, 8.0, 16.0, 24.0, 32.0))
    # the training budgets (optimiser steps) of the budget study (experiments.budget_study), one
    # cached run each; the study costs their sum per method
    budget_steps: tuple[int, ...] = (600, 1500, 3000, 6000)
    # the study's runs trained to its longest budget (labels of experiments.BUDGET_METHODS, e.g.
    # "MDR 32"); empty: every one
    budget_longest: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.run) - set(RUN_SECTIONS)
        if unknown:
            raise ValueError(f"Profile.run sections {sorted(unknown)} are not accepted; accepted values: {RUN_SECTIONS}")
        self.base_config()   # a misspelt field or a bad value fails here, naming it

    def base_config(self, seed: int = 0) -> RunConfig:
        """The profile's data, model and training settings with the plain VAE objective."""
        train = dict(self.run.get("train", {}))
        if "lr_warmup_steps" not in train:
            steps = train.get("max_steps", RunConfig().train.max_steps)
            train["lr_warmup_steps"] = min(100, max(1, steps // 10))
        return RunConfig(objective=ObjectiveConfig(name="vae"), label="VAE").replace(
            data=dict(self.run.get("data", {})), model=dict(self.run.get("model", {})), train={**train, "seed": seed})

    @property
    def data(self):
        """The :class:`~tvae_core.config.DataConfig` of the profile's runs."""
        return self.base_config().data

    @property
    def model(self):
        """The :class:`~tvae_core.config.ModelConfig` of the profile's runs (from scratch)."""
        return self.base_config().model

    @property
    def train(self):
        """The :class:`~tvae_core.config.TrainConfig` of the profile's runs (seed 0)."""
        return self.base_config().train


def build_profiles(cpu_head: str) -> dict[str, Profile]:
    """The three profiles, with ``cpu_head`` (``"float32"`` or ``"bfloat16"``) as the LM head's dtype
    of the CPU profiles' training and evaluation. :data:`PROFILES` takes it from the hardware
    (:func:`tvae_core.device.cpu_head_dtype`: bfloat16 where the CPU has it, float32 elsewhere,
    where software bfloat16 is ~10x slower); the compiled training kernel is bfloat16's, so a
    float32 head trains on the torch path. The dtype is in every run's key."""
    if cpu_head not in HEAD_DTYPES:
        raise ValueError(f"cpu_head={cpu_head!r} is not accepted; accepted values: {HEAD_DTYPES}")
    head_training = {"lm_head_dtype": cpu_head, "lm_head_kernel": "native" if cpu_head == "bfloat16" else "torch"}
    return {
        "smoke": Profile(
            name="smoke",
            run={"data": {"vocab_size": 2_000, "max_length": 32, "max_train_sentences": 512, "max_eval_sentences": 64,
                          "max_test_sentences": 64},
                 "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "latent_dim": 8},
                 "train": {"max_steps": 30, "batch_size": 16, "eval_every": 15, "checkpoint_every": 15,
                           "lm_head_dtype": cpu_head}},
            budget_steps=(10, 20, 30), budget_longest=("FB 32", "MDR 32"),
            estimators=EstimatorSize(iw_num_samples=8, iw_max_sentences=32,
                                     mmd_num_samples=64, mmd_permutations=50),
            exact_vae=ExactVAESize(num_points_ladder=(16, 64, 256), num_samples_ladder=(1, 4, 16),
                                   num_repeats=2),
            mmm=MixedMembershipSize(samples_per_group=100, num_components=3, num_steps=50, low_rank=2),
            pretrained=PretrainedStudySize(max_steps=2, batch_size=4, max_train_sentences=32, max_eval_sentences=8,
                                           latent_dim=8,
                                           estimators=EstimatorSize(iw_num_samples=2, iw_max_sentences=4,
                                                                    mmd_num_samples=8, mmd_permutations=20,
                                                                    batch_size=8, iw_sequences_per_call=16)),
            target_rates=(2.0, 4.0),
        ),
        "default": Profile(
            name="default",
            # The budget study (notebook 07, benchmarks/budget_study.md) chose 1,500 steps of 32 sentences
            # (1.1 epochs of PTB): at 600 the runs had not learned to use z yet. With diagnostics read
            # every 50 steps a step takes ~0.06 s on one thread with the compiled bfloat16 LM head (a CPU
            # with AVX512-BF16), ~0.13 s with the float32 head elsewhere (an AVX2 EPYC; two runs share
            # the 2 cores); validation every 250 steps. The warm-up is the 600-step budget's, so every budget
            # of the study and the book's grid follow the same learning-rate curve and share runs.
            # A 1-layer encoder: as deep as the decoder it costs what the decoder's transformer body
            # costs, the VAE step well over the LM's (benchmarks/README.md); the inference network needs
            # no more for the rates this book asks of it. Latent dimension 32 as in the thesis
            # throughout (targets are 0.125..1 nat per dimension); the word-level 10k PTB vocabulary.
            run={"data": {"vocab_size": 10_000, "max_length": 64, "max_train_sentences": None,
                          "max_eval_sentences": 1000, "max_test_sentences": None},
                 "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "encoder_layers": 1, "latent_dim": 32},
                 "train": {"max_steps": 1500, "batch_size": 32, "eval_every": 250, "checkpoint_every": 500,
                           **head_training, "sync_every": 50, "lr_warmup_steps": 60}},
            budget_steps=(600, 1500, 3000), budget_longest=("FB 32", "MDR 32"),
            # IW with K = 500 on the first 64 test sentences per run, the bound's cost being the head's
            # matmuls (K x tokens rows); K stays high because the pages read the IW bound's gap to the
            # ELBO, which shrinks with K, and fewer sentences only widen its standard error (shown) and
            # keep the cold build within its time. Everything else uses the whole test split; the
            # whole split's IW is timed by `make bench`
            estimators=EstimatorSize(iw_num_samples=500, iw_max_sentences=64,
                                     mmd_num_samples=1000, mmd_permutations=500, decoder_dtype=cpu_head),
            exact_vae=ExactVAESize(num_points_ladder=(64, 256, 1024, 4096, 16384),
                                   num_samples_ladder=(1, 4, 16, 64, 256, 1024), num_repeats=5),
            mmm=MixedMembershipSize(samples_per_group=1000, num_components=10, num_steps=300,
                                    low_rank=4),
            # ~5 s per step, ~2 min per evaluation (the IW bound dominates) on 1 busy CPU thread
            pretrained=PretrainedStudySize(max_steps=150, batch_size=8, max_train_sentences=None,
                                           max_eval_sentences=200, latent_dim=32,
                                           estimators=EstimatorSize(iw_num_samples=10, iw_max_sentences=50,
                                                                    mmd_num_samples=200, mmd_permutations=200,
                                                                    batch_size=16, iw_sequences_per_call=60)),
        ),
        "full": Profile(
            name="full",
            # float32 training: bfloat16 autocast trained slower on a GPU, not faster (`make gpu-check`
            # times both side by side, `make gpu-profile` takes the step apart; benchmarks/README.md).
            # Diagnostics are read back every 100 steps, so this package's code reads no value back
            # inside a step. 20k steps of 32 sentences are 15.2 epochs of PTB's 42,068 training
            # sentences: the thesis's PTB runs trained at most 15 epochs of 72 sentences per step
            # (~8.8k steps; shared/reference/thesis_code.md, section 2.8).
            run={"data": {"vocab_size": 10_000, "max_length": 64, "max_train_sentences": None,
                          "max_eval_sentences": None, "max_test_sentences": None},
                 "model": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "latent_dim": 32},
                 "train": {"max_steps": 20_000, "batch_size": 32, "eval_every": 2_000, "checkpoint_every": 2_000,
                           "sync_every": 100}},
            estimators=EstimatorSize(iw_num_samples=500, iw_max_sentences=None,
                                     mmd_num_samples=3000,
                                     mmd_permutations=1000, decoder_dtype="bfloat16"),
            exact_vae=ExactVAESize(num_points_ladder=(64, 256, 1024, 4096, 16384, 65536),
                                   num_samples_ladder=(1, 4, 16, 64, 256, 1024, 4096), num_repeats=10),
            mmm=MixedMembershipSize(samples_per_group=3000, num_components=20, num_steps=2000,
                                    low_rank=8),
            pretrained=PretrainedStudySize(max_steps=20_000, batch_size=32, max_train_sentences=None,
                                           max_eval_sentences=None, latent_dim=32,
                                           estimators=EstimatorSize(iw_num_samples=500, iw_max_sentences=None,
                                                                    mmd_num_samples=3000, mmd_permutations=1000,
                                                                    batch_size=32)),
        ),
    }


PROFILES: dict[str, Profile] = build_profiles(cpu_head_dtype())


def get_profile(name: str) -> Profile:
    """Look up a profile by name; fails early naming the accepted values."""
    if name not in PROFILES:
        raise ValueError(f"profile={name!r} is not a known profile; accepted values: {PROFILE_NAMES}")
    return PROFILES[name]
