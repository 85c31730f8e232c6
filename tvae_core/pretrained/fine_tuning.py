"""A run config turned into the fine-tuning of a pretrained encoder and decoder."""
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
