"""Training loop: AdamW, gradient clipping, periodic validation, resumable checkpoints.

Determinism: batches of step ``t`` come from a permutation seeded by ``(seed, epoch)`` and the
global torch RNG (dropout, z ~ q(z|x), word dropout) is re-seeded from ``(seed, step)`` at every
step, so a run resumed from a checkpoint replays exactly the steps it would have taken, and a
run of N steps passes through the finished state of the same run of n < N steps (when its beta
does not depend on the number of steps): :func:`train` writes such shorter runs on the way
(``snapshots``) instead of training each from step 0.

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
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .build import build_model, training_corpus
from .cache import (DamagedCacheError, non_finite_numbers, non_finite_tensors, publish_dir, set_aside, staging_path,
                    verify_dir, write_json_atomic)
from .config import (CACHE_FORMAT_VERSION, RunConfig, TrainConfig, corpus_fingerprint, training_code_fingerprint,
                     training_code_version)
from .data import iterate_batches
from .device import module_device, move_batch, resolve_device, synchronize
from .model import TransformerVAE
from .methods import compute_loss, get_method
from .objectives import LagrangeMultiplier

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Var_x E_q[z_d] > 0.01


class TrainingDiverged(FloatingPointError):
    """A non-finite value appeared in training; the message names the step and the term."""


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as one fused kernel over all parameters: on the default VAE (one CPU thread, torch
    profiler) the per-parameter loop took 6.2 ms per step, the fused kernel 1.5 ms."""
    return torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=True)


class TrainingModule(nn.Module):
    """The VAE plus the objective's own trainable state (the MDR multiplier), one module so that
    Accelerate/DDP synchronises and checkpoints both."""

    def __init__(self, vae: TransformerVAE, multiplier: LagrangeMultiplier | None):
        super().__init__()
        self.vae = vae
        self.multiplier = multiplier

    def forward(self, batch):
        return self.vae.forward_terms(batch)


class StepTimer:
    """Steady-state training speed, for ``meta.json``: the wall time of the steps after the first
    ``warmup`` (allocator, cuBLAS and kernel set-up), validation and checkpoints excluded, and the
    tokens those steps read (non-padding tokens of the batch, BOS/EOS included). The device is
    synchronised only where the clock is read (the warm-up's end, around the pauses, the end), so
    timing adds no synchronisation to a step."""

    def __init__(self, device: torch.device, start_step: int, max_steps: int, warmup: int = 20):
        self.device = device
        self.first_timed_step = start_step + min(warmup, max(1, (max_steps - start_step) // 10))
        self.seconds, self.steps, self.tokens = 0.0, 0, 0
        self._since: float | None = None

    def at_step(self, step: int) -> None:
        if step == self.first_timed_step:
            synchronize(self.device)
            self._since = time.perf_counter()
        if step >= self.first_timed_step:
            self.steps += 1

    def count_tokens(self, step: int, attention_mask: torch.Tensor) -> None:
        if step >= self.first_timed_step:
            self.tokens += int(attention_mask.sum())  # a CPU batch: no device synchronisation

    def stop(self) -> None:
        if self._since is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._since
            self._since = None

    @contextmanager
    def paused(self):
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self._since = time.perf_counter()

    def summary(self) -> dict:
        if not self.steps or self.seconds <= 0:
            return {"device": str(self.device), "timed_steps": 0}
        return {"device": str(self.device), "timed_steps": self.steps, "seconds": self.seconds,
                "seconds_per_step": self.seconds / self.steps, "tokens_per_second": self.tokens / self.seconds}


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


@torch.no_grad()
def validation_terms(model: TransformerVAE, sequences: list[list[int]], pad_id: int, batch_size: int = 128,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-sentence rate and distortion [N], predicted tokens [N] and posterior means [N, D], on
    the model's device (each batch is moved there; nothing is read back to the host)."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    device = module_device(model)
    rates, distortions, tokens, means = [], [], [], []
    for batch in iterate_batches(sequences, batch_size, pad_id, shuffle=False, bucket=True):
        batch = move_batch(batch, device)
        terms = model.forward_terms(batch)
        rates.append(terms["kl_per_dim"].sum(-1))
        distortions.append(terms["distortion"])
        tokens.append(model.num_predicted_tokens(batch))
        means.append(terms["posterior"].loc)
    model.train(was_training)
    return {"rate": torch.cat(rates), "distortion": torch.cat(distortions), "tokens": torch.cat(tokens),
            "means": torch.cat(means)}


@torch.no_grad()
def validation_metrics(model: TransformerVAE, sequences: list[list[int]], pad_id: int, batch_size: int = 128,
                       seed: int = 0) -> dict[str, float]:
    """Single-sample validation terms (nats per sentence): rate, distortion, ELBO, per-token NLL
    bound, active units. The full estimators (IW bound, MI) live in ``tvae_core.estimators``."""
    terms = {k: v.double().cpu() for k, v in validation_terms(model, sequences, pad_id, batch_size, seed).items()}
    rate, distortion, means = terms["rate"], terms["distortion"], terms["means"]
    num_tokens = terms["tokens"].sum()
    activity = means.var(0) if means.shape[0] > 1 else torch.zeros(means.shape[1], dtype=torch.float64)
    return {
        "rate": rate.mean().item(),
        "distortion": distortion.mean().item(),
        "elbo": -(rate + distortion).mean().item(),
        "nll_per_token_bound": ((rate + distortion).sum() / num_tokens).item(),
        "perplexity_bound": _exp_or_inf(((rate + distortion).sum() / num_tokens).item()),
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum().item()),
        "num_sentences": int(rate.shape[0]),
    }


def _exp_or_inf(x: float) -> float:
    """exp(x), inf past the float range (a diverged run's perplexity; refused by the caller)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _check_finite_metrics(step: int, metrics: dict, what: str = "validation") -> None:
    bad = non_finite_numbers(metrics)
    if bad:
        raise TrainingDiverged(f"non-finite {what} {', '.join(bad)} at step {step} "
                               f"({', '.join(f'{n}={metrics[n]}' for n in bad)}); "
                               "lower train.learning_rate or check the data")


def _check_finite(step: int, loss: torch.Tensor, terms: dict) -> None:
    for name, value in (("distortion", terms["distortion"]), ("kl_per_dim", terms["kl_per_dim"]), ("loss", loss)):
        if not torch.isfinite(value).all():
            _raise_non_finite(name, step, value)


def _raise_non_finite(name: str, step: int, value: torch.Tensor):
    raise TrainingDiverged(f"non-finite {name} at step {step} "
                           f"(value sample: {value.detach().flatten()[:4].tolist()}); "
                           "lower train.learning_rate or check the data")


def _micro_batches(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` in ``count`` equal, contiguous slices (equal sizes, so the mean of their mean
    losses is the batch's mean loss, and the gradients Accelerate averages are the batch's)."""
    if count == 1:
        return [batch]
    return [dict(zip(batch, parts)) for parts in zip(*(v.chunk(count) for v in batch.values()))]


def _merge_micro_batches(parts: list[tuple]) -> tuple:
    """One step's ``(loss, terms, diagnostics)`` from its micro-batches': the per-batch terms
    (:data:`_AVERAGED`) averaged, the others (beta, the multiplier) the last micro-batch's, and
    the terms that the finite checks read concatenated."""
    if len(parts) == 1:
        return parts[0]
    losses, terms, diagnostics = zip(*parts)
    merged = dict(diagnostics[-1])
    for name in _AVERAGED:
        if name in merged:
            values = [d[name] for d in diagnostics]
            merged[name] = (torch.stack(values).mean() if isinstance(values[0], torch.Tensor)
                            else sum(values) / len(values))
    checked = {k: torch.cat([t[k].detach() for t in terms]) for k in ("distortion", "kl_per_dim")}
    return torch.stack([loss.detach() for loss in losses]).mean(), checked, merged


def _unscale_state_gradient(state: nn.Module, scaler) -> None:
    """Divide the gradients of a method's own state (the MDR multiplier) by fp16's loss scale
    (no scaler: nothing to do); a non-finite one (the scale overflowed it) is dropped, so its
    optimiser skips the step, as the scaler makes the model's optimiser skip its own."""
    if scaler is None:
        return
    inverse_scale = 1.0 / scaler.get_scale()
    for parameter in state.parameters():
        if parameter.grad is not None:
            parameter.grad.mul_(inverse_scale)
            if not torch.isfinite(parameter.grad).all():
                parameter.grad = None


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


def train(config: RunConfig, output_dir: str | Path, checkpoint_dir: str | Path, *, progress: bool = True,
          snapshots: dict[RunConfig, str | Path] | None = None) -> Path:
    """Train ``config`` to completion and write the finished run's files into ``output_dir``
    (created; see :data:`tvae_core.runs.RUN_FILES`); returns it. Publishing it in the run cache
    is the caller's (:func:`tvae_core.runs.train_or_load`).

    ``snapshots`` maps shorter runs of the same config (only ``train.max_steps`` and the label
    differ) to folders: when this run reaches a snapshot's last step, that run's files are
    written there, exactly the files training it on its own would write (weights, history,
    validation at its last step, metrics; batches, noise and learning rate depend on the step
    only). A snapshot whose step a resumed run has already passed is not written. Refused,
    naming the snapshot, when the configs differ otherwise, when the objective's beta schedule
    depends on ``max_steps`` (cyclical) or in a distributed run.

    Runs on ``train.num_threads`` torch threads (restored afterwards), so the numbers do not
    depend on how the process was launched. Checkpoints go to ``checkpoint_dir/step-<n>/`` every
    ``train.checkpoint_every`` steps (the newest two are kept); a later call resumes from the
    newest one that verifies. Nothing non-finite is written: a diverged run raises
    :class:`TrainingDiverged` naming the step and the term. In a distributed run only the main
    process writes ``output_dir``.
    """
    if config.train.mixed_precision == "fp16" and resolve_device().type != "cuda":
        raise ValueError("train.mixed_precision='fp16' needs a CUDA GPU; accepted values on this machine: "
                         "('no', 'bf16')")
    by_step = check_snapshots(config, snapshots or {})
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.train.num_threads)
    try:
        for _ in range(_MAX_RESUME_ATTEMPTS):
            try:
                return _train(config, Path(output_dir), Path(checkpoint_dir), progress=progress, snapshots=by_step)
            except _CheckpointUnusable:  # set aside; start again from the next older checkpoint
                continue
        return _train(config, Path(output_dir), Path(checkpoint_dir), progress=progress, snapshots=by_step)
    finally:
        torch.set_num_threads(previous_threads)


def is_prefix_of(shorter: RunConfig, longer: RunConfig) -> bool:
    """Whether training ``longer`` passes through ``shorter``'s finished state: the same config
    but for a smaller ``train.max_steps`` (and the label), under an objective whose beta at
    every step of ``shorter`` does not depend on ``max_steps``."""
    from .methods import beta_at

    steps = shorter.train.max_steps
    if not 1 <= steps < longer.train.max_steps:
        return False
    if longer.replace(train={"max_steps": steps}, label=shorter.label) != shorter:
        return False
    oc = longer.objective
    return all(beta_at(t, oc, steps) == beta_at(t, oc, longer.train.max_steps) for t in range(steps))


def check_snapshots(config: RunConfig, snapshots: dict) -> dict[int, tuple[RunConfig, Path]]:
    """The snapshots of :func:`train` by step, or ValueError naming the one refused."""
    by_step: dict[int, tuple[RunConfig, Path]] = {}
    if snapshots and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("snapshots are written by single-process training only; accepted values: none "
                         f"under {os.environ.get('WORLD_SIZE')} processes")
    for shorter, folder in snapshots.items():
        if not is_prefix_of(shorter, config):
            raise ValueError(f"snapshot {shorter.label or shorter.key!r} is not a shorter run of "
                             f"{config.label or config.key!r}; accepted: the same config with train.max_steps in "
                             f"1..{config.train.max_steps - 1} (and another label), under an objective whose "
                             "beta schedule does not depend on max_steps")
        if shorter.train.max_steps in by_step:
            raise ValueError(f"two snapshots at step {shorter.train.max_steps}; accepted: one per step")
        by_step[shorter.train.max_steps] = (shorter, Path(folder))
    return by_step


_MAX_RESUME_ATTEMPTS = 3


def _train(config: RunConfig, output_dir: Path, partial_dir: Path, *, progress: bool = True,
           snapshots: dict[int, tuple[RunConfig, Path]]) -> Path:
    from accelerate import Accelerator

    tc, oc = config.train, config.objective
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate keeps one process-wide state; a run's own mixed precision must not depend on
        # the runs trained before it in the same process (a notebook, the GPU check)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    # the LR schedule counts optimiser steps, stepped by hand on synchronised steps only (Accelerate's
    # default would step it once per process)
    accelerator = Accelerator(gradient_accumulation_steps=tc.gradient_accumulation_steps,
                              mixed_precision=tc.mixed_precision, cpu=resolve_device().type == "cpu",
                              step_scheduler_with_optimizer=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    if tc.batch_size % (world * tc.gradient_accumulation_steps):
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({world}) "
                         f"times train.gradient_accumulation_steps ({tc.gradient_accumulation_steps})")

    torch.manual_seed(tc.seed)
    corpus = training_corpus(config)
    vocab = corpus.vocab
    train_ids, valid_ids = corpus.token_ids("train"), corpus.token_ids("valid")
    vae = build_model(config, vocab)
    method = get_method(oc.name)  # the method's own trainable state (the MDR multiplier), from its entry
    multiplier = method.new_state(oc) if method.new_state else None
    module = TrainingModule(vae, multiplier)
    optimizer = make_optimizer(vae, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / tc.lr_warmup_steps) if tc.lr_warmup_steps else 1.0)
    multiplier_opt = method.state_optimizer(multiplier, oc) if multiplier else None

    start_step, history = _resume(partial_dir, config, module, optimizer, scheduler, multiplier_opt)
    if start_step:
        accelerator.print(f"[tvae] resuming {config.label or config.key} from step {start_step}")

    # the multiplier's optimiser stays unprepared: prepared, it would go through fp16's GradScaler
    # a second time (unscaled with the model's gradients, then again by its own step); it is
    # stepped by hand, once per optimiser step, on a gradient unscaled here
    module, optimizer = accelerator.prepare(module, optimizer)
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
        timer.count_tokens(step, batch["attention_mask"])
        if accelerator.device.type == "cuda":
            # a copy from pageable memory first waits for the GPU's queue; from pinned memory it is
            # queued behind it, so the host can run ahead by a step
            return {k: v.pin_memory().to(accelerator.device, non_blocking=True) for k, v in batch.items()}
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
    timer = StepTimer(accelerator.device, start_step, tc.max_steps)
    bar = tqdm(range(start_step, tc.max_steps), desc=config.label or config.objective.name, initial=start_step,
               total=tc.max_steps, disable=not progress or not accelerator.is_main_process, mininterval=2.0,
               file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        timer.at_step(step)
        torch.manual_seed(_step_seed(tc.seed, step))
        with _earlier_divergence_first(deferred):
            # one optimiser step over the step's batch, in train.gradient_accumulation_steps
            # micro-batches (Accelerate averages their gradients and syncs on the last)
            parts = []
            for micro_batch in _micro_batches(batch_for(step), tc.gradient_accumulation_steps):
                with accelerator.accumulate(module):
                    terms = module(micro_batch)
                    loss, diagnostics = compute_loss(terms, oc, step, tc.max_steps, raw_module.multiplier,
                                                     read=deferred is None)
                    if deferred is None:
                        _check_finite(step, loss, terms)
                    accelerator.backward(loss)
                parts.append((loss, terms, diagnostics))
            loss, terms, diagnostics = _merge_micro_batches(parts)
            grad_norm = accelerator.clip_grad_norm_(raw_module.vae.parameters(), tc.grad_clip)
            if deferred is None and not torch.isfinite(torch.as_tensor(grad_norm)):
                raise TrainingDiverged(f"non-finite gradient norm at step {step} (loss {loss.item():.4g})")
            if multiplier_opt is not None:  # before the model's step, which may change a loss scale
                _unscale_state_gradient(raw_module.multiplier, accelerator.scaler)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if multiplier_opt is not None:
                multiplier_opt.step()
                multiplier_opt.zero_grad(set_to_none=True)
        done = step + 1
        evaluate = done % tc.eval_every == 0 or done == tc.max_steps
        checkpoint = done % tc.checkpoint_every == 0 and done < tc.max_steps
        snapshot = snapshots.get(done)
        if deferred is None:
            diagnostics.update(step=step, grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0])
            if world > 1:
                diagnostics.update(_global_diagnostics(accelerator, diagnostics, raw_module.multiplier))
            record([diagnostics])
        else:
            deferred.add(step, loss, terms, diagnostics, grad_norm, scheduler.get_last_lr()[0])
            if len(deferred.pending) >= tc.sync_every or evaluate or checkpoint or snapshot:
                record(deferred.read())
        if evaluate or snapshot or (checkpoint and accelerator.is_main_process):
            with timer.paused():
                if evaluate:
                    metrics = validation_metrics(raw_module.vae, valid_ids, vocab.pad_id, seed=tc.seed)
                    _check_finite_metrics(done, metrics)
                    history["valid"].append({"step": done, **metrics})
                    module.train()
                if snapshot:
                    _write_snapshot(*snapshot, history, raw_module, vocab, valid_ids, started, timer,
                                    keep_validation=evaluate, parent_key=config.key, resumed_from_step=start_step)
                    module.train()
                if checkpoint and accelerator.is_main_process:
                    _save_checkpoint(partial_dir, config.key, done, history, raw_module, optimizer, scheduler,
                                     multiplier_opt)
    timer.stop()
    bar.close()
    accelerator.wait_for_everyone()

    final_metrics = _final_metrics(history, raw_module)
    _check_publishable(tc.max_steps, final_metrics, raw_module)
    if accelerator.is_main_process:
        meta = _meta(config, raw_module, started, timer, resumed_from_step=start_step, num_processes=world)
        _write_run(output_dir, config, raw_module.vae, vocab, history, final_metrics, meta)
    accelerator.wait_for_everyone()
    return output_dir


def _final_metrics(history: dict, module: TrainingModule) -> dict:
    metrics = dict(history["valid"][-1])
    if module.multiplier is not None:
        metrics["mdr_lambda"] = module.multiplier.value.item()
    return metrics


def _meta(config: RunConfig, module: TrainingModule, started: float, timer: StepTimer, **extra) -> dict:
    return {"cache_format_version": CACHE_FORMAT_VERSION, "key": config.key, "label": config.label,
            "train_seconds_this_process": time.time() - started, **extra,
            "num_parameters": sum(p.numel() for p in module.vae.parameters()),
            "num_threads": torch.get_num_threads(), "versions": _versions(),
            "corpus_sha256": corpus_fingerprint(config.data), "code_version": training_code_version(config.trains_native_head),
            "code_sha256": training_code_fingerprint(config.trains_native_head), "timing": timer.summary()}


def _write_snapshot(config: RunConfig, folder: Path, history: dict, module: TrainingModule, vocab, valid_ids,
                    started: float, timer: StepTimer, *, keep_validation: bool, parent_key: str,
                    resumed_from_step: int) -> None:
    """Write the run ``config`` (a shorter run of the one in training, now at its last step) into
    ``folder``: its history is this run's so far, with the validation at its last step that
    training it alone would have added (computed here when this run does not validate then)."""
    steps = config.train.max_steps
    own = {"train": list(history["train"]), "valid": [v for v in history["valid"] if v["step"] <= steps]}
    if not keep_validation:
        metrics = validation_metrics(module.vae, valid_ids, vocab.pad_id, seed=config.train.seed)
        _check_finite_metrics(steps, metrics)
        own["valid"].append({"step": steps, **metrics})
    final_metrics = _final_metrics(own, module)
    _check_publishable(steps, final_metrics, module)
    meta = _meta(config, module, started, timer, resumed_from_step=resumed_from_step, num_processes=1,
                 snapshot_of=parent_key)
    _write_run(folder, config, module.vae, vocab, own, final_metrics, meta)


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


def _check_publishable(step: int, final_metrics: dict, module: nn.Module) -> None:
    _check_finite_metrics(step, final_metrics, "final metric")
    bad = non_finite_tensors(dict(module.named_parameters()))
    if bad:
        raise TrainingDiverged(f"non-finite weights {bad[:3]} after step {step}; lower train.learning_rate")


def _write_run(output_dir: Path, config: RunConfig, vae: TransformerVAE, vocab, history: dict, metrics: dict,
               meta: dict) -> None:
    """The finished run's files (:data:`tvae_core.runs.RUN_FILES`) in the new folder ``output_dir``."""
    from safetensors.torch import save_model

    output_dir.mkdir(parents=True)
    vae.eval()
    save_model(vae, str(output_dir / "model.safetensors"))
    vocab.save(output_dir / "tokenizer.json")
    write_json_atomic(output_dir / "config.json", config.to_dict())
    write_json_atomic(output_dir / "history.json", history)
    write_json_atomic(output_dir / "metrics.json", metrics)
    write_json_atomic(output_dir / "meta.json", meta)


CHECKPOINT_FILES = ("module.safetensors", "optimizer.pt", "history.json", "state.json")
_KEEP_CHECKPOINTS = 2  # the newest two: if the newest is damaged, resume from the one before


class _CheckpointUnusable(RuntimeError):
    """A verified checkpoint could still not be applied; it has been set aside."""


def _checkpoints(partial_dir: Path) -> list[Path]:
    """Complete checkpoint folders ``step-<n>`` (published atomically), newest first."""
    if not partial_dir.is_dir():
        return []
    found = [p for p in partial_dir.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name[len("step-"):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len("step-"):]), reverse=True)


def _save_checkpoint(partial_dir: Path, key: str, step, history, module, optimizer, scheduler,
                     multiplier_opt) -> None:
    """Checkpoint ``partial_dir/step-<step>``: weights in safetensors, optimiser state via
    torch.save of plain tensors (our own file, reloaded with ``weights_only=True``), counters and
    curves in JSON, all checksummed in a manifest; built in a staging folder of this process and
    renamed into place, so no moment exists without a complete checkpoint. Non-finite weights
    are never checkpointed."""
    from safetensors.torch import save_model

    bad = non_finite_tensors(dict(module.named_parameters()))  # parameters: a buffer may hold a NaN sentinel
    if bad:
        raise TrainingDiverged(f"non-finite weights {bad[:3]} after step {step}; lower train.learning_rate")
    partial_dir.mkdir(parents=True, exist_ok=True)
    final = partial_dir / f"step-{step:09d}"
    staging = staging_path(final)
    staging.mkdir()
    save_model(module, str(staging / "module.safetensors"))
    optim_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if multiplier_opt is not None:
        optim_state["multiplier_optimizer"] = multiplier_opt.state_dict()
    torch.save(optim_state, staging / "optimizer.pt")
    write_json_atomic(staging / "history.json", history)
    write_json_atomic(staging / "state.json", {"step": step})
    if final.exists():  # a rerun reached the same step: replace it
        shutil.rmtree(final, ignore_errors=True)
    publish_dir(staging, final, key)
    for old in _checkpoints(partial_dir)[_KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(folder: Path, key: str, module: nn.Module, max_steps: int):
    """Everything of one checkpoint, verified (checksums, step, tensor names/shapes/finiteness,
    history), before anything is applied; raises :class:`DamagedCacheError` naming the file."""
    from safetensors.torch import load_file

    verify_dir(folder, key, CHECKPOINT_FILES)
    name = folder / "state.json"
    try:
        step = json.loads(name.read_text())["step"]
        if not isinstance(step, int) or isinstance(step, bool) or not 0 < step < max_steps:
            raise ValueError(f"step {step!r} outside 1..{max_steps - 1}")
        name = folder / "history.json"
        history = json.loads(name.read_text())
        if not isinstance(history.get("train"), list) or len(history["train"]) != step:
            raise ValueError(f"the training curve does not have {step} entries")
        name = folder / "module.safetensors"
        tensors = load_file(str(name))
        expected = module.state_dict()
        # safetensors stores a tied tensor once: a name may be absent if it shares storage with one present
        present = {expected[k].data_ptr() for k in tensors if k in expected}
        if not set(tensors) <= set(expected) or any(tensors[k].shape != expected[k].shape for k in tensors) \
                or any(expected[k].data_ptr() not in present for k in set(expected) - set(tensors)):
            raise ValueError("tensor names or shapes do not match the model")
        parameters = dict(module.named_parameters())
        if non_finite_tensors({k: t for k, t in tensors.items() if k in parameters}):
            raise ValueError("non-finite weights")
        name = folder / "optimizer.pt"
        optim_state = torch.load(name, weights_only=True)
        if not isinstance(optim_state, dict) or not {"optimizer", "scheduler"} <= set(optim_state):
            raise ValueError("not an optimiser state")
    except DamagedCacheError:
        raise
    except Exception as err:
        raise DamagedCacheError(f"{name}: unusable ({type(err).__name__}: {err})") from None
    return step, tensors, optim_state, history


def _resume(partial_dir: Path, config: RunConfig, module, optimizer, scheduler, multiplier_opt):
    """``(step, history)`` of the newest checkpoint that verifies, applied to the given objects;
    ``(0, empty history)`` if none does. Damaged checkpoints are set aside with one warning each."""
    from safetensors.torch import load_model

    for folder in _checkpoints(partial_dir):
        try:
            step, _, optim_state, history = _read_checkpoint(folder, config.key, module, config.train.max_steps)
        except DamagedCacheError as err:
            set_aside(folder, str(err))
            continue
        try:
            load_model(module, str(folder / "module.safetensors"), strict=True)
            optimizer.load_state_dict(optim_state["optimizer"])
            scheduler.load_state_dict(optim_state["scheduler"])
            if multiplier_opt is not None:
                multiplier_opt.load_state_dict(optim_state["multiplier_optimizer"])
        except Exception as err:  # partly applied: start again on fresh objects
            set_aside(folder, f"cannot be applied ({type(err).__name__}: {err})")
            raise _CheckpointUnusable(str(folder)) from None
        return step, history
    return 0, {"train": [], "valid": []}
