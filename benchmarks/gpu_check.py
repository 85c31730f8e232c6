"""`make gpu-check`: the `full` profile end to end on one GPU, in a few minutes.

What it runs, through the same code as the book (train -> validate -> publish -> load -> evaluate),
in a fresh temporary run cache:

1. MDR (target 16 nats) and the decoder-only LM at the `full` profile's size (12 + 12 layers,
   hidden 768, batch 32), ``--steps`` steps each, in float32 (the profile) and under bfloat16
   autocast with a bfloat16 LM head, alternating; then MDR at 4x the batch both ways for
   ``--side-steps`` steps; all after an unreported warm-up run, side by side in this process. Each run's
   steady-state step time and tokens/s come from its ``meta.json`` (``tvae_core.train.StepTimer``:
   warm-up, validation and checkpoints excluded), peak memory from torch.
2. ``evaluate_run`` of the MDR run on the whole test split (bounds, aggregate-posterior MI and
   marginal KL, active units, MMD) with the importance-weighted bound on ``--eval-sentences``
   sentences: every estimator on the GPU path.
3. The importance-weighted bound with K = 500 over the whole test split (3,761 sentences), timed,
   in the `full` profile's evaluation precision.
4. Projections from those numbers: every run of the book at the profile's size, trained as
   ``tvae train-all`` trains them (:func:`grid_projection`), and their evaluation.

Fails (exit 1) on any error; exit 2 without a CUDA device. Prints a table and, with ``--json``
(or into ``$OUT`` when that is set), writes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _gib(n: int) -> float:
    return n / 2**30


def _peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def train_and_time(config, root: str, report: bool = True) -> tuple[object, dict]:
    from tvae_core.device import module_device
    from tvae_core.runs import train_or_load

    precision = "bf16" if config.train.mixed_precision == "bf16" else "float32"
    label = f"{config.label}, {precision}, batch {config.train.batch_size}"

    _reset_peak_memory()
    started = time.perf_counter()
    run = train_or_load(config, root, progress=False)
    wall = time.perf_counter() - started
    device = module_device(run.model)
    if device.type != ("cuda" if torch.cuda.is_available() else "cpu"):
        raise RuntimeError(f"{label}: the loaded run is on {device}, not the GPU")
    timing = run.meta["timing"]
    if not timing.get("timed_steps"):
        raise RuntimeError(f"{label}: no timed steps in meta.json ({timing})")
    row = {"label": label, "batch_size": config.train.batch_size, "steps": config.train.max_steps,
           "mixed_precision": config.train.mixed_precision, "lm_head_dtype": config.train.lm_head_dtype,
           "ms_per_step": 1000 * timing["seconds_per_step"], "tokens_per_second": timing["tokens_per_second"],
           "sentences_per_second": config.train.batch_size / timing["seconds_per_step"],
           "peak_memory_gib": _gib(_peak_memory()), "wall_seconds": wall,
           "num_parameters": run.meta["num_parameters"],
           "valid_rate": run.metrics["rate"], "valid_distortion": run.metrics["distortion"]}
    if not report:
        return run, row
    print(f"  {label:<28} {row['ms_per_step']:7.1f} ms/step  {row['tokens_per_second']:9.0f} tok/s  "
          f"{row['sentences_per_second']:7.0f} sent/s  peak {row['peak_memory_gib']:5.1f} GiB  "
          f"(wall {wall:.0f} s; valid rate {row['valid_rate']:.2f}, distortion {row['valid_distortion']:.1f})",
          flush=True)
    return run, row


def whole_split_iw(run, num_samples: int, decoder_dtype: str) -> dict:
    """The IW bound with K = ``num_samples`` on every test sentence, batched as evaluate_run does."""
    from tvae_core import estimators as est
    from tvae_core.data import iterate_batches
    from tvae_core.device import module_device, synchronize
    from tvae_core.build import training_corpus
    from tvae_core.evaluation import iw_batching

    model = run.model.eval()
    device = module_device(model)
    sequences = training_corpus(run.config).token_ids("test")
    plan = iw_batching(num_samples, device)
    batches = iterate_batches(sequences, plan.sentences_per_call, run.vocab.pad_id, shuffle=False, bucket=True)
    model = model.at_precision(decoder_dtype)  # as evaluate_run does with the profile's estimator sizes
    synchronize(device)
    started = time.perf_counter()
    estimate = est.evaluate_log_likelihood(model, batches, num_samples=num_samples, chunk_size=plan.chunk_size,
                                           generator=torch.Generator().manual_seed(0), progress=False,
                                           workers=plan.workers)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"num_sentences": estimate.num_sequences, "num_samples": num_samples, "seconds": seconds,
            "iw_log_likelihood": estimate.mean, "sequences_per_call": plan.sentences_per_call * plan.chunk_size}


def grid_projection(runs: dict, vae_ms: float, lm_ms: float) -> dict:
    """Hours to train ``runs`` (label -> config) one after another at these step times, the way
    ``tvae train-all`` trains them: a shorter run that a longer one passes through is published on
    the way (:func:`tvae_core.cli.training_groups`), so only each group's longest run is trained."""
    from tvae_core.cli import longest_first, training_groups

    groups = training_groups(longest_first(runs))
    steps = {"lm": 0, "vae": 0}
    for group in groups:
        cfg = runs[group[0]]
        steps["lm" if cfg.objective.name == "lm" else "vae"] += cfg.train.max_steps
    return {"runs": len(runs), "processes": len(groups), "steps_trained": steps["lm"] + steps["vae"],
            "train_hours": (steps["vae"] * vae_ms + steps["lm"] * lm_ms) / 1000 / 3600}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the main MDR and LM runs")
    parser.add_argument("--side-steps", type=int, default=100, help="steps of the batch-128 runs")
    parser.add_argument("--warmup-steps", type=int, default=40, help="steps of the unreported first run")
    parser.add_argument("--skip-whole-split-iw", action="store_true", help="leave out the ~1 minute IW timing")
    parser.add_argument("--eval-sentences", type=int, default=300, help="IW sentences in evaluate_run")
    parser.add_argument("--json", default=None, help="write every number here (default: $OUT/gpu_check.json)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same script on the CPU with the smoke profile (tests run it this way)")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA device; torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    import transformers

    from tvae_core.evaluation import evaluate_run
    from tvae_core.experiments import all_book_runs, method_config
    from tvae_core.profiles import get_profile

    started = time.perf_counter()
    profile = get_profile("smoke" if args.cpu_dry_run else "full")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or platform.machine())
    report = {"device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "runs": []}
    print(f"gpu-check on {report['device']} (torch {torch.__version__}, transformers {transformers.__version__})",
          flush=True)
    root = tempfile.mkdtemp(prefix="tvae-gpu-check-")

    def short(cfg, steps, **train):
        # validation on 1,000 sentences at the end only; no checkpoint inside the timed window
        return cfg.replace(train={"max_steps": steps, "eval_every": steps, "checkpoint_every": steps, **train},
                           data={"max_eval_sentences": 1000})

    mdr = method_config("MDR", profile, profile.target_rates[-1] if args.cpu_dry_run else 16.0)
    lm = method_config("LM", profile)
    fp32 = {"mixed_precision": "no", "lm_head_dtype": "float32"}
    bf16 = {"mixed_precision": "bf16", "lm_head_dtype": "bfloat16"}
    # a short run first, not reported: the process's first CUDA steps pay one-off costs (kernel
    # selection per new sequence length, the caching allocator growing) that would land on
    # whichever run came first
    train_and_time(short(mdr, args.warmup_steps, seed=1), root, report=False)
    print("training (full profile; float32 and bf16 autocast alternate):", flush=True)
    big = 4 * mdr.train.batch_size
    plan = [("vae", short(mdr, args.steps, **fp32)), ("vae_bf16", short(mdr, args.steps, **bf16)),
            ("lm", short(lm, args.steps, **fp32)), ("lm_bf16", short(lm, args.steps, **bf16)),
            ("vae_big", short(mdr, args.side_steps, batch_size=big, **fp32)),
            ("vae_big_bf16", short(mdr, args.side_steps, batch_size=big, **bf16))]
    rows, trained = {}, {}
    for name, cfg in plan:
        trained[name], rows[name] = train_and_time(cfg, root)
        report["runs"].append(rows[name])
    # evaluated below: the run trained as the profile trains
    as_profile = "vae_bf16" if profile.train.mixed_precision == "bf16" else "vae"
    mdr_run = trained[as_profile]
    vae_ms, lm_ms = rows["vae"]["ms_per_step"], rows["lm"]["ms_per_step"]
    if as_profile == "vae_bf16":
        vae_ms, lm_ms = rows["vae_bf16"]["ms_per_step"], rows["lm_bf16"]["ms_per_step"]
    report["vae_lm_ratio"] = rows["vae"]["ms_per_step"] / rows["lm"]["ms_per_step"]
    report["vae_lm_ratio_bf16"] = rows["vae_bf16"]["ms_per_step"] / rows["lm_bf16"]["ms_per_step"]
    print(f"  VAE/LM step ratio {report['vae_lm_ratio']:.2f} (bf16 {report['vae_lm_ratio_bf16']:.2f}); "
          f"bf16/float32 step time {rows['vae_bf16']['ms_per_step'] / rows['vae']['ms_per_step']:.2f} at batch "
          f"{mdr.train.batch_size}, {rows['vae_big_bf16']['ms_per_step'] / rows['vae_big']['ms_per_step']:.2f} "
          f"at {big}", flush=True)

    print("evaluation:", flush=True)
    size = replace(profile.estimators, iw_max_sentences=args.eval_sentences, mmd_num_samples=1000,
                   mmd_permutations=200)
    t0 = time.perf_counter()
    evaluation = evaluate_run(mdr_run, size, progress=False)
    report["evaluate_run"] = {"seconds": time.perf_counter() - t0, "iw_num_sentences": evaluation.iw_num_sentences,
                              "num_sentences": evaluation.num_sentences, "rate": evaluation.rate,
                              "iw_log_likelihood": evaluation.iw_log_likelihood,
                              "mutual_information": evaluation.mutual_information,
                              "marginal_kl": evaluation.marginal_kl}
    print(f"  evaluate_run (whole test split; IW K={size.iw_num_samples} on {evaluation.iw_num_sentences} "
          f"sentences): {report['evaluate_run']['seconds']:.1f} s; rate {evaluation.rate:.2f}, "
          f"IW {evaluation.iw_log_likelihood:.2f} nats", flush=True)
    iw = {"seconds": 0.0}
    if not args.skip_whole_split_iw:
        iw = whole_split_iw(mdr_run, profile.estimators.iw_num_samples, profile.estimators.decoder_dtype)
        report["whole_split_iw"] = iw
        print(f"  IW K={iw['num_samples']} on the whole test split ({iw['num_sentences']} sentences, "
              f"{iw['sequences_per_call']} sequences per decoder call): {iw['seconds']:.1f} s "
              f"({iw['iw_log_likelihood']:.2f} nats)", flush=True)
    report["peak_memory_gib"] = _gib(_peak_memory())

    grid = grid_projection(all_book_runs(profile), vae_ms, lm_ms)
    eval_hours = grid["runs"] * (iw["seconds"] + report["evaluate_run"]["seconds"]) / 3600
    report["grid"] = {**grid, "steps": profile.train.max_steps, "eval_hours_upper": eval_hours}
    train_hours = grid["train_hours"]
    print(f"projection: the book's {grid['runs']} runs ({grid['processes']} trainings, {grid['steps_trained']:,} "
          f"steps; the grid's runs at {profile.train.max_steps:,}) train in {train_hours:.1f} h on one GPU; "
          f"evaluating it (whole-split IW + the rest) under {eval_hours:.1f} h", flush=True)
    report["seconds"] = time.perf_counter() - started
    print(f"gpu-check passed in {report['seconds']:.0f} s", flush=True)

    target = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
