"""Core timings on this machine, measured side by side in one process.

1. A training step of the default VAE vs the same decoder trained as a plain LM (same batches):
   the ratio the performance target is stated in (<= 1.4); the same two with a float32 LM head
   (the profile's ``training.lm_head_dtype`` is bfloat16 on the default); and the VAE step before
   the optimisations (unfused float32 cross-entropy, GPT-2's 8-op "gelu_new", AdamW's
   per-parameter loop) vs after. All five models share one process, so their allocations shape
   each other's: with glibc's defaults (``TVAE_CORE_MALLOPT=0``) the "before" model's ~50 MB
   float32 logits raise glibc's mmap threshold for the whole process, and the VAE and LM steps
   here ran near their fault-free times (one thread, with the 2-layer encoder: 52.7 / 37.3 ms vs
   48.7 / 35.0 ms with ``tvae_core.allocator``'s setting, one run each), unlike a fresh process.
   ``bench_train_process.py`` times the step as the book trains it (a fresh process per run,
   one thread), with and without the allocator's setting.
2. The LM head per target row: the torch path's two kernels (bfloat16 matmul, float32
   log-softmax) vs the compiled kernel (``tvae_core.native``: transposed matmul + one-sweep
   log-sum-exp). The importance-weighted log-likelihood with K = 500: before (float32, plain head,
   8-op GELU, 2,000 sequences per decoder call) vs after (the profile's ``decoder_dtype``, compiled
   head kernel, exact (erf) GELU, 500 per call, sentences bucketed by length, ``--threads`` batches
   at once) on the same sentences; the evaluation's levers one at a time on every 25th test
   sentence; then the whole PTB test split (3,761 sentences) with the current code (target: < 3
   minutes).
3. Aggregate-posterior MI and marginal KL over N = 10,000 points in D = 32 (target: < 5 s).

Run: ``make bench`` (or ``.venv/bin/python benchmarks/bench_core.py [--threads 2] [--skip-iw]``).
Models are freshly initialised (timings do not depend on the weights).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench_steps import training_batches  # this script's folder is on sys.path
from tvae_core.allocator import keep_freed_memory
from tvae_core import native
from tvae_core.data import iterate_batches, load_corpus
from tvae_core.estimators import evaluate_log_likelihood, self_and_leave_one_out_terms
from tvae_core.experiments import method_config
from tvae_core.methods import compute_loss
from tvae_core.profiles import get_profile
from tvae_core.build import build_model
from tvae_core.train import make_optimizer

keep_freed_memory()   # as the book's training processes do (tvae_core.cli): no page faults per step


def as_before(model):
    """The model as it was computed before the LM-head optimisations (same weights)."""
    from transformers.activations import ACT2FN

    model.fuse_lm_head = model.fuse_lm_head_in_evaluation = False
    model.training_head_dtype = None
    for block in model.decoder.transformer.h:
        block.mlp.act = ACT2FN["gelu_new"]
    return model


def training_pass(cfg, model, optimizer, batches) -> torch.Tensor:
    """One optimiser step per batch, as the training loop takes it; returns the last loss."""
    for step, batch in enumerate(batches):
        loss, _ = compute_loss(model.forward_terms(batch), cfg.objective, step, len(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss


def time_training_steps(profile: str, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per optimiser step; the variants interleaved so all see the same load."""
    vae_cfg, lm_cfg = method_config("VAE", profile), method_config("LM", profile)
    corpus = load_corpus(vae_cfg.data)
    batches = training_batches(vae_cfg, corpus, steps)
    models = {}
    for name, cfg, variant in (("VAE", vae_cfg, "profile"), ("LM", lm_cfg, "profile"),
                               ("VAE float32 head", vae_cfg, "float32"), ("LM float32 head", lm_cfg, "float32"),
                               ("VAE before", vae_cfg, "before")):
        torch.manual_seed(0)
        model = build_model(cfg, corpus.vocab).train()
        if variant == "before":  # also the per-parameter AdamW loop
            optimizer = torch.optim.AdamW(as_before(model).parameters(), cfg.train.learning_rate)
        else:
            if variant == "float32":
                model.training_head_dtype = None
            optimizer = make_optimizer(model, cfg.train)
        models[name] = (cfg, model, optimizer)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, (cfg, model, opt) in models.items():
            started = time.perf_counter()
            training_pass(cfg, model, opt, batches)
            times[name].append((time.perf_counter() - started) / len(batches))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def time_iw(profile: str, num_samples: int, sentences: slice, before: bool = False,
            decoder_dtype: str | None = None, workers: int = 1, sentences_per_call: int = 5,
            progress: bool = True, compiled_head: bool = True) -> tuple[float, int, float]:
    """Seconds for IW with K = ``num_samples`` on ``test[sentences]``; ``sentences_per_call`` x 100
    samples per decoder call (the evaluation's setting; "before" used 20 x 100, float32).
    ``decoder_dtype`` None: the profile's; ``compiled_head`` False: the torch path of the head
    (``tvae_core.native.disabled``). Returns (seconds, N, mean bound)."""
    cfg = method_config("VAE", profile)
    corpus = load_corpus(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, corpus.vocab).eval()
    if before:
        as_before(model)
    else:
        model = model.at_precision(decoder_dtype or get_profile(profile).estimators.decoder_dtype)
    seqs = corpus.token_ids("test")[sentences]
    started = time.perf_counter()
    batches = iterate_batches(seqs, sentences_per_call, corpus.vocab.pad_id, bucket=not before)
    with contextlib.nullcontext() if compiled_head and not before else native.disabled():
        result = evaluate_log_likelihood(model, batches,
                                         num_samples=num_samples, chunk_size=100,
                                         generator=torch.Generator().manual_seed(0), progress=progress,
                                         workers=workers)
    return time.perf_counter() - started, len(seqs), result.mean


def time_head(profile: str, repeats: int = 300) -> dict[str, float]:
    """The LM head's cost per target row on ONE thread, 64-row blocks of the default head
    (hidden -> 10k words), median over ``repeats``: the torch path's two kernels (the bfloat16
    vocabulary matmul; the float32 log-softmax with the bfloat16 -> float32 conversion) and the
    compiled kernel (the whole head: exact target logits, matmul, log-sum-exp) on 64 x 64 rows.
    Also the K=500 target rows of the whole test split."""
    import torch.nn.functional as F

    from tvae_core.lm_head import _exact_target_logits

    cfg = method_config("VAE", profile)
    corpus = load_corpus(cfg.data)
    out = {"rows": 500 * sum(len(s) - 1 for s in corpus.token_ids("test"))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(64 * 64, cfg.model.hidden_size, generator=gen)
        weight = torch.randn(corpus.vocab.size, cfg.model.hidden_size, generator=gen) * 0.1
        targets = torch.randint(0, corpus.vocab.size, (64 * 64,), generator=gen)
        block, weight16 = hidden[:64].bfloat16(), weight.bfloat16()
        logits = F.linear(block, weight16)

        def median_seconds(fn, repeats=repeats):
            fn()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return sorted(times)[len(times) // 2]
        out["matmul"] = median_seconds(lambda: F.linear(block, weight16)) / 64
        out["log-softmax"] = median_seconds(
            lambda: F.cross_entropy(logits.float(), targets[:64], reduction="none")) / 64
        if native.available():
            hidden16 = hidden.bfloat16()
            exact = _exact_target_logits(hidden, weight, None, targets)
            out["compiled"] = median_seconds(lambda: native.lm_head_nll(hidden16, weight16, targets, exact),
                                             max(5, repeats // 30)) / len(targets)
    finally:
        torch.set_num_threads(threads)
    return out


def time_aggregate(num_points: int, dim: int) -> float:
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(num_points, dim, generator=gen, dtype=torch.float64)
    scale = torch.rand(num_points, dim, generator=gen, dtype=torch.float64) + 0.1
    started = time.perf_counter()
    self_and_leave_one_out_terms(loc, scale, generator=gen)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--skip-iw", action="store_true")
    parser.add_argument("--iw-sentences", type=int, default=None, help="None = whole test split")
    parser.add_argument("--compare-sentences", type=int, default=40,
                        help="sentences for the IW before/after comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    step = time_training_steps(args.profile, steps=10, repeats=3)
    rows.append(("train step, VAE (s)", step["VAE"], ""))
    rows.append(("train step, LM, same decoder (s)", step["LM"], ""))
    rows.append(("ratio VAE / LM", step["VAE"] / step["LM"], "target <= 1.4"))
    head_dtype = get_profile(args.profile).train.lm_head_dtype
    rows.append(("train step, VAE, float32 LM head (s)", step["VAE float32 head"], f"profile: {head_dtype}"))
    rows.append(("train step, LM, float32 LM head (s)", step["LM float32 head"], ""))
    rows.append(("ratio VAE / LM, float32 LM head", step["VAE float32 head"] / step["LM float32 head"], ""))
    rows.append(("train step, VAE before head/GELU/AdamW changes (s)", step["VAE before"], ""))
    rows.append(("speed-up of the VAE step (before / after)", step["VAE before"] / step["VAE"], ""))
    rows.append(("aggregate MI + marginal KL, N=10k, D=32 (s)", time_aggregate(10_000, 32), "target < 5"))
    head = time_head(args.profile)
    rows.append(("LM head per target row, 1 thread: bf16 matmul (us)", head["matmul"] * 1e6, "64 x 64 x 10k"))
    rows.append(("LM head per target row, 1 thread: log-softmax (us)", head["log-softmax"] * 1e6, "float32"))
    rows.append((f"  => torch path, {head['rows'] / 1e6:.1f}M rows / {args.threads} threads (s)",
                 head["rows"] * (head["matmul"] + head["log-softmax"]) / args.threads, "whole-split IW, head only"))
    if "compiled" in head:
        rows.append(("LM head per target row, 1 thread: compiled kernel (us)", head["compiled"] * 1e6,
                     "tvae_core.native"))
        rows.append((f"  => compiled, {head['rows'] / 1e6:.1f}M rows / {args.threads} threads (s)",
                     head["rows"] * head["compiled"] / args.threads, "whole-split IW, head only"))
        rows.append(("  speed-up of the head (torch path / compiled)",
                     (head["matmul"] + head["log-softmax"]) / head["compiled"], ""))
    if not args.skip_iw:
        n = args.compare_sentences
        before, _, before_mean = time_iw(args.profile, 500, slice(n), before=True, sentences_per_call=20,
                                         progress=False)
        after, _, after_mean = time_iw(args.profile, 500, slice(n), workers=args.threads, progress=False)
        rows.append((f"IW K=500, {n} sentences, before (s)", before, ""))
        rows.append((f"IW K=500, {n} sentences, after (s)", after, ""))
        rows.append(("speed-up of IW (before / after)", before / after,
                     f"bounds {before_mean:.3f} vs {after_mean:.3f} (other sample order)"))
        # the evaluation's levers one at a time, on every 25th test sentence (all lengths)
        every = slice(None, None, 25)
        lever = {}
        levers = [("float32, 1 batch", "float32", 1, False),
                  ("bfloat16, 1 batch", "bfloat16", 1, False),
                  (f"bfloat16, {args.threads} batches at once", "bfloat16", args.threads, False)]
        if native.available():
            levers.append((f"+ compiled head, {args.threads} batches", "bfloat16", args.threads, True))
        for name, dtype, workers, compiled in levers:
            lever[name], m, mean = time_iw(args.profile, 500, every, decoder_dtype=dtype, workers=workers,
                                           progress=False, compiled_head=compiled)
            rows.append((f"IW K=500, {m} sentences, {name} (s)", lever[name], f"bound {mean:.5f}"))
        names = list(lever)
        rows.append(("  bfloat16 / float32 decoder", lever[names[0]] / lever[names[1]], "speed-up"))
        rows.append(("  batches at once / one at a time", lever[names[1]] / lever[names[2]], "speed-up"))
        if native.available():
            rows.append(("  compiled head / torch path", lever[names[2]] / lever[names[3]], "speed-up"))
        seconds, m, _ = time_iw(args.profile, 500, slice(args.iw_sentences), workers=args.threads)
        rows.append((f"IW log-likelihood K=500, {m} test sentences (s)", seconds, "target < 180"))
    print(f"\n{'measurement':<56}{'value':>10}  note   (threads={args.threads}, profile={args.profile})")
    for name, value, note in rows:
        print(f"{name:<56}{value:>10.3f}  {note}")


if __name__ == "__main__":
    main()
