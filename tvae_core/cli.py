"""Command line: ``python -m tvae_core train ...`` and ``python -m tvae_core train-all ...``."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import FREE_BITS_VARIANTS, INJECTIONS, OBJECTIVES, RunConfig
from .profiles import PROFILE_NAMES

_METHOD_OF_OBJECTIVE = {"vae": "VAE", "ae": "AE", "cyc": "CYC", "fb": "FB", "mdr": "MDR", "cyc_fb": "CYC-FB",
                        "lm": "LM"}


def _config_from_args(args) -> RunConfig:
    from .experiments import base_config, method_config

    if args.config:
        return RunConfig.from_dict(json.loads(Path(args.config).read_text()))
    if args.objective == "beta_vae":
        cfg = base_config(args.profile, args.seed).replace(objective={"name": "beta_vae", "beta": args.beta},
                                                           label=f"beta-VAE {args.beta:g}")
    else:
        cfg = method_config(_METHOD_OF_OBJECTIVE[args.objective], args.profile, args.target_rate, args.seed,
                            free_bits_variant=args.free_bits_variant)
    model, train = {}, {}
    if args.injection:
        model["injection"] = args.injection
    if args.word_dropout is not None:
        model["word_dropout"] = args.word_dropout
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    if args.mdr_lr is not None or args.mdr_lambda_init is not None:
        objective = {}
        if args.mdr_lr is not None:
            objective["mdr_lr"] = args.mdr_lr
        if args.mdr_lambda_init is not None:
            objective["mdr_lambda_init"] = args.mdr_lambda_init
        cfg = cfg.replace(objective=objective)
    return cfg.replace(model=model, train=train)


def _summary(run) -> str:
    keys = ("rate", "distortion", "elbo", "perplexity_bound", "active_units", "mdr_lambda")
    metrics = {k: round(run.metrics[k], 3) for k in keys if k in run.metrics}
    return json.dumps({"label": run.label, "key": run.config.key, "path": str(run.path), "metrics": metrics})


def cmd_train(args) -> int:
    from .runs import train_or_load

    cfg = _config_from_args(args)
    started = time.time()
    run = train_or_load(cfg, args.runs_dir, progress=not args.quiet)
    print(f"run stored in {run.path} ({time.time() - started:.1f} s)")
    print(_summary(run))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_run
    from .runs import train_or_load

    cfg = _config_from_args(args)
    run = train_or_load(cfg, args.runs_dir, progress=not args.quiet)
    started = time.time()
    result = evaluate_run(run, args.profile, progress=not args.quiet)
    keys = ("rate", "distortion", "elbo", "iw_log_likelihood", "mutual_information", "marginal_kl", "active_units")
    print(f"evaluated in {time.time() - started:.1f} s")
    print(json.dumps({"label": run.label, **{k: getattr(result, k) for k in keys}}))
    return 0


def cmd_train_all(args) -> int:
    """Train (and, with ``--evaluate``, evaluate) every run of the book for a profile,
    ``--workers`` single-threaded processes at a time (on 2 cores, two 1-thread runs side by side
    beat one 2-thread run)."""
    from .experiments import all_book_runs
    from .runs import runs_dir

    runs = all_book_runs(args.profile, args.seed)
    root = runs_dir(args.runs_dir)
    from .evaluation import evaluation_key
    from .profiles import get_profile

    size = get_profile(args.profile).estimators
    trained = {label for label, cfg in runs.items() if (root / cfg.key).is_dir()}
    evaluated = {label for label, cfg in runs.items()
                 if (root / cfg.key / f"evaluation-{evaluation_key(cfg.key, size)}.json").is_file()}
    todo = {label: cfg for label, cfg in runs.items()
            if label not in trained or (args.evaluate and label not in evaluated)}
    print(f"{len(runs)} runs in profile {args.profile!r}; {len(trained)} trained, "
          f"{len(runs) - len(trained)} to train" + (f", {len(evaluated)} evaluated" if args.evaluate else ""),
          flush=True)
    config_dir = root / "_pending"
    config_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    def launch(item):
        label, cfg = item
        path = config_dir / f"{cfg.key}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        command = "evaluate" if args.evaluate else "train"
        cmd = [sys.executable, "-m", "tvae_core", command, "--config", str(path), "--quiet",
               "--profile", args.profile]
        if args.runs_dir:
            cmd += ["--runs-dir", str(args.runs_dir)]
        started = time.time()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.time() - started
        if result.returncode != 0:
            return label, seconds, f"FAILED (exit {result.returncode}):\n{result.stderr[-3000:]}"
        return label, seconds, result.stdout.strip().splitlines()[-1]

    failed = 0
    started = time.time()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for label, seconds, outcome in pool.map(launch, todo.items()):
            failed += outcome.startswith("FAILED")
            print(f"[{time.time() - started:7.1f} s] {label}: {seconds:.1f} s {outcome}", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvae_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run (or load it from the cache) and print its metrics")
    train.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    train.add_argument("--objective", default="vae", choices=OBJECTIVES)
    train.add_argument("--target-rate", type=float, default=None, help="nats per sentence (fb, mdr, cyc_fb)")
    train.add_argument("--free-bits-variant", default="example_dim", choices=FREE_BITS_VARIANTS)
    train.add_argument("--beta", type=float, default=1.0, help="beta_vae only")
    train.add_argument("--injection", default=None, choices=INJECTIONS)
    train.add_argument("--word-dropout", type=float, default=None)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--mdr-lr", type=float, default=None)
    train.add_argument("--mdr-lambda-init", type=float, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--config", default=None, help="a RunConfig as JSON (overrides the flags above)")
    train.add_argument("--runs-dir", default=None)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    train_all = sub.add_parser("train-all", help="train every run of the book for a profile")
    train_all.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    train_all.add_argument("--seed", type=int, default=0)
    train_all.add_argument("--workers", type=int, default=2)
    train_all.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    train_all.add_argument("--runs-dir", default=None)
    train_all.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                           help="also compute (and cache) each run's held-out evaluation")
    train_all.set_defaults(func=cmd_train_all)

    evaluate = sub.add_parser("evaluate", help="train or load one run, then compute its cached evaluation",
                              parents=[], add_help=True)
    for action in train._actions:
        if action.dest != "help":
            evaluate._add_action(action)
    evaluate.set_defaults(func=cmd_evaluate)

    execute = sub.add_parser("execute", help="run every notebook with papermill into book/notebooks")
    execute.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    execute.add_argument("--kernel", default=None, help="Jupyter kernel name (make install registers `tvae`)")
    execute.add_argument("--only", nargs="*", default=None, help="notebook prefixes, e.g. 00 03")
    execute.add_argument("--workers", type=int, default=2, help="notebooks executed side by side (one kernel each)")
    execute.add_argument("--pretrained", action="store_true",
                         help="execute notebooks/pretrained/ (needs `make pretrained`) instead of notebooks/")
    execute.set_defaults(func=lambda a: __import__("tvae_core.book", fromlist=["x"]).execute_all(
        a.profile, a.kernel, a.only, a.workers, a.pretrained))

    render = sub.add_parser("render", help="build the HTML book from the executed notebooks (strict)")
    render.set_defaults(func=lambda a: __import__("tvae_core.book", fromlist=["x"]).render())

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad parameters: one line naming the parameter, no traceback
        parser.exit(2, f"error: {err}\n")
