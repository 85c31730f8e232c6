"""Training loop: AdamW, gradient clipping, periodic validation, resumable checkpoints.

Determinism: batches of step ``t`` come from a permutation seeded by ``(seed, epoch)`` and the
global torch RNG (dropout, z ~ q(z|x), word dropout) is re-seeded from ``(seed, step)`` at every
step, so a run resumed from a checkpoint replays exactly the steps it would have taken.

The loop runs under Hugging Face Accelerate (a no-op wrapper on one CPU process), so the same
code runs with ``accelerate launch --num_processes N``: each process takes an equal slice of the
global batch and gradients are averaged, the MDR multiplier included (it is a parameter of the
prepared module, so all ranks take the same step).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .config import CACHE_FORMAT_VERSION, RunConfig, TrainConfig
from .data import Corpus, Vocabulary, iterate_batches, load_corpus
from .model import TransformerVAE
from .objectives import LagrangeMultiplier, compute_loss
from .runs import finalize_run_dir, runs_dir, write_json_atomic

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Var_x E_q[z_d] > 0.01


class TrainingDiverged(FloatingPointError):
    """A non-finite value appeared in training; the message names the step and the term."""


def build_model(config: RunConfig, vocab: Vocabulary) -> TransformerVAE:
    if config.model.encoder == "scratch" and config.model.decoder == "scratch":
        model = TransformerVAE.from_scratch(config.model, vocab.size, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
                                            eos_id=vocab.eos_id, unk_id=vocab.unk_id,
                                            max_length=config.data.max_length)
    else:
        from .pretrained import build_pretrained_model

        model = build_pretrained_model(config, vocab)
    if config.train.lm_head_dtype != "float32":
        if not model.trains_blocked_lm_head:
            raise ValueError(f"train.lm_head_dtype={config.train.lm_head_dtype!r} needs the blocked LM head "
                             "(a plain linear head, fuse_lm_head=True); this model trains its head unfused: "
                             "accepted value here: 'float32'")
        model.training_lm_head_dtype = getattr(torch, config.train.lm_head_dtype)
    if config.train.lm_head_kernel == "native":
        if not model.trains_blocked_lm_head:
            raise ValueError("train.lm_head_kernel='native' needs the blocked LM head (a plain linear head, "
                             "fuse_lm_head=True); this model trains its head unfused: accepted value here: 'torch'")
        model.training_lm_head_native = True
    return model


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as one fused kernel over all parameters: on the default VAE (one CPU thread, torch
    profiler) the per-parameter loop took 6.2 ms per step, the fused kernel 1.5 ms."""
    return torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=True)


def load_training_corpus(config: RunConfig) -> Corpus:
    if config.data.tokenizer == "pretrained":
        from .pretrained import load_pretrained_corpus

        return load_pretrained_corpus(config)
    return load_corpus(config.data, seed=config.train.seed)


class TrainingModule(nn.Module):
    """The VAE plus the objective's own trainable state (the MDR multiplier), one module so that
    Accelerate/DDP synchronises and checkpoints both."""

    def __init__(self, vae: TransformerVAE, multiplier: LagrangeMultiplier | None):
        super().__init__()
        self.vae = vae
        self.multiplier = multiplier

    def forward(self, batch):
        return self.vae.forward_terms(batch)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


@torch.no_grad()
def validation_metrics(model: TransformerVAE, sequences: list[list[int]], pad_id: int, batch_size: int = 128,
                       seed: int = 0) -> dict[str, float]:
    """Single-sample validation terms (nats per sentence): rate, distortion, ELBO, per-token NLL
    bound, active units. The full estimators (IW bound, MI) live in ``tvae_core.estimators``."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    rates, distortions, tokens, means = [], [], [], []
    for batch in iterate_batches(sequences, batch_size, pad_id, shuffle=False, bucket=True):
        terms = model.forward_terms(batch)
        rates.append(terms["kl_per_dim"].sum(-1))
        distortions.append(terms["distortion"])
        tokens.append(model.num_predicted_tokens(batch))
        means.append(terms["posterior"].loc)
    model.train(was_training)
    rate, distortion = torch.cat(rates).double(), torch.cat(distortions).double()
    num_tokens = torch.cat(tokens).double().sum()
    means = torch.cat(means).double()
    activity = means.var(0) if means.shape[0] > 1 else torch.zeros(means.shape[1], dtype=torch.float64)
    return {
        "rate": rate.mean().item(),
        "distortion": distortion.mean().item(),
        "elbo": -(rate + distortion).mean().item(),
        "nll_per_token_bound": ((rate + distortion).sum() / num_tokens).item(),
        "perplexity_bound": math.exp(((rate + distortion).sum() / num_tokens).item()),
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum().item()),
        "num_sentences": int(rate.shape[0]),
    }


def _check_finite(step: int, loss: torch.Tensor, terms: dict) -> None:
    for name, value in (("distortion", terms["distortion"]), ("kl_per_dim", terms["kl_per_dim"]), ("loss", loss)):
        if not torch.isfinite(value).all():
            _raise_non_finite(name, step, value)


def _raise_non_finite(name: str, step: int, value: torch.Tensor):
    raise TrainingDiverged(f"non-finite {name} at step {step} "
                           f"(value sample: {value.detach().flatten()[:4].tolist()}); "
                           "lower train.learning_rate or check the data")


@contextlib.contextmanager
def _earlier_divergence_first(deferred: "_DeferredDiagnostics | None"):
    """A step that fails (e.g. q(z|x)'s arguments are NaN) after an unread non-finite step raises
    that step's TrainingDiverged instead, as the plain loop would have, steps earlier."""
    try:
        yield
    except Exception:
        if deferred is not None:
            deferred.read()
        raise


class _DeferredDiagnostics:
    """The steps' diagnostics kept as tensors on the model's device and read back to the host in
    one transfer (``train.sync_every``): the same history records, value for value, as reading
    each at its step, and the same finite checks, which then report the first bad step."""

    def __init__(self):
        self.pending = []

    def add(self, step: int, loss, terms: dict, diagnostics: dict, grad_norm, lr: float) -> None:
        checked = {"distortion": terms["distortion"].detach(), "kl_per_dim": terms["kl_per_dim"].detach(),
                   "loss": loss.detach()}
        finite = torch.stack([torch.isfinite(v).all() for v in checked.values()]
                             + [torch.isfinite(torch.as_tensor(grad_norm)).all()])  # [4] bool
        self.pending.append((step, checked, finite, diagnostics, torch.as_tensor(grad_norm).detach(), lr))

    def read(self) -> list[dict]:
        """The pending steps' history records, in order; raises at the first non-finite value."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        tensors = []  # every value of every step, one float64 vector (float32 -> float64 is exact)
        for _, _, finite, diagnostics, grad_norm, _ in pending:
            tensors.append(finite.to(torch.float64))
            tensors += [v.reshape(1).to(torch.float64) for v in diagnostics.values() if isinstance(v, torch.Tensor)]
            tensors.append(grad_norm.reshape(1).to(torch.float64))
        values = iter(torch.cat(tensors).tolist())  # the one host synchronisation
        records = []
        for step, checked, _, diagnostics, _, lr in pending:
            finite = [next(values) for _ in range(4)]
            record = {k: next(values) if isinstance(v, torch.Tensor) else v for k, v in diagnostics.items()}
            grad_norm = next(values)
            for (name, value), ok in zip(checked.items(), finite):
                if not ok:
                    _raise_non_finite(name, step, value)
            if not finite[3]:
                raise TrainingDiverged(f"non-finite gradient norm at step {step} "
                                       f"(loss {checked['loss'].item():.4g})")
            record.update(step=step, grad_norm=grad_norm, lr=lr)
            records.append(record)
        return records


def _versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def train(config: RunConfig, root: str | Path | None = None, *, progress: bool = True) -> Path:
    """Train ``config`` to completion and publish it in the run cache; returns the run directory.

    Checkpoints go to ``<root>/<key>.partial/`` every ``train.checkpoint_every`` steps; a later
    call resumes from there.
    """
    from accelerate import Accelerator
    from safetensors.torch import save_model

    tc, oc = config.train, config.objective
    # the LR schedule counts optimiser steps, stepped by hand on synchronised steps only (Accelerate's
    # default would step it once per process)
    accelerator = Accelerator(gradient_accumulation_steps=tc.gradient_accumulation_steps,
                              mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({world})")

    root_dir = runs_dir(root)
    final_dir = root_dir / config.key
    partial_dir = root_dir / f"{config.key}.partial"
    checkpoint_dir = partial_dir / "checkpoint"

    torch.manual_seed(tc.seed)
    corpus = load_training_corpus(config)
    vocab = corpus.vocab
    train_ids, valid_ids = corpus.token_ids("train"), corpus.token_ids("valid")
    vae = build_model(config, vocab)
    multiplier = LagrangeMultiplier(oc.mdr_lambda_init, oc.mdr_rate_ema) if oc.name == "mdr" else None
    module = TrainingModule(vae, multiplier)
    optimizer = make_optimizer(vae, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / tc.lr_warmup_steps) if tc.lr_warmup_steps else 1.0)
    multiplier_opt = LagrangeMultiplier.make_optimizer(multiplier, oc.mdr_lr) if multiplier else None

    start_step, history = 0, {"train": [], "valid": []}
    if (checkpoint_dir / "state.json").is_file():
        start_step, history = _load_checkpoint(checkpoint_dir, module, optimizer, scheduler, multiplier_opt)
        accelerator.print(f"[tvae] resuming {config.label or config.key} from step {start_step}")

    module, optimizer = accelerator.prepare(module, optimizer)
    if multiplier_opt is not None:  # wrapped so that it, too, only steps on synchronised steps
        multiplier_opt = accelerator.prepare(multiplier_opt)
    raw_module = accelerator.unwrap_model(module)
    module.train()

    batches_per_epoch = math.ceil(len(train_ids) / tc.batch_size)
    epoch_cache: dict[int, list] = {}

    def batch_for(step: int):
        epoch, index = divmod(step, batches_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = list(iterate_batches(train_ids, tc.batch_size, vocab.pad_id, shuffle=True,
                                                      seed=tc.seed, epoch=epoch))
        batch = epoch_cache[epoch][index]
        if world > 1:  # an equal slice of the global batch for this process
            batch = {k: v[rank::world] for k, v in batch.items()}
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    # a distributed run averages each step's diagnostics over processes (_global_diagnostics) when
    # it reads them, so it reads them at every step
    deferred = _DeferredDiagnostics() if tc.sync_every > 1 and world == 1 else None

    def record(entries: list[dict]) -> None:
        history["train"].extend(entries)
        if entries:
            bar.set_postfix(rate=f"{entries[-1]['rate']:.2f}", distortion=f"{entries[-1]['distortion']:.1f}",
                            refresh=False)

    started = time.time()
    bar = tqdm(range(start_step, tc.max_steps), desc=config.label or config.objective.name, initial=start_step,
               total=tc.max_steps, disable=not progress or not accelerator.is_main_process, mininterval=2.0,
               file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        torch.manual_seed(_step_seed(tc.seed, step))
        with accelerator.accumulate(module), _earlier_divergence_first(deferred):
            terms = module(batch_for(step))
            loss, diagnostics = compute_loss(terms, oc, step, tc.max_steps, raw_module.multiplier,
                                             read=deferred is None)
            if deferred is None:
                _check_finite(step, loss, terms)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(raw_module.vae.parameters(), tc.grad_clip)
            if deferred is None and not torch.isfinite(torch.as_tensor(grad_norm)):
                raise TrainingDiverged(f"non-finite gradient norm at step {step} (loss {loss.item():.4g})")
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if multiplier_opt is not None:
                multiplier_opt.step()
                multiplier_opt.zero_grad(set_to_none=True)
        done = step + 1
        evaluate = done % tc.eval_every == 0 or done == tc.max_steps
        checkpoint = done % tc.checkpoint_every == 0 and done < tc.max_steps
        if deferred is None:
            diagnostics.update(step=step, grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0])
            if world > 1:
                diagnostics.update(_global_diagnostics(accelerator, diagnostics, raw_module.multiplier))
            record([diagnostics])
        else:
            deferred.add(step, loss, terms, diagnostics, grad_norm, scheduler.get_last_lr()[0])
            if len(deferred.pending) >= tc.sync_every or evaluate or checkpoint:
                record(deferred.read())
        if evaluate:
            metrics = validation_metrics(raw_module.vae, valid_ids, vocab.pad_id, seed=tc.seed)
            history["valid"].append({"step": done, **metrics})
            module.train()
        if checkpoint and accelerator.is_main_process:
            _save_checkpoint(checkpoint_dir, done, history, raw_module, optimizer, scheduler, multiplier_opt)
    bar.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        staging = root_dir / f"{config.key}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        raw_module.vae.eval()
        save_model(raw_module.vae, str(staging / "model.safetensors"))
        vocab.save(staging / "tokenizer.json")
        write_json_atomic(staging / "config.json", config.to_dict())
        write_json_atomic(staging / "history.json", history)
        final_metrics = dict(history["valid"][-1])
        if multiplier is not None:
            final_metrics["mdr_lambda"] = raw_module.multiplier.value.item()
        write_json_atomic(staging / "metrics.json", final_metrics)
        write_json_atomic(staging / "meta.json", {
            "cache_format_version": CACHE_FORMAT_VERSION, "key": config.key, "label": config.label,
            "train_seconds_this_process": time.time() - started, "resumed_from_step": start_step,
            "num_parameters": sum(p.numel() for p in raw_module.vae.parameters()),
            "num_processes": world, "versions": _versions()})
        finalize_run_dir(staging, final_dir)
        shutil.rmtree(partial_dir, ignore_errors=True)
        accelerator.print(f"[tvae] run {config.label or config.key} stored in {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir


_AVERAGED = ("rate", "distortion", "elbo", "loss", "free_bits_rate", "mdr_constraint")


def _global_diagnostics(accelerator, diagnostics: dict, multiplier) -> dict:
    """Averages over processes of the per-process terms (equal slices, so the mean over processes
    is the global batch mean), and the spread of the MDR multiplier across processes (0 when the
    ranks are in sync, which DDP's gradient averaging guarantees)."""
    names = [n for n in _AVERAGED if n in diagnostics]
    local = torch.tensor([diagnostics[n] for n in names], dtype=torch.float64, device=accelerator.device)
    averaged = accelerator.reduce(local, reduction="mean")
    out = {n: float(v) for n, v in zip(names, averaged)}
    if multiplier is not None:
        values = accelerator.gather(multiplier.value.detach().reshape(1).double())
        out["mdr_lambda_rank_spread"] = float(values.max() - values.min())
    return out


def _save_checkpoint(directory: Path, step, history, module, optimizer, scheduler, multiplier_opt) -> None:
    """Atomic checkpoint: weights in safetensors, optimiser state via torch.save of plain tensors
    (our own file, reloaded with ``weights_only=True``), counters and curves in JSON."""
    from safetensors.torch import save_model

    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(module, str(staging / "module.safetensors"))
    optim_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if multiplier_opt is not None:
        optim_state["multiplier_optimizer"] = multiplier_opt.state_dict()
    torch.save(optim_state, staging / "optimizer.pt")
    write_json_atomic(staging / "history.json", history)
    write_json_atomic(staging / "state.json", {"step": step})  # written last: marks completeness
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(directory: Path, module, optimizer, scheduler, multiplier_opt):
    from safetensors.torch import load_model

    step = json.loads((directory / "state.json").read_text())["step"]
    load_model(module, str(directory / "module.safetensors"), strict=True)
    state = torch.load(directory / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if multiplier_opt is not None:
        multiplier_opt.load_state_dict(state["multiplier_optimizer"])
    history = json.loads((directory / "history.json").read_text())
    return step, history
