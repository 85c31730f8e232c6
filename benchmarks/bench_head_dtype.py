"""The LM head's dtype on this CPU: float32 against bfloat16, side by side, one thread.

bfloat16 is fast only where the CPU multiplies it in hardware (AVX512-BF16, AMX); elsewhere torch
converts it in software. This prints what the CPU profiles choose here
(``tvae_core.device.cpu_head_dtype``) and the measurements behind the choice: one 64 x 64 x 10k
block of the head (the default decoder's hidden size and vocabulary) in each dtype, and a default
VAE training step with a float32 head (torch path) and a bfloat16 one (torch path, and the compiled
kernel where it builds), the variants alternating round by round.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_head_dtype.py [--rounds 3] [--steps 4]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_steps import training_batches, training_step  # this script's folder is on sys.path
from tvae_core import native
from tvae_core.allocator import keep_freed_memory
from tvae_core.build import build_model
from tvae_core.data import load_corpus
from tvae_core.device import cpu_has_native_bfloat16, cpu_head_dtype
from tvae_core.experiments import method_config
from tvae_core.train import make_optimizer

keep_freed_memory()   # as the book's training processes do

VARIANTS = {"float32, torch path": {"lm_head_dtype": "float32", "lm_head_kernel": "torch"},
            "bfloat16, torch path": {"lm_head_dtype": "bfloat16", "lm_head_kernel": "torch"},
            "bfloat16, compiled kernel": {"lm_head_dtype": "bfloat16", "lm_head_kernel": "native"}}


def block_ms(dtype: torch.dtype, repeats: int = 30) -> float:
    hidden, weight = torch.randn(64, 64).to(dtype), torch.randn(10_000, 64).to(dtype)
    for _ in range(3):
        hidden @ weight.T
    started = time.perf_counter()
    for _ in range(repeats):
        hidden @ weight.T
    return (time.perf_counter() - started) / repeats * 1e3


def step_ms(changes: dict, corpus, steps: int) -> float:
    cfg = method_config("VAE", "default").replace(train=changes)
    batches = training_batches(cfg, corpus, steps + 2)
    torch.manual_seed(0)
    model = build_model(cfg, corpus.vocab).train()
    optimizer = make_optimizer(model, cfg.train)
    for step, batch in enumerate(batches[:2]):   # warm-up
        training_step(cfg, model, optimizer, batch, step, len(batches))
    started = time.perf_counter()
    for step, batch in enumerate(batches[2:]):
        _, grad_norm = training_step(cfg, model, optimizer, batch, step, len(batches))
        float(grad_norm)
    return (time.perf_counter() - started) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; bfloat16 in hardware: "
          f"{cpu_has_native_bfloat16()}; the CPU profiles' head here: {cpu_head_dtype()}")
    variants = {k: v for k, v in VARIANTS.items() if v["lm_head_kernel"] == "torch" or native.available()}
    blocks = {"float32": [], "bfloat16": []}
    steps = {name: [] for name in variants}
    corpus = load_corpus(method_config("VAE", "default").data)
    for _ in range(args.rounds):
        blocks["float32"].append(block_ms(torch.float32))
        blocks["bfloat16"].append(block_ms(torch.bfloat16))
        for name, changes in variants.items():
            steps[name].append(step_ms(changes, corpus, args.steps))
    print("\n| what (one thread, median of rounds) | ms |\n|---|---|")
    for dtype, times in blocks.items():
        print(f"| one 64 x 64 x 10k head block, {dtype} | {statistics.median(times):.2f} |")
    for name, times in steps.items():
        print(f"| default VAE training step, head in {name} | {statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
