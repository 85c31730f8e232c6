"""Where a default training step's time goes: torch profiler, one thread, real PTB batches.

For the default VAE and the same decoder trained as a plain LM (the batches ``bench_core.py``
builds: shuffled, length-bucketed, batch 32), after warm-up steps: wall time per step, operator
calls per step (every ``aten::`` call, and those that are not nested in another ``aten::`` call,
i.e. what Python dispatched), the self CPU time the profiler attributes to operators (the rest of
the wall time is Python, the autograd engine's bookkeeping and the profiler's own overhead), host
synchronisations (``aten::item`` / ``aten::_local_scalar_dense``), and the top operators by self
time and by call count.

Run: ``.venv/bin/python benchmarks/profile_step.py [--steps 10] [--top 15] [--method VAE LM]
[--batch-size 32] [--head native]`` (``--head``: ``train.lm_head_kernel``, ``torch`` or ``native``;
default: the profile's, which is ``native`` for the default profile).
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_steps import training_batches, training_step  # this script's folder is on sys.path
from tvae_core.allocator import keep_freed_memory
from tvae_core.data import load_corpus
from tvae_core.experiments import method_config
from tvae_core.build import build_model
from tvae_core.train import make_optimizer

keep_freed_memory()   # as the book's training processes do (tvae_core.cli): no page faults per step


def one_step(cfg, model, optimizer, batch, step, steps, read_diagnostics: bool):
    _, grad_norm = training_step(cfg, model, optimizer, batch, step, steps)
    if read_diagnostics:  # what the training loop reads back every step
        float(grad_norm)


def profile_method(method: str, profile_name: str, steps: int, top: int, train_changes: dict) -> None:
    cfg = method_config(method, profile_name).replace(train=train_changes)
    corpus = load_corpus(cfg.data)
    batches = training_batches(cfg, corpus, steps + 3)
    torch.manual_seed(0)
    model = build_model(cfg, corpus.vocab).train()
    optimizer = make_optimizer(model, cfg.train)
    for step, batch in enumerate(batches[:3]):  # warm-up
        one_step(cfg, model, optimizer, batch, step, len(batches), True)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step, batch in enumerate(batches[3:]):
            one_step(cfg, model, optimizer, batch, step, len(batches), True)
    wall = (time.perf_counter() - started) / steps
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    # top-level: an aten op with no aten ancestor (what Python or autograd dispatched directly)
    top_level = [e for e in events if not _has_aten_ancestor(e)]
    self_us = sum(e.self_cpu_time_total for e in prof.events()) / steps
    syncs = sum(1 for e in events if e.name in ("aten::_local_scalar_dense",)) / steps
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[3:]) / steps
    print(f"\n=== {method} ({profile_name}, {train_changes}), {steps} profiled steps, 1 thread, "
          f"{tokens:.0f} tokens per batch ===")
    print(f"wall time per step (profiled):           {wall * 1e3:8.1f} ms")
    print(f"aten calls per step (all):               {len(events) / steps:8.0f}")
    print(f"aten calls per step (top-level):         {len(top_level) / steps:8.0f}")
    print(f"host synchronisations per step (.item): {syncs:8.0f}")
    print(f"profiler self CPU time per step:         {self_us / 1e3:8.1f} ms")
    table = prof.key_averages()
    print(f"\ntop {top} by self CPU time (per step):")
    print(f"{'op':<44}{'self ms':>9}{'calls':>8}{'us/call':>9}")
    for row in sorted(table, key=lambda r: -r.self_cpu_time_total)[:top]:
        print(f"{row.key[:43]:<44}{row.self_cpu_time_total / steps / 1e3:9.2f}{row.count / steps:8.0f}"
              f"{row.self_cpu_time_total / max(row.count, 1):9.1f}")
    print(f"\ntop {top} by calls per step:")
    counts = collections.Counter(e.name for e in events)
    for name, count in counts.most_common(top):
        print(f"{name[:43]:<44}{count / steps:8.0f}")


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--method", nargs="+", default=["VAE", "LM"])
    parser.add_argument("--batch-size", type=int, default=None, help="None: the profile's")
    parser.add_argument("--head", choices=("torch", "native"), help="None: the profile's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    changes = {}
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.head:
        changes["lm_head_kernel"] = args.head
    for method in args.method:
        profile_method(method, args.profile, args.steps, args.top, changes)


if __name__ == "__main__":
    main()
