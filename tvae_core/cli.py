"""Command line: ``tvae train ...``, ``tvae evaluate ...``, ``tvae train-all ...`` (or ``python -m tvae_core ...``).

Bad parameters end with one line naming the parameter and the accepted values, and exit code 2;
a diverged training run ends with its diagnostic and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import os
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from .allocator import keep_freed_memory
from .config import FREE_BITS_VARIANTS, INJECTIONS, RunConfig
from .methods import METHODS
from .profiles import PROFILE_NAMES

# flags that only some objectives read (Method.reads): given with another objective they would be
# ignored (or, worse, change the run key of an identical run), so they are refused
_OBJECTIVE_FLAGS = ("target_rate", "free_bits_variant", "beta", "mdr_lr", "mdr_lambda_init")


def _objectives_reading(flag: str) -> tuple[str, ...]:
    return tuple(m.name for m in METHODS.values() if flag in m.reads)
# flags that build a config, hence meaningless next to --config
_CONFIG_FLAGS = ("objective", "target_rate", "free_bits_variant", "beta", "injection", "word_dropout", "max_steps",
                 "mdr_lr", "mdr_lambda_init", "seed", "corpus", "threads", "mixed_precision",
                 "gradient_accumulation_steps")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _read_config_file(path: str, flag: str = "--config") -> RunConfig:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{flag} {path}: file not found; accepted values: a RunConfig JSON file")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path}: not valid JSON ({err})") from None
    return RunConfig.from_dict(data)


def _corpus_data(path: str) -> dict:
    """``data`` overrides for ``--corpus``: a text file (one sentence per line) or a folder with
    train.txt/valid.txt/test.txt; stored as an absolute path so the run key does not depend on
    the working directory."""
    corpus = Path(path).expanduser()
    if not corpus.exists():
        raise ValueError(f"--corpus {path}: not found; accepted values: a text file with one sentence per line, "
                         "or a folder with train.txt, valid.txt and test.txt")
    return {"source": "text", "path": str(corpus.resolve())}


def _config_from_args(args) -> RunConfig:
    from .experiments import method_config

    if args.config:
        given = [_flag(name) for name in _CONFIG_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --config (the config file sets them); "
                             "accepted: --config alone, or the flags without --config")
        return _read_config_file(args.config)
    objective = args.objective or "vae"
    for name in _OBJECTIVE_FLAGS:
        objectives = _objectives_reading(name)
        if getattr(args, name) is not None and objective not in objectives:
            raise ValueError(f"{_flag(name)} does not apply to --objective {objective}; accepted with "
                             f"--objective {' / '.join(objectives)}")
    seed = 0 if args.seed is None else args.seed
    cfg = method_config(objective, args.profile, args.target_rate, seed,
                        free_bits_variant=args.free_bits_variant or "example_dim", beta=args.beta)
    data, model, train = {}, {}, {}
    if args.corpus is not None:
        data = _corpus_data(args.corpus)
    if args.injection:
        model["injection"] = args.injection
    if args.word_dropout is not None:
        model["word_dropout"] = args.word_dropout
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    if args.threads is not None:
        train["num_threads"] = args.threads
    if args.mixed_precision is not None:
        train["mixed_precision"] = args.mixed_precision
    if args.gradient_accumulation_steps is not None:
        train["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if args.mdr_lr is not None or args.mdr_lambda_init is not None:
        objective_changes = {}
        if args.mdr_lr is not None:
            objective_changes["mdr_lr"] = args.mdr_lr
        if args.mdr_lambda_init is not None:
            objective_changes["mdr_lambda_init"] = args.mdr_lambda_init
        cfg = cfg.replace(objective=objective_changes)
    return cfg.replace(data=data, model=model, train=train)


def _summary(run) -> str:
    keys = ("rate", "distortion", "elbo", "perplexity_bound", "active_units", "mdr_lambda")
    metrics = {k: round(run.metrics[k], 3) for k in keys if k in run.metrics}
    return json.dumps({"label": run.label, "key": run.config.key, "path": str(run.path), "metrics": metrics})


def cmd_train(args) -> int:
    started = time.time()
    run, *shorter = _runs_of(args)
    print(f"run stored in {run.path} ({time.time() - started:.1f} s)")
    for one in (*shorter, run):
        print(_summary(one))
    return 0


def _runs_of(args) -> list:
    """The run the flags name and its ``--snapshot`` runs, trained (the shorter ones published on
    the way, :func:`tvae_core.train.is_prefix_of`) or loaded from the cache: the named run first."""
    from .runs import train_or_load

    cfg = _config_from_args(args)
    shorter = tuple(_read_config_file(path, "--snapshot") for path in args.snapshot)
    run = train_or_load(cfg, args.runs_dir, progress=not args.quiet, snapshots=shorter)
    return [run, *(train_or_load(s, args.runs_dir, progress=not args.quiet) for s in shorter)]


def evaluation_report(run, result, seconds: float) -> str:
    """The held-out numbers of one run as a small table, rounded, with units."""
    r = result
    rows = [
        ("rate", f"{r.rate:.2f}", "nats per sentence"),
        ("distortion", f"{r.distortion:.2f}", "nats per sentence"),
        ("ELBO", f"{r.elbo:.2f}", f"nats per sentence ({r.elbo_per_token:.3f} per token)"),
        (f"IW log-likelihood (K={r.iw_num_samples})", f"{r.iw_log_likelihood:.2f}",
         f"nats per sentence, +- {r.iw_log_likelihood_se:.2f} (standard error, {r.iw_num_sentences:,} sentences)"),
        ("perplexity", f"{r.iw_perplexity:.1f}",
         f"per token, from the IW bound (ELBO bound: {r.perplexity_bound:.1f})"),
        ("mutual information", f"{r.mutual_information:.2f}",
         f"nats (ceiling log N = {r.mutual_information_ceiling:.2f}; leave-one-out {r.mutual_information_loo:.2f})"),
        ("marginal KL", f"{r.marginal_kl:.2f}", f"nats (leave-one-out {r.marginal_kl_loo:.2f})"),
        ("active units", f"{r.active_units}", f"of {len(r.kl_per_dimension)} latent dimensions"),
    ]
    width = max(len(name) for name, _, _ in rows)
    head = (f"{r.label} (run {r.run_key}), {r.split} split: {r.num_sentences:,} sentences, {r.num_tokens:,} "
            f"predicted tokens; evaluated in {seconds:.1f} s")
    return "\n".join([head] + [f"  {name:<{width}}  {value:>9}  {unit}" for name, value, unit in rows])


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_run
    from .profiles import get_profile

    size = get_profile(args.profile).estimators
    for one in _runs_of(args):
        started = time.time()
        result = evaluate_run(one, size, progress=not args.quiet)
        if args.training_split:   # the pages' training-split estimates (tvae_core.training_split), cached
            from .training_split import training_split_aggregate

            training_split_aggregate(one, seed=one.config.train.seed, progress=not args.quiet)
        if args.budget_row:       # notebook 07's row (tvae_core.budget), which holds them too
            from .budget import cached_budget_measures

            cached_budget_measures(one, args.profile, seed=one.config.train.seed, progress=not args.quiet)
        seconds = time.time() - started
        if args.json:
            keys = ("rate", "distortion", "elbo", "iw_log_likelihood", "iw_perplexity", "mutual_information",
                    "marginal_kl", "active_units")
            print(json.dumps({"label": one.label, "key": one.config.key,
                              **{k: round(getattr(result, k), 3) for k in keys}, "seconds": round(seconds, 1)}),
                  flush=True)
        else:
            print(evaluation_report(one, result, seconds))
    return 0


def pending_runs(runs: dict, root: Path, profile: str, *, evaluate: bool,
                 measures: dict[str, set[str]]) -> tuple[dict, set, set]:
    """``(to_do, trained, evaluated)`` of the book's ``runs`` (label -> config) in the run cache
    ``root``: a run is trained when its cache entry verifies (a damaged folder is not: the worker
    sets it aside and retrains it), and evaluated when every cached measure the pages read of it
    exists (``measures``: run key -> the extra measures beyond the test-split evaluation, from
    :func:`tvae_core.experiments.training_split_measures`; all of them are verified again on
    load). ``to_do`` holds the untrained runs and, with ``evaluate``, the unevaluated ones, the
    longest runs first: the pool's last minutes are then short runs on both cores rather than one
    long run on one."""
    from .budget import budget_row_path
    from .evaluation import evaluation_is_cached
    from .profiles import get_profile
    from .runs import is_valid_run
    from .training_split import training_split_path

    size = get_profile(profile).estimators
    trained = {label for label, cfg in runs.items() if is_valid_run(cfg, root)}

    def measured(cfg) -> bool:
        run_dir, wanted = root / cfg.key, measures.get(cfg.key, set())
        return (evaluation_is_cached(run_dir, cfg.key, size)
                and ("training_split" not in wanted
                     or training_split_path(run_dir, cfg.key, seed=cfg.train.seed).is_file())
                and ("budget_row" not in wanted
                     or budget_row_path(run_dir, cfg.key, profile, seed=cfg.train.seed).is_file()))

    evaluated = {label for label, cfg in runs.items() if label in trained and measured(cfg)}
    to_do = {label: cfg for label, cfg in runs.items()
             if label not in trained or (evaluate and label not in evaluated)}
    return longest_first(to_do), trained, evaluated


def longest_first(runs: dict) -> dict:
    """``runs`` (label -> config) ordered by the sentences they train on, most first: the order
    in which :func:`training_groups` groups them and train-all starts them."""
    return dict(sorted(runs.items(), key=lambda item: -item[1].train.max_steps * item[1].train.batch_size))


def training_groups(to_do: dict) -> list[list[str]]:
    """The pending runs (label -> config, longest first) grouped for one process each: a group's
    first run is the longest, the others are shorter runs it passes through
    (:func:`tvae_core.train.is_prefix_of`), which training it publishes on the way instead of
    training each from step 0. A run that no longer pending run passes through is a group of its
    own. Groups keep the longest-first order."""
    from .train import is_prefix_of

    groups: list[list[str]] = []
    for label, cfg in to_do.items():
        home = next((g for g in groups if is_prefix_of(cfg, to_do[g[0]])), None)
        if home is None:
            groups.append([label])
        else:
            home.append(label)
    return groups


def cmd_train_all(args) -> int:
    """Train (and, with ``--evaluate``, evaluate) every run of the book for a profile,
    ``--workers`` single-threaded processes at a time (on 2 cores, two 1-thread runs side by side
    beat one 2-thread run)."""
    from .experiments import all_book_runs, training_split_measures
    from .runs import runs_dir

    for name in ("workers", "threads"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} {value} is not accepted; accepted values: an integer >= 1")
    runs = all_book_runs(args.profile, args.seed)
    root = runs_dir(args.runs_dir)
    extra = training_split_measures(args.profile, args.seed)
    todo, trained, evaluated = pending_runs(runs, root, args.profile, evaluate=args.evaluate, measures=extra)
    print(f"{len(runs)} runs in profile {args.profile!r}; {len(trained)} trained, "
          f"{len(runs) - len(trained)} to train" + (f", {len(evaluated)} evaluated" if args.evaluate else ""),
          flush=True)
    config_dir = root / "_pending"
    config_dir.mkdir(parents=True, exist_ok=True)
    # inherited by the worker processes, which import torch after they start
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    local, slots = threading.local(), []

    def launch(group):
        paths = []
        for label in group:
            cfg = todo[label]
            paths.append(config_dir / f"{cfg.key}.json")
            paths[-1].write_text(json.dumps(cfg.to_dict()))
        command = "evaluate" if args.evaluate else "train"
        cmd = [command, "--config", str(paths[0]), "--quiet",
               "--profile", args.profile] + (["--json"] if args.evaluate else [])
        for path in paths[1:]:
            cmd += ["--snapshot", str(path)]
        if args.evaluate:   # every measure any run of the group needs (a budget row holds the training split's)
            wanted = set().union(*(extra.get(todo[label].key, set()) for label in group))
            cmd += [f"--{name.replace('_', '-')}" for name in sorted(wanted)]
        if args.runs_dir:
            cmd += ["--runs-dir", str(args.runs_dir)]
        started = time.time()
        if getattr(local, "slot", None) is None:
            local.slot = WorkerSlot()
            slots.append(local.slot)
        code, out, err = local.slot.run(run_in_worker, cmd)
        seconds = time.time() - started
        names = " + ".join(group)
        if code != 0:
            return names, seconds, [f"FAILED (exit {code}):\n{err[-3000:]}"]
        lines = out.strip().splitlines()
        reports = [line for line in lines if line.startswith("{")] if args.evaluate else lines[-1:]
        return names, seconds, reports

    failed = 0
    started = time.time()
    groups = training_groups(todo)
    try:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for names, seconds, outcomes in pool.map(launch, groups):
                failed += any(outcome.startswith("FAILED") for outcome in outcomes)
                print(f"[{time.time() - started:7.1f} s] {names}: {seconds:.1f} s", flush=True)
                for outcome in outcomes:
                    print(f"    {outcome}", flush=True)
    finally:
        for slot in slots:
            slot.close()
    return 1 if failed else 0


class WorkerSlot:
    """One spawned worker process kept for every call, so that train-all pays the imports and the
    loading once per worker, not per group. A worker that dies (a crash, not an exception) fails
    that call only, as exit status -1 with the reason on its stderr; the next call starts a new
    one. ``started``: how many processes this slot has started."""

    def __init__(self):
        self._executor: ProcessPoolExecutor | None = None
        self.started = 0

    def run(self, function, *args):
        """``function(*args)`` in the worker process (both picklable)."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            self.started += 1
        try:
            return self._executor.submit(function, *args).result()
        except BrokenProcessPool as error:
            self.close()
            return -1, "", f"the worker process died: {error}"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def run_in_worker(argv: list[str]) -> tuple[int, str, str]:
    """``tvae <argv>`` in this process, as train-all's workers run each group: the exit status
    and what it printed to stdout and stderr (Python-level output; an exception's traceback goes
    to stderr, exit status 1)."""
    import contextlib
    import io
    import traceback

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse and parser.exit (their message already on stderr)
            code = exit_.code if isinstance(exit_.code, int) or exit_.code is None else 1
        except Exception:  # noqa: BLE001 - reported as the group's failure, the other groups go on
            traceback.print_exc()
            code = 1
    return code or 0, out.getvalue(), err.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    # the options that name one run, shared by `train` and `evaluate`
    run_options = argparse.ArgumentParser(add_help=False)
    run_options.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    run_options.add_argument("--objective", default=None, choices=tuple(METHODS), help="default: vae")
    only = {flag: ", ".join(_objectives_reading(flag)) for flag in _OBJECTIVE_FLAGS}
    run_options.add_argument("--target-rate", type=float, default=None,
                             help=f"nats per sentence ({only['target_rate']} only)")
    run_options.add_argument("--free-bits-variant", default=None, choices=FREE_BITS_VARIANTS,
                             help=f"{only['free_bits_variant']} only (default: example_dim)")
    run_options.add_argument("--beta", type=float, default=None, help=f"{only['beta']} only (default: 1)")
    run_options.add_argument("--injection", default=None, choices=INJECTIONS)
    run_options.add_argument("--word-dropout", type=float, default=None)
    run_options.add_argument("--max-steps", type=int, default=None)
    run_options.add_argument("--mdr-lr", type=float, default=None, help=f"{only['mdr_lr']} only")
    run_options.add_argument("--mdr-lambda-init", type=float, default=None, help=f"{only['mdr_lambda_init']} only")
    run_options.add_argument("--seed", type=int, default=None, help="default: 0")
    run_options.add_argument("--corpus", default=None, metavar="PATH",
                             help="a local corpus instead of PTB: a text file with one sentence per line (split "
                                  "90/5/5), or a folder with train.txt, valid.txt and test.txt")
    run_options.add_argument("--threads", type=int, default=None,
                             help="torch threads of training (train.num_threads, part of the run; default: 1)")
    run_options.add_argument("--mixed-precision", default=None,
                             help="train.mixed_precision: no | fp16 | bf16 (a GPU; fp16 on CUDA only); default: the "
                                  "profile's")
    run_options.add_argument("--gradient-accumulation-steps", type=int, default=None,
                             help="train.gradient_accumulation_steps: each step's batch in this many micro-batches "
                                  "(less memory, one optimiser step; default: 1)")
    run_options.add_argument("--config", default=None, help="a RunConfig as JSON (instead of the flags above)")
    run_options.add_argument("--snapshot", action="append", default=[], metavar="CONFIG",
                             help="a shorter run of the same config (a RunConfig JSON file; repeatable): "
                                  "published on the way while training the longer one (and evaluated too)")
    run_options.add_argument("--runs-dir", default=None)
    run_options.add_argument("--quiet", action="store_true", help="no progress bar")
    train = sub.add_parser("train", parents=[run_options],
                           help="train one run (or load it from the cache) and print its metrics")
    train.set_defaults(func=cmd_train)

    train_all = sub.add_parser("train-all", help="train every run of the book for a profile")
    train_all.add_argument("--profile", default="default", choices=PROFILE_NAMES)
    train_all.add_argument("--seed", type=int, default=0)
    train_all.add_argument("--workers", type=int, default=2)
    train_all.add_argument("--threads", type=int, default=1,
                           help="torch threads per worker for evaluation (training uses each run's "
                                "train.num_threads)")
    train_all.add_argument("--runs-dir", default=None)
    train_all.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                           help="also compute (and cache) each run's held-out evaluation")
    train_all.set_defaults(func=cmd_train_all)

    evaluate = sub.add_parser("evaluate", parents=[run_options],
                              help="train or load one run, then compute its cached evaluation")
    evaluate.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    evaluate.add_argument("--training-split", action="store_true",
                          help="also cache the training split's aggregate MI and marginal KL (notebook 03)")
    evaluate.add_argument("--budget-row", action="store_true",
                          help="also cache the run's row of the training-budget study (notebook 07)")
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
    keep_freed_memory()   # tvae_core.allocator: no page faults per training step; no number changes
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad parameters (missing files and weights included):
        parser.exit(2, f"error: {err}\n")           # one line naming the parameter, no traceback
    except FloatingPointError as err:  # train.TrainingDiverged, or an evaluation refused as non-finite
        parser.exit(1, f"error: {err}\n")
