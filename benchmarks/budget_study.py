"""The training-budget study of issue 18: VAE, AE, FB 8/32 and MDR 8/32 at every budget of the
profile's ``training.budget_steps`` (tvae_core.experiments.budget_study), each run trained (or loaded
from the run cache), evaluated, and measured by tvae_core.budget.budget_measures; the table goes to
``--output`` (benchmarks/budget_study.md for the default profile).

Re-runnable: a run's measures are stored next to it (``budget-row-<key>.json``, tvae_core.budget.cached_budget_measures), so a second
call only does what is missing. ``--workers`` single-threaded processes at a time (on 2 cores, two
1-thread processes beat one 2-thread one). Shorter budgets first; within a budget MDR 32 and FB 32
first, the runs the issue's comparison needs; ``--budgets 3000 600`` runs those budgets in that order.

    python benchmarks/budget_study.py --profile default --workers 2 [--max-steps 3000]
    python benchmarks/budget_study.py --profile smoke --output /tmp/budget.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tvae_core.allocator import keep_freed_memory  # noqa: E402
from tvae_core.budget import budget_mmm_by_steps, cached_budget_measures, load_budget_row  # noqa: E402
from tvae_core.budget_report import budget_table  # noqa: E402
from tvae_core.config import RunConfig  # noqa: E402
from tvae_core.experiments import budget_study  # noqa: E402
from tvae_core.profiles import PROFILE_NAMES, get_profile  # noqa: E402
from tvae_core.runs import runs_dir  # noqa: E402

keep_freed_memory()   # as the book's training processes do (tvae_core.cli): no page faults per step

MMM_VERSION = 1  # bump when budget_mmm changes what it stores
PRIORITY = {("mdr", 32.0): 0, ("fb", 32.0): 1, ("mdr", 8.0): 2, ("fb", 8.0): 3, ("vae", None): 4, ("ae", None): 5}


def stored_row(root: Path, cfg: RunConfig, profile: str) -> dict | None:
    """The run's cached row (tvae_core.budget.load_budget_row), None when not measured yet."""
    return load_budget_row(root / cfg.key, cfg.key, profile)


def measure_one(config_path: str, profile: str, runs_root: str | None) -> None:
    """Worker: train or load one run, measure it; its row is stored next to it."""
    import torch

    from tvae_core.runs import train_or_load

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(json.loads(Path(config_path).read_text()))
    run = train_or_load(cfg, runs_root, progress=False)
    row = cached_budget_measures(run, profile)
    print(json.dumps({"label": cfg.label, "rate": row["test"]["rate"], "seconds": row["seconds"]}))


def mmm_path(root: Path, profile: str, steps: int) -> Path:
    return root / f"budget-mmm-{profile}-{steps}-v{MMM_VERSION}.json"


def mmm_one(profile: str, configs: dict[str, RunConfig], root: Path, steps: int) -> None:
    """Fit the MMM on the runs of one budget (all must be trained), stored next to the runs."""
    from tvae_core.runs import load_run, write_json_atomic

    runs = {label: load_run(cfg, root) for label, cfg in configs.items() if cfg.train.max_steps == steps}
    write_json_atomic(mmm_path(root, profile, steps), budget_mmm_by_steps(runs, profile)[steps])


def mmm_table(root: Path, profile: str, budgets) -> list[str]:
    lines = []
    for steps in budgets:
        path = mmm_path(root, profile, steps)
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        floor, floor_se = result["floor"]
        lines += [f"### Mixed membership model ({result['family']}), runs of {steps} steps", "",
                  f"{result['samples_per_group']} samples of q(z) per group (test sentences at random, 30% held "
                  f"out for evaluation), fitted in {result['fit_seconds']:.0f} s. Calibration (a second prior "
                  f"group, true marginal KL 0): {floor:.3f} +- {floor_se:.3f} nats.", "",
                  "| run | rate (sampled sentences) | marginal KL (MMM) | index-code MI R - KL |",
                  "|---|---:|---:|---:|"]
        for label, g in result["groups"].items():
            lines.append(f"| {label} | {g['rate']:.2f} | {g['marginal_kl']:.2f} +- {g['marginal_kl_se']:.2f} | "
                         f"{g['index_code_mi']:.2f} |")
        lines.append("")
    return lines


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; load average (1 min) at writing "
            f"{load:.1f}; {datetime.date.today().isoformat()}")


def write_table(profile: str, configs: dict[str, RunConfig], root: Path, output: Path) -> int:
    rows = [row for cfg in configs.values() if (row := stored_row(root, cfg, profile)) is not None]
    p = get_profile(profile)
    any_cfg = next(iter(configs.values()))
    est = p.estimators
    text = [
        f"# Training-budget study ({profile} profile)", "",
        f"Written by `benchmarks/budget_study.py --profile {profile}` (issue 18): {len(rows)} of "
        f"{len(configs)} runs measured. Machine: {machine_line()}.", "",
        f"Settings: batch {any_cfg.train.batch_size}, budgets {p.budget_steps} optimiser steps "
        f"(learning-rate warm-up {any_cfg.train.lr_warmup_steps} steps for every budget, then constant), "
        f"`lm_head_kernel=\"native\"`, `sync_every=50`, one thread per run, two runs at a time; "
        f"model hidden {any_cfg.model.hidden_size}, {any_cfg.model.num_layers} decoder / "
        f"{any_cfg.model.encoder_layers} encoder layers, latent_dim {any_cfg.model.latent_dim}; MDR damping "
        f"{[c.objective.mdr_damping for c in configs.values() if c.objective.name == 'mdr'][:1]}.", "",
        "Columns: rate, distortion, ELBO (nats per sentence, single-sample, whole test split); IW LL with K "
        f"= {est.iw_num_samples} on the first {est.iw_max_sentences} test sentences; index-code MI and "
        "marginal KL of the aggregate posterior (self term included) on the whole test split (ceiling "
        "log N) and on the whole training split (ceiling log N, N the split's sentences): MI is a lower "
        "estimate capped at log N, marginal KL an upper estimate with floor rate - log N; a value within "
        "0.1 nat of its limit is printed as a bound (`>= x (ceiling c)`, `<= x (floor)`), not a value; in "
        "brackets the training split's leave-one-out marginal KL, biased down (with the self-term one, a "
        "bracket when the two are ordered). AU: "
        "active units on the training split (Var_x E[z_d] > 0.01). Recon acc: greedy reconstruction token "
        "accuracy on the first 200 test sentences from z = E_q[z|x], and from z = 0 (the decoder without "
        "information about x). Train s: the run's training wall time in its process (and its steady-state "
        "seconds per step), two runs sharing the 2 cores.", "",
        budget_table(rows) if rows else "(no runs measured yet)\n",
        *mmm_table(root, profile, p.budget_steps),
    ]
    output.write_text("\n".join(text))
    return len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="only budgets up to this many steps")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="the budgets to run, in this order (default: the profile's, shortest first)")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--output", default=None, help="default: benchmarks/budget_study.md (default profile)")
    parser.add_argument("--table-only", action="store_true", help="write the table from the stored rows")
    parser.add_argument("--mmm", type=int, default=None,
                        help="also fit the mixed membership model (R^D) on the runs of this budget")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker mode: a config JSON
    args = parser.parse_args(argv)
    if args.one:
        measure_one(args.one, args.profile, args.runs_dir)
        return 0
    root = runs_dir(args.runs_dir)
    configs = budget_study(args.profile)
    output = Path(args.output) if args.output else ROOT / "benchmarks" / f"budget_study{'' if args.profile == 'default' else '_' + args.profile}.md"
    todo = [cfg for cfg in configs.values()
            if (args.max_steps is None or cfg.train.max_steps <= args.max_steps) and stored_row(root, cfg, args.profile) is None]
    order = args.budgets or sorted({cfg.train.max_steps for cfg in configs.values()})
    todo = [cfg for cfg in todo if cfg.train.max_steps in order]
    todo.sort(key=lambda c: (order.index(c.train.max_steps), PRIORITY.get((c.objective.name, c.objective.target_rate), 9)))
    print(f"{len(configs)} runs in the study; {len(todo)} to measure", flush=True)
    pending = root / "_pending"
    pending.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.time()

    def launch(cfg: RunConfig):
        path = pending / f"{cfg.key}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        cmd = [sys.executable, __file__, "--one", str(path), "--profile", args.profile]
        if args.runs_dir:
            cmd += ["--runs-dir", str(args.runs_dir)]
        t0 = time.time()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return cfg, time.time() - t0, result

    failed = 0
    if not args.table_only:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for cfg, seconds, result in pool.map(launch, todo):
                ok = result.returncode == 0
                failed += not ok
                tail = result.stdout.strip().splitlines()[-1:] if ok else [result.stderr[-3000:]]
                print(f"[{time.time() - started:7.1f} s] {cfg.label}: {seconds:.1f} s "
                      f"{'ok' if ok else 'FAILED'} {tail[0] if tail else ''}", flush=True)
                write_table(args.profile, configs, root, output)  # the table grows as runs finish
    if args.mmm is not None:
        mmm_one(args.profile, configs, root, args.mmm)
    count = write_table(args.profile, configs, root, output)
    print(f"{count} rows -> {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
