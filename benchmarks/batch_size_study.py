"""Larger batches at the same number of sentences seen: what they do to the results, not only the
speed. The default VAE trained with FB and MDR at batch 32 (the profile's 600 steps), 64 and 128,
each for 19,200 sentences (steps = 19,200 / batch), the learning rate scaled by sqrt(batch / 32)
(and, at 128, also linearly), the LR warm-up covering the same number of sentences; final
validation rate, distortion and ELBO (the profile's 1,000 validation sentences) and the training
time on one thread.

Run: ``.venv/bin/python benchmarks/batch_size_study.py [--runs-dir DIR] [--methods FB MDR] [--rate 8]``.
Runs train with ``train.lm_head_kernel="native"`` and ``train.sync_every=50`` (the same numbers as
the plain loop to float rounding) and are cached in ``--runs-dir`` (default: a temporary folder).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

from tvae_core.allocator import keep_freed_memory
from tvae_core.experiments import method_config
from tvae_core.runs import train_into_cache

keep_freed_memory()   # as the book's training processes do (tvae_core.cli): no page faults per step

SENTENCES = 19_200


def settings() -> list[tuple[int, float, str]]:
    """(batch size, learning rate, label of the scaling rule)."""
    rows = [(32, 1e-3, "profile")]
    for batch in (64, 128):
        rows.append((batch, 1e-3 * math.sqrt(batch / 32), "sqrt"))
    rows.append((128, 1e-3 * 128 / 32, "linear"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--methods", nargs="+", default=["FB", "MDR"])
    parser.add_argument("--rate", type=float, default=8.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.runs_dir or tempfile.mkdtemp(prefix="batch-size-study-")
    print(f"{'method':<8}{'batch':>6}{'lr':>9}{'rule':>8}{'steps':>7}{'rate':>8}{'distortion':>12}{'ELBO':>10}"
          f"{'AU':>4}{'train s':>9}{'sent/s':>8}")
    for method in args.methods:
        for batch, lr, rule in settings():
            steps = SENTENCES // batch
            cfg = method_config(method, "default", args.rate).replace(
                train={"batch_size": batch, "learning_rate": lr, "max_steps": steps, "eval_every": steps,
                       "checkpoint_every": steps, "lr_warmup_steps": 100 * 32 // batch,
                       "lm_head_kernel": "native", "sync_every": 50})
            started = time.perf_counter()
            run = train_into_cache(cfg, root, progress=False)
            seconds = time.perf_counter() - started
            metrics = json.loads((run / "metrics.json").read_text())
            print(f"{method:<8}{batch:>6}{lr:>9.2e}{rule:>8}{steps:>7}{metrics['rate']:>8.2f}"
                  f"{metrics['distortion']:>12.2f}{metrics['elbo']:>10.2f}{metrics['active_units']:>4}"
                  f"{seconds:>9.1f}{SENTENCES / seconds:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
