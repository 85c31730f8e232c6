"""The pretrained profile on this machine: seconds per training step and peak memory.

MiniLM encoder + SmolLM2-135M decoder (``make pretrained``), the pretrained study's batch size,
PTB batches; the VAE step with the fused, blocked LM head (:mod:`tvae_core.lm_head`) and with
the plain head (``fuse_lm_head = False``), interleaved in one process so both see the same load.
Peak memory is the process's maximum resident set size (``ru_maxrss``) after each variant.

Run: ``.venv/bin/python benchmarks/bench_pretrained.py [--threads 1] [--steps 5]``
(``make bench`` runs it when the weights are installed).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from tvae_core.allocator import keep_freed_memory
from tvae_core.experiments import method_config
from tvae_core.methods import compute_loss
from tvae_core.pretrained import (DEFAULT_DECODER, DEFAULT_ENCODER, build_pretrained_model,
                                  load_pretrained_corpus, packaged_weights_available, pretrained_config)
from tvae_core.profiles import get_profile

keep_freed_memory()   # as the book's training processes do (tvae_core.cli): no page faults per step


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    args = parser.parse_args()
    if not all(packaged_weights_available(n) for n in (DEFAULT_ENCODER, DEFAULT_DECODER)):
        print("pretrained weights not installed (make pretrained): skipped")
        return 0
    torch.set_num_threads(args.threads)
    size = get_profile("default").pretrained
    config = pretrained_config(method_config("VAE", "default"), DEFAULT_ENCODER, DEFAULT_DECODER)
    config = config.replace(data={"max_train_sentences": size.batch_size * (args.steps + 1)},
                            model={"latent_dim": size.latent_dim}, train={"batch_size": size.batch_size})
    corpus = load_pretrained_corpus(config)
    batches = list(corpus.batches("train", size.batch_size, shuffle=False))[: args.steps + 1]
    torch.manual_seed(0)
    model = build_pretrained_model(config, corpus.vocab).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    num_parameters = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {"fused head": [], "plain head": []}
    peaks = {}
    for name in times:  # plain second: its peak memory includes the fused one's
        model.fuse_lm_head = name == "fused head"
        for step, batch in enumerate(batches):
            started = time.perf_counter()
            loss, _ = compute_loss(model.forward_terms(batch), config.objective, step, len(batches))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step > 0:
                times[name].append(time.perf_counter() - started)
        peaks[name] = peak_rss_gb()
    median = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    print(f"\npretrained VAE step: {num_parameters / 1e6:.1f}M parameters, batch {size.batch_size}, "
          f"{args.threads} thread(s), median of {args.steps} steps")
    print(f"{'variant':<14}{'s/step':>10}{'peak RSS (GB)':>16}")
    for name in times:
        print(f"{name:<14}{median[name]:>10.2f}{peaks[name]:>16.2f}")
    print(f"speed-up (plain / fused): {median['plain head'] / median['fused head']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
