"""`make gpu-profile`: where a `full`-profile training step's time goes on a GPU, and what each lever buys.

``gpu_check.py`` times the step through the book's own training loop; this script takes the
step apart. For the MDR VAE (and, with ``--methods MDR LM``, the decoder-only LM) at the `full`
size, on the same real PTB training batches (shuffled and length-bucketed as training batches
them, each padded up to a multiple of ``--pad-multiple`` tokens so that compiled graphs see a few
shapes only), one variant after another in one process:

=====================  ===================================================================
``fp32``               eager, float32 matmuls: the `full` profile as it trains today
``tf32``               eager, float32 weights, matmuls on the tensor cores in TF32
                       (``torch.set_float32_matmul_precision("high")``)
``bf16``               eager, bfloat16 autocast around the forward pass and a bfloat16 LM
                       head: what Accelerate's ``mixed_precision="bf16"`` does in training
``compile``            TF32, every transformer block compiled by ``torch.compile`` (inductor,
                       dynamic shapes): one compilation serves the 12 identical blocks of a
                       stack, and fuses the elementwise kernels around the matmuls
``compile-cudagraphs`` as ``compile`` with ``mode="reduce-overhead"``: each compiled block
                       replayed as a CUDA graph (one recording per padded length)
=====================  ===================================================================

Per variant: milliseconds per optimiser step (the wall time of ``--steps`` steps between two
device synchronisations, the way training runs them: no host read inside a step), real tokens
and sentences per second, peak GPU memory, the mean loss of the timed steps (the variants train
the same weights from the same seed on the same batches; dropout noise differs between eager and
compiled code, so the means agree to noise, not bit for bit), and from a ``torch.profiler``
window of ``--profile-steps`` further steps: the GPU's kernel time per step and its share of the
wall time (near 100 %: the arithmetic bounds the step; far below: the GPU waits for the host to
launch kernels), kernel launches per step, and the kernels that take the most GPU time; and from one more step
under CUDA's sync debug mode, the host synchronisations per step and the lines that asked for them.

The step is the training loop's (``tvae_core.train``): ``forward_terms``, ``compute_loss`` with
the method's own state (the MDR multiplier and its optimiser), backward, gradient clipping,
fused AdamW. Accelerate is left out (on one GPU it adds autocast, reproduced here, and nothing
per step).

Before each variant's timed steps, three steps per padded length it will meet: compilation,
CUDA-graph recording and cuBLAS's kernel choice happen there, not in the timed window. A variant
that fails is reported with its error and the script goes on; the exit status is 1 if any
failed, 2 without a CUDA device. ``--cpu-dry-run`` runs the same code on the CPU with the smoke
profile (the tests do).

Run: ``make gpu-profile`` (``PY=python3`` on a machine with its own PyTorch), or
``python benchmarks/gpu_step_profile.py [--variants fp32 tf32 ...] [--methods MDR LM]
[--steps 30] [--batch-size 32] [--pad-multiple 16] [--json FILE]``; every number goes to
``$OUT/gpu_step_profile.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = ("fp32", "tf32", "bf16", "compile", "compile-cudagraphs")
# the transformer blocks of the architectures a `full` VAE uses (scratch BERT/GPT-2, pretrained
# RoBERTa/Llama-style decoders): what the compiled variants compile one by one
BLOCK_CLASSES = ("GPT2Block", "BertLayer", "RobertaLayer", "LlamaDecoderLayer")


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` with its length padded up to a multiple of ``multiple`` (pad tokens, mask 0).

    Padding is masked everywhere a step reads it (the encoder's pooling and attention, the
    decoder's attention, the loss's target mask), so it changes no term beyond rounding; it
    bounds the number of distinct shapes a compiled graph or a CUDA graph must be built for.
    """
    if multiple <= 1:
        return batch
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if not extra:
        return batch
    return {"input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
            "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0)}


def compile_blocks(model: torch.nn.Module, mode: str | None) -> int:
    """Compile every transformer block of ``model`` in place (regional compilation); their count."""
    blocks = [m for m in model.modules() if type(m).__name__ in BLOCK_CLASSES]
    if not blocks:
        raise RuntimeError(f"no transformer block ({', '.join(BLOCK_CLASSES)}) found to compile")
    for block in blocks:
        block.compile(dynamic=True, mode=mode)
    return len(blocks)


@contextlib.contextmanager
def matmul_precision(precision: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class Step:
    """One variant's model, method state and optimisers, and its training step."""

    def __init__(self, cfg, vocab, device: torch.device, variant: str):
        from bench_steps import training_step  # this script's folder is on sys.path
        from tvae_core.build import build_model
        from tvae_core.methods import get_method
        from tvae_core.train import make_optimizer

        self.cfg, self.device, self.variant, self._training_step = cfg, device, variant, training_step
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, vocab).to(device).train()
        method = get_method(cfg.objective.name)
        self.state = method.new_state(cfg.objective).to(device) if method.new_state else None
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.state_optimizer = method.state_optimizer(self.state, cfg.objective) if self.state is not None else None
        self.compiled_blocks = 0
        if variant.startswith("compile"):
            mode = "reduce-overhead" if variant == "compile-cudagraphs" else None
            self.compiled_blocks = compile_blocks(self.model, mode)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if variant == "bf16" else None

    def __call__(self, batch: dict[str, torch.Tensor], step: int, max_steps: int) -> torch.Tensor:
        if self.variant == "compile-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = self._training_step(self.cfg, self.model, self.optimizer, batch, step, max_steps, state=self.state,
                                      state_optimizer=self.state_optimizer, autocast=self.autocast, read=False)
        return loss.detach()


def _kernel_events(prof) -> list:
    from torch.autograd import DeviceType

    return [e for e in prof.events() if e.device_type == DeviceType.CUDA]


def host_syncs(step: "Step", batch: dict, index: int, max_steps: int) -> tuple[int, dict[str, int]]:
    """Synchronisations with the GPU in one step, and where Python asked for them (file:line ->
    count), from CUDA's sync debug mode: each one makes the host wait for the GPU's queue to
    drain, so the host cannot queue the next kernels while the GPU works (a tensor's value read
    in Python, ``.item()``, a count that sizes a tensor, a copy to pageable memory)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch, index, max_steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), dict(collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs))


def measure(cfg, vocab, device, variant: str, warmup: list, timed: list, profiled: list, top: int) -> dict:
    """One variant: warm-up steps, timed steps, profiled steps (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    from tvae_core.device import synchronize

    started = time.perf_counter()
    precision = "highest" if variant in ("fp32", "bf16") else "high"
    with matmul_precision(precision):
        step = Step(cfg, vocab, device, variant)
        max_steps = len(warmup) + len(timed) + len(profiled)
        for i, batch in enumerate(warmup):
            step(batch, i, max_steps)
        synchronize(device)
        warmup_seconds = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        t0 = time.perf_counter()
        for i, batch in enumerate(timed, start=len(warmup)):
            losses.append(step(batch, i, max_steps))
        synchronize(device)
        seconds = (time.perf_counter() - t0) / len(timed)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i, batch in enumerate(profiled, start=len(warmup) + len(timed)):
                step(batch, i, max_steps)
            synchronize(device)
        syncs, sync_sites = (host_syncs(step, profiled[0], max_steps - 1, max_steps) if device.type == "cuda"
                             else (None, {}))
    kernels = _kernel_events(prof)
    n = len(profiled)
    kernel_us = sum(e.time_range.elapsed_us() for e in kernels) / n
    by_name = collections.Counter()
    for e in kernels:
        by_name[e.name] += e.time_range.elapsed_us()
    tokens = sum(int(b["attention_mask"].sum()) for b in timed) / len(timed)
    loss = torch.stack(losses).float()
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"{variant}: non-finite loss in the timed steps")
    return {"variant": variant, "ms_per_step": 1e3 * seconds, "tokens_per_second": tokens / seconds,
            "sentences_per_second": timed[0]["input_ids"].shape[0] / seconds,
            "peak_memory_gib": peak / 2**30, "mean_loss": float(loss.mean()),
            "gpu_kernel_ms_per_step": kernel_us / 1e3 if kernels else None,
            "gpu_busy_share": kernel_us / 1e3 / (1e3 * seconds) if kernels else None,
            "kernels_per_step": len(kernels) / n if kernels else None,
            "top_kernels": [{"name": name[:120], "ms_per_step": us / n / 1e3} for name, us in by_name.most_common(top)],
            "host_syncs_per_step": syncs, "host_sync_sites": sync_sites,
            "compiled_blocks": step.compiled_blocks, "warmup_steps": len(warmup), "timed_steps": len(timed),
            "warmup_seconds": warmup_seconds}


def warmup_batches(pool: list, batches: list, per_shape: int) -> list:
    """``per_shape`` batches of each length that ``batches`` contain, taken from ``pool``."""
    lengths = sorted({b["input_ids"].shape[1] for b in batches})
    by_length = collections.defaultdict(list)
    for b in pool:
        by_length[b["input_ids"].shape[1]].append(b)
    chosen = []
    for length in lengths:
        found = (by_length[length] * per_shape)[:per_shape] if by_length[length] else []
        if len(found) < per_shape:  # no spare batch of this length in the pool: reuse a timed one
            found = [b for b in batches if b["input_ids"].shape[1] == length][:1] * per_shape
        chosen += found
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--methods", nargs="+", default=["MDR"], choices=("MDR", "VAE", "LM"))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler per variant")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the profile's")
    parser.add_argument("--pad-multiple", type=int, default=16, help="pad each batch to a multiple of this length")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per variant")
    parser.add_argument("--json", default=None, help="write every number here (default: $OUT/gpu_step_profile.json)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same script on the CPU with the smoke profile (tests run it this way)")
    args = parser.parse_args(argv)
    for name in ("steps", "profile_steps", "pad_multiple"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("error: make gpu-profile needs a CUDA device; torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    import transformers

    from bench_steps import training_batches  # this script's folder is on sys.path
    from tvae_core.data import load_corpus
    from tvae_core.device import move_batch
    from tvae_core.experiments import method_config
    from tvae_core.profiles import get_profile

    profile = get_profile("smoke" if args.cpu_dry_run else "full")
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine()),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "profile": profile.name, "pad_multiple": args.pad_multiple,
              "methods": {}}
    print(f"gpu-profile on {report['device']} (torch {torch.__version__}, transformers {transformers.__version__}), "
          f"the {profile.name} profile", flush=True)
    failed = []
    for method in args.methods:
        cfg = method_config(method, profile, 16.0 if method == "MDR" and not args.cpu_dry_run
                            else (profile.target_rates[-1] if method == "MDR" else None))
        if args.batch_size:
            cfg = cfg.replace(train={"batch_size": args.batch_size})
        corpus = load_corpus(cfg.data)
        needed = args.steps + args.profile_steps
        size = cfg.train.batch_size
        pool = [pad_to_multiple(move_batch(b, device), args.pad_multiple, corpus.vocab.pad_id)
                for b in training_batches(cfg, corpus, needed + 40)]
        if len(pool) < needed + 1:
            raise SystemExit(f"error: the training split gives {len(pool)} batches of {size}; {needed + 1} needed")
        timed, profiled, spare = pool[: args.steps], pool[args.steps: needed], pool[needed:]
        warmup = warmup_batches(spare, timed + profiled, per_shape=3)
        lengths = sorted({b["input_ids"].shape[1] for b in timed + profiled})
        print(f"\n{cfg.label}: batch {size}, padded lengths {lengths}, {len(warmup)} warm-up, {args.steps} timed, "
              f"{args.profile_steps} profiled steps per variant", flush=True)
        print(f"  {'variant':<19}{'ms/step':>9}{'tok/s':>10}{'sent/s':>8}{'GPU busy':>10}{'kernels':>9}"
              f"{'syncs':>7}{'peak GiB':>10}{'mean loss':>11}{'warm-up s':>11}", flush=True)
        rows = []
        for variant in args.variants:
            variant_cfg = cfg.replace(train={"lm_head_dtype": "bfloat16"}) if variant == "bf16" else cfg
            try:
                row = measure(variant_cfg, corpus.vocab, device, variant, warmup, timed, profiled, args.top)
            except Exception as error:  # a lever that fails is a finding; the others still run
                failed.append(f"{cfg.label}/{variant}")
                rows.append({"variant": variant, "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc(limit=6)})
                print(f"  {variant:<19}failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                continue
            finally:
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            busy = f"{100 * row['gpu_busy_share']:.0f} %" if row["gpu_busy_share"] is not None else "n/a"
            kernels = f"{row['kernels_per_step']:.0f}" if row["kernels_per_step"] is not None else "n/a"
            syncs = f"{row['host_syncs_per_step']}" if row["host_syncs_per_step"] is not None else "n/a"
            print(f"  {variant:<19}{row['ms_per_step']:9.1f}{row['tokens_per_second']:10.0f}"
                  f"{row['sentences_per_second']:8.0f}{busy:>10}{kernels:>9}{syncs:>7}{row['peak_memory_gib']:10.1f}"
                  f"{row['mean_loss']:11.3f}{row['warmup_seconds']:11.0f}", flush=True)
        for row in rows:
            if row.get("host_sync_sites"):
                print(f"  {row['variant']}: host synchronisations at "
                      + ", ".join(f"{site} ({n})" for site, n in row["host_sync_sites"].items()), flush=True)
            if row.get("top_kernels"):
                print(f"  {row['variant']}: top kernels (ms per step): "
                      + "; ".join(f"{k['name'][:60]} {k['ms_per_step']:.2f}" for k in row["top_kernels"][:5]),
                      flush=True)
        report["methods"][cfg.label] = {"batch_size": size, "padded_lengths": lengths, "variants": rows}
    report["failed"] = failed
    target = args.json or (os.path.join(os.environ["OUT"], "gpu_step_profile.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(json.dumps(report, indent=1))
    if failed:
        print(f"gpu-profile: {len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("gpu-profile done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
