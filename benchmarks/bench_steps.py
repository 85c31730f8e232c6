"""The training batches and the optimiser step the step benchmarks share (no side effects on
import, unlike ``bench_core``, which sets the allocator for its process)."""
from __future__ import annotations

import contextlib

import torch

from tvae_core.data import iterate_batches
from tvae_core.methods import compute_loss


def training_batches(cfg, corpus, steps: int) -> list:
    """``steps`` shuffled, length-bucketed training batches of the run's batch size."""
    return list(iterate_batches(corpus.token_ids("train")[: cfg.train.batch_size * steps],
                                cfg.train.batch_size, corpus.vocab.pad_id, shuffle=True))


def training_step(cfg, model, optimizer, batch, step: int, steps: int, *, state=None, state_optimizer=None,
                  autocast=None, read: bool = True):
    """One optimiser step as ``tvae_core.train`` takes it: the forward terms (under ``autocast``,
    as Accelerate wraps the forward pass), the method's loss with its own state (the MDR
    multiplier), backward, gradient clipping, AdamW, and the state's optimiser. ``read=False``
    keeps the loss's diagnostics on the device. Returns the loss and the gradient norm, unread."""
    with autocast if autocast is not None else contextlib.nullcontext():
        terms = model.forward_terms(batch)
    loss, _ = compute_loss(terms, cfg.objective, step, steps, state, read=read)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if state_optimizer is not None:
        state_optimizer.step()
        state_optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm
