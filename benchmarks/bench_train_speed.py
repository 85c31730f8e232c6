"""Training throughput, today's path vs the fast one, side by side in one process on one thread.

"Today": the baseline of the throughput issue, the default profile's model and batches with
``train.lm_head_kernel = "torch"`` (the torch LM head in bfloat16) and ``train.sync_every = 1``
(diagnostics read back and checked at every step), set explicitly because the default profile now
trains on the fast path. "Fast": ``train.lm_head_kernel =
"native"`` (the head by the compiled kernels) and ``train.sync_every = 50`` (diagnostics read back
every 50 steps), at batch 32, 64 and 128; also today's path with ``sync_every`` alone. Every variant trains on the same 1,280 PTB training
sentences per pass (40 steps at batch 32, 10 at 128; shuffled, length-bucketed as the loop
batches them), from the same initial weights, with the loop's per-step work (seeding, loss,
finite checks, backward, gradient clipping, fused AdamW; no LR schedule); the variants alternate
within each round so all see the same load, and the table gives medians over rounds of sentences
per second on one core and their ratios to today's path (ratios per round, then the median).
The VAE/LM step ratio is taken the same way for both paths at batch 32.

Then the check that the fast path trains to the same numbers: ``--check-steps`` (100) steps of
the default VAE at batch 32, both paths from the same weights and batches; the largest relative
difference of the loss over those steps, and whether the history records are the same in their
keys.

``--parallel``: also one 2-thread process vs two 1-thread processes at once (the fast path,
batch 32), in sentences per second for the machine.

Run: ``.venv/bin/python benchmarks/bench_train_speed.py [--rounds 5] [--write-readme]``;
``--write-readme`` replaces the generated table in ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_steps import training_batches  # this script's folder is on sys.path
from tvae_core.allocator import keep_freed_memory
from tvae_core.data import load_corpus
from tvae_core.experiments import method_config
from tvae_core.methods import compute_loss
from tvae_core.build import build_model
from tvae_core.train import TrainingDiverged, _check_finite, _DeferredDiagnostics, _step_seed, make_optimizer

keep_freed_memory()   # as the book's training processes do (tvae_core.cli): no page faults per step

HERE = Path(__file__).resolve().parent
SENTENCES = 1_280  # per pass: 40 steps at batch 32, 10 at 128
FAST = {"lm_head_kernel": "native", "sync_every": 50}
# The baseline, pinned: the default profile has since switched to the fast path, so "today"
# must say its settings instead of inheriting the profile's.
TODAY = {"lm_head_kernel": "torch", "sync_every": 1}


def run_steps(cfg, model, optimizer, batches) -> list[dict]:
    """The training loop's per-step work (tvae_core.train.train, one process, no LR schedule);
    returns the history records."""
    tc, history = cfg.train, []
    deferred = _DeferredDiagnostics() if tc.sync_every > 1 else None
    for step, batch in enumerate(batches):
        torch.manual_seed(_step_seed(tc.seed, step))
        terms = model.forward_terms(batch)
        loss, diagnostics = compute_loss(terms, cfg.objective, step, len(batches), read=deferred is None)
        if deferred is None:
            _check_finite(step, loss, terms)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        if deferred is None and not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm at step {step}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if deferred is None:
            diagnostics.update(step=step, grad_norm=float(grad_norm), lr=tc.learning_rate)
            history.append(diagnostics)
        else:
            deferred.add(step, loss, terms, diagnostics, grad_norm, tc.learning_rate)
            if len(deferred.pending) >= tc.sync_every:
                history += deferred.read()
    if deferred is not None:
        history += deferred.read()
    return history


def variants() -> dict[str, object]:
    vae, lm = (method_config(m, "default").replace(train=TODAY) for m in ("VAE", "LM"))
    out = {"VAE today, batch 32": vae, "LM today, batch 32": lm,
           "VAE today + sync_every=50, batch 32": vae.replace(train={"sync_every": FAST["sync_every"]})}
    for batch in (32, 64, 128):
        out[f"VAE fast, batch {batch}"] = vae.replace(train={**FAST, "batch_size": batch})
    out["LM fast, batch 32"] = lm.replace(train=FAST)
    out["LM fast, batch 128"] = lm.replace(train={**FAST, "batch_size": 128})
    return out


def build(cfg, corpus):
    torch.manual_seed(0)
    model = build_model(cfg, corpus.vocab).train()
    return model, make_optimizer(model, cfg.train)


def time_variants(rounds: int) -> dict[str, list[float]]:
    """Sentences per second per variant and round."""
    configs = variants()
    corpus = load_corpus(next(iter(configs.values())).data)
    setups = {}
    for name, cfg in configs.items():
        batches = training_batches(cfg, corpus, SENTENCES // cfg.train.batch_size)
        model, optimizer = build(cfg, corpus)
        run_steps(cfg, model, optimizer, batches[:3])  # warm-up (and the kernel's build)
        setups[name] = (cfg, model, optimizer, batches)
    rates = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (cfg, model, optimizer, batches) in setups.items():
            started = time.perf_counter()
            run_steps(cfg, model, optimizer, batches)
            rates[name].append(sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - started))
    return rates


def check_losses(steps: int) -> dict:
    """Both paths for ``steps`` steps from the same weights on the same batches."""
    today = method_config("VAE", "default").replace(train=TODAY)
    fast = today.replace(train=FAST)
    corpus = load_corpus(today.data)
    batches = training_batches(today, corpus, steps)
    histories = []
    for cfg in (today, fast):
        model, optimizer = build(cfg, corpus)
        histories.append(run_steps(cfg, model, optimizer, batches))
    old = torch.tensor([r["loss"] for r in histories[0]], dtype=torch.float64)
    new = torch.tensor([r["loss"] for r in histories[1]], dtype=torch.float64)
    return {"steps": steps, "max_rel_loss_diff": ((new - old).abs() / old.abs()).max().item(),
            "final_loss": (old[-10:].mean().item(), new[-10:].mean().item()),
            "same_keys": [list(r) for r in histories[0]] == [list(r) for r in histories[1]]}


def parallel_worker(threads: int, seconds_out: Path) -> None:
    torch.set_num_threads(threads)
    cfg = method_config("VAE", "default").replace(train=FAST)
    corpus = load_corpus(cfg.data)
    batches = training_batches(cfg, corpus, 2 * SENTENCES // 32)
    model, optimizer = build(cfg, corpus)
    run_steps(cfg, model, optimizer, batches[:3])
    started = time.perf_counter()
    run_steps(cfg, model, optimizer, batches)
    seconds_out.write_text(json.dumps({"sentences": 2 * SENTENCES, "seconds": time.perf_counter() - started}))


def time_parallel(rounds: int) -> dict[str, list[float]]:
    """Machine throughput (sentences/s): one 2-thread process vs two 1-thread processes at once."""
    import tempfile

    out = {"one process, 2 threads": [], "two processes, 1 thread each": []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(rounds):
            for name, layout in (("one process, 2 threads", [2]), ("two processes, 1 thread each", [1, 1])):
                files = [Path(folder) / f"{r}-{len(layout)}-{i}.json" for i in range(len(layout))]
                procs = [subprocess.Popen([sys.executable, __file__, "--worker-threads", str(t),
                                           "--worker-out", str(f)]) for t, f in zip(layout, files)]
                for p in procs:
                    if p.wait():
                        raise RuntimeError("a parallel worker failed")
                results = [json.loads(f.read_text()) for f in files]
                out[name].append(sum(x["sentences"] / x["seconds"] for x in results))
    return out


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def table(rates: dict, check: dict | None, parallel: dict | None, rounds: int, load_before: float) -> str:
    base = rates["VAE today, batch 32"]
    lines = ["| variant (one thread) | sentences/s (median) | speed-up vs today (median of per-round ratios) |",
             "|---|---:|---:|"]
    for name, values in rates.items():
        ratio = _median_ratio(values, base) if name.startswith("VAE") else _median_ratio(
            values, rates["LM today, batch 32"])
        note = "" if name.startswith("VAE") else " (vs LM today)"
        lines.append(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f}{note} |")
    lines.append("")
    for path in ("today", "fast"):
        ratio = _median_ratio(rates[f"LM {path}, batch 32"], rates[f"VAE {path}, batch 32"])
        lines.append(f"- VAE/LM step-time ratio, {path} path, batch 32: {ratio:.3f}")
    ratio = _median_ratio(rates["LM fast, batch 128"], rates["VAE fast, batch 128"])
    lines.append(f"- VAE/LM step-time ratio, fast path, batch 128: {ratio:.3f}")
    if check:
        lines.append(f"- losses, today vs fast path, {check['steps']} steps of the default VAE at batch 32: "
                     f"largest relative difference {check['max_rel_loss_diff']:.2e}; mean of the last ten "
                     f"{check['final_loss'][0]:.4f} vs {check['final_loss'][1]:.4f}; history keys "
                     f"{'the same' if check['same_keys'] else 'DIFFERENT'}")
    if parallel:
        one, two = parallel["one process, 2 threads"], parallel["two processes, 1 thread each"]
        lines.append(f"- fast path, batch 32, whole machine: one 2-thread process {statistics.median(one):.0f} "
                     f"sentences/s, two 1-thread processes at once {statistics.median(two):.0f} "
                     f"(ratio {_median_ratio(two, one):.2f}, {len(one)} rounds)")
    lines.append(f"- {rounds} rounds; {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; "
                 f"load average (1 min; the machine is shared) {load_before:.1f} before, "
                 f"{os.getloadavg()[0]:.1f} after; {datetime.date.today().isoformat()}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


BEGIN, END = "<!-- bench_train_speed: begin -->", "<!-- bench_train_speed: end -->"


def write_readme(text: str) -> None:
    readme = HERE / "README.md"
    current = readme.read_text() if readme.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in current:
        head, rest = current.split(BEGIN, 1)
        current = head + block + rest.split(END, 1)[1]
    else:
        current = current + ("\n" if current else "") + block + "\n"
    readme.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check-steps", type=int, default=100)
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--parallel-rounds", type=int, default=2)
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_threads:
        parallel_worker(args.worker_threads, Path(args.worker_out))
        return
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rates = time_variants(args.rounds)
    check = check_losses(args.check_steps) if args.check_steps else None
    parallel = time_parallel(args.parallel_rounds) if args.parallel else None
    text = table(rates, check, parallel, args.rounds, load)
    print(text)
    if args.write_readme:
        write_readme(text)


if __name__ == "__main__":
    main()
