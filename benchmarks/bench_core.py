"""Core timings on this machine, measured side by side in one process.

1. A training step of the default VAE vs the same decoder trained as a plain LM (same batches):
   the ratio the performance target is stated in (<= 1.4); and the VAE step before the
   optimisations of the LM head (unfused cross-entropy, GPT-2's 8-op "gelu_new") vs after.
2. The importance-weighted log-likelihood with K = 500: before (plain head, 8-op GELU, 2,000
   sequences per decoder call) vs after (fused blocked head in the profile's ``lm_head_dtype``,
   fused GELU, 500 per call, sentences bucketed by length) on the same sentences, then the whole PTB test split (3,761
   sentences) with the current code (target: < 3 minutes).
3. Aggregate-posterior MI and marginal KL over N = 10,000 points in D = 32 (target: < 5 s).

Run: ``make bench`` (or ``.venv/bin/python benchmarks/bench_core.py [--threads 2] [--skip-iw]``).
Models are freshly initialised (timings do not depend on the weights).
"""
from __future__ import annotations

import argparse
import time

import torch

from tvae_core.data import iterate_batches, load_corpus
from tvae_core.estimators import evaluate_log_likelihood, self_and_leave_one_out_terms
from tvae_core.experiments import method_config
from tvae_core.objectives import compute_loss
from tvae_core.profiles import get_profile
from tvae_core.train import build_model


def as_before(model):
    """The model as it was computed before the LM-head optimisations (same weights)."""
    from transformers.activations import ACT2FN

    model.fuse_lm_head = model.fuse_lm_head_in_evaluation = False
    for block in model.decoder.transformer.h:
        block.mlp.act = ACT2FN["gelu_new"]
    return model


def time_training_steps(profile: str, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per optimiser step; the variants interleaved so all see the same load."""
    vae_cfg, lm_cfg = method_config("VAE", profile), method_config("LM", profile)
    corpus = load_corpus(vae_cfg.data)
    batches = list(iterate_batches(corpus.token_ids("train")[: vae_cfg.train.batch_size * steps],
                                   vae_cfg.train.batch_size, corpus.vocab.pad_id, shuffle=True))
    models = {}
    for name, cfg, before in (("VAE", vae_cfg, False), ("LM", lm_cfg, False), ("VAE before", vae_cfg, True)):
        torch.manual_seed(0)
        model = build_model(cfg, corpus.vocab).train()
        if before:
            as_before(model)
        models[name] = (cfg, model, torch.optim.AdamW(model.parameters(), 1e-3))
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, (cfg, model, opt) in models.items():
            started = time.perf_counter()
            for step, batch in enumerate(batches):
                loss, _ = compute_loss(model.forward_terms(batch), cfg.objective, step, steps)
                loss.backward()
                opt.step()
                opt.zero_grad()
            times[name].append((time.perf_counter() - started) / len(batches))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def time_iw(profile: str, num_samples: int, max_sentences: int | None, before: bool = False,
            sentences_per_call: int = 5, progress: bool = True) -> tuple[float, int, float]:
    """Seconds for IW with K = ``num_samples``; ``sentences_per_call`` x 100 samples per decoder
    call (the evaluation's setting; "before" used 20 x 100). Returns (seconds, N, mean bound)."""
    cfg = method_config("VAE", profile)
    corpus = load_corpus(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, corpus.vocab).eval()
    if before:
        as_before(model)
    else:  # the profile's evaluation setting (bfloat16 vocabulary matmul in the default profile)
        model.evaluation_lm_head_dtype = getattr(torch, get_profile(profile).estimators.lm_head_dtype)
    seqs = corpus.token_ids("test")[:max_sentences]
    started = time.perf_counter()
    batches = iterate_batches(seqs, sentences_per_call, corpus.vocab.pad_id, bucket=not before)
    result = evaluate_log_likelihood(model, batches,
                                     num_samples=num_samples, chunk_size=100,
                                     generator=torch.Generator().manual_seed(0), progress=progress)
    return time.perf_counter() - started, len(seqs), result.mean


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
    rows.append(("train step, VAE before head/GELU changes (s)", step["VAE before"], ""))
    rows.append(("speed-up of the VAE step (before / after)", step["VAE before"] / step["VAE"], ""))
    rows.append(("aggregate MI + marginal KL, N=10k, D=32 (s)", time_aggregate(10_000, 32), "target < 5"))
    if not args.skip_iw:
        n = args.compare_sentences
        before, _, before_mean = time_iw(args.profile, 500, n, before=True, sentences_per_call=20,
                                         progress=False)
        after, _, after_mean = time_iw(args.profile, 500, n, progress=False)
        rows.append((f"IW K=500, {n} sentences, before (s)", before, ""))
        rows.append((f"IW K=500, {n} sentences, after (s)", after, ""))
        rows.append(("speed-up of IW (before / after)", before / after,
                     f"bounds {before_mean:.3f} vs {after_mean:.3f} (other sample order)"))
        seconds, n, _ = time_iw(args.profile, 500, args.iw_sentences)
        rows.append((f"IW log-likelihood K=500, {n} test sentences (s)", seconds, "target < 180"))
    print(f"\n{'measurement':<52}{'value':>10}  note   (threads={args.threads}, profile={args.profile})")
    for name, value, note in rows:
        print(f"{name:<52}{value:>10.3f}  {note}")


if __name__ == "__main__":
    main()
