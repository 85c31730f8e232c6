"""Tiny configs and corpora shared by the tests (seconds, not minutes)."""
from __future__ import annotations

from pathlib import Path

from tvae_core.config import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig

WORDS = "the cat dog sat ran on a mat log big small red blue and".split()


def write_corpus(path: Path, num_sentences: int = 120, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(num_sentences)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(corpus: Path, objective: str = "vae", target_rate: float | None = None, max_steps: int = 8,
                injection: str = "both", checkpoint_every: int = 4, seed: int = 0,
                lm_head_dtype: str = "float32", **objective_kw) -> RunConfig:
    return RunConfig(
        data=DataConfig(source="text", path=str(corpus), vocab_size=50, max_length=16),
        model=ModelConfig(hidden_size=16, num_layers=1, num_heads=2, latent_dim=4, injection=injection,
                          dropout=0.1),
        objective=ObjectiveConfig(name=objective, target_rate=target_rate, **objective_kw),
        train=TrainConfig(max_steps=max_steps, batch_size=8, eval_every=4, checkpoint_every=checkpoint_every,
                          lr_warmup_steps=2, seed=seed, lm_head_dtype=lm_head_dtype),
        label=f"tiny-{objective}",
    )


def poison_distortion(monkeypatch, at_call: int = 3) -> None:
    """Make the ``at_call``-th ``TransformerVAE.forward_terms`` of the test return a NaN
    distortion (the training step ``at_call - 1``): the divergence tests' trigger."""
    from tvae_core.model import TransformerVAE

    original = TransformerVAE.forward_terms
    calls = {"n": 0}

    def poisoned(self, batch):
        terms = original(self, batch)
        calls["n"] += 1
        if calls["n"] == at_call:
            terms["distortion"] = terms["distortion"] * float("nan")
        return terms

    monkeypatch.setattr(TransformerVAE, "forward_terms", poisoned)
