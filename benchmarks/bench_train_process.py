"""A training step as the book runs it: one model per fresh process, one thread
(``python -m tvae_core train-all`` runs two such processes side by side on 2 cores).

Per step (batch 32, ten batches, median of five passes after one warm-up pass): the default VAE and
the same decoder trained as a plain LM, with freed memory kept in the process
(:mod:`tvae_core.allocator`, the default) and with glibc's defaults (``TVAE_CORE_MALLOPT=0``),
also the minor page faults per step. The four kinds of process alternate, ``--rounds`` times, so
all see the same load; the table gives medians over rounds.

Run: ``.venv/bin/python benchmarks/bench_train_process.py [--threads 1] [--rounds 3]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def worker(method: str, profile: str, threads: int) -> dict[str, float]:
    import torch
    from bench_core import training_pass  # this script's folder is on sys.path
    from bench_steps import training_batches

    from tvae_core.allocator import keep_freed_memory
    from tvae_core.data import load_corpus
    from tvae_core.experiments import method_config
    from tvae_core.build import build_model
    from tvae_core.train import make_optimizer

    kept = keep_freed_memory()   # as the book's training processes do (tvae_core.cli)
    torch.set_num_threads(threads)
    cfg = method_config(method, profile)
    corpus = load_corpus(cfg.data)
    steps = 10
    batches = training_batches(cfg, corpus, steps)
    torch.manual_seed(0)
    model = build_model(cfg, corpus.vocab).train()
    optimizer = make_optimizer(model, cfg.train)
    training_pass(cfg, model, optimizer, batches)
    seconds, faults = [], []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        loss = training_pass(cfg, model, optimizer, batches).item()
        seconds.append((time.perf_counter() - started) / steps)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps)
    return {"seconds": statistics.median(seconds), "faults": statistics.median(faults), "loss": loss,
            "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--worker", choices=("VAE", "LM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.profile, args.threads)))
        return
    kinds = [(method, kept) for kept in (True, False) for method in ("VAE", "LM")]
    results = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for method, kept in kinds:
            env = {**os.environ, "TVAE_CORE_MALLOPT": "1" if kept else "0"}
            out = subprocess.run([sys.executable, __file__, "--worker", method, "--profile", args.profile,
                                  "--threads", str(args.threads)], env=env, capture_output=True, text=True,
                                 check=True)
            results[method, kept].append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = {kind: {key: statistics.median(r[key] for r in runs) for key in ("seconds", "faults")}
              for kind, runs in results.items()}
    for method in ("VAE", "LM"):  # the allocator must not change a single bit
        losses = {r["loss"] for kept in (True, False) for r in results[method, kept]}
        assert len(losses) == 1, f"{method}: losses differ between processes: {losses}"
    print(f"\n{'measurement':<56}{'value':>10}  note   (threads={args.threads}, rounds={args.rounds})")
    for kept, label in ((True, "freed memory kept"), (False, "glibc defaults")):
        for method in ("VAE", "LM"):
            m = median[method, kept]
            print(f"{f'train step, {method}, {label} (ms)':<56}{m['seconds'] * 1e3:>10.1f}  "
                  f"{m['faults']:.0f} minor page faults per step")
        ratio = median["VAE", kept]["seconds"] / median["LM", kept]["seconds"]
        per_round = [v["seconds"] / l["seconds"] for v, l in zip(results["VAE", kept], results["LM", kept])]
        print(f"{f'ratio VAE / LM, {label}':<56}{ratio:>10.3f}  "
              f"per round {', '.join(f'{r:.2f}' for r in per_round)}; target <= 1.4")
    for method in ("VAE", "LM"):
        speedup = median[method, False]["seconds"] / median[method, True]["seconds"]
        print(f"{f'speed-up of the {method} step (kept / defaults)':<56}{speedup:>10.3f}  losses bit-identical")


if __name__ == "__main__":
    main()
