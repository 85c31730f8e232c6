"""The pretrained encoder/decoder study of notebook 06: its configs (evaluated by
:func:`tvae_core.evaluation.evaluate_run` with ``Profile.pretrained.estimators``)."""
from __future__ import annotations

from ..config import RunConfig
from .weights import DEFAULT_DECODER, DEFAULT_ENCODER


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


def pretrained_study(profile: str, seed: int = 0, target_rate: float | None = None,
                     encoder: str = DEFAULT_ENCODER, decoder: str = DEFAULT_DECODER) -> dict[str, RunConfig]:
    """The plain VAE, FB and MDR at ``target_rate`` nats (default: the profile's second target
    rate) with a pretrained encoder and decoder (label -> config), sized by ``Profile.pretrained``."""
    from ..experiments import method_config
    from ..profiles import get_profile

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
