"""The run cache: ``data/runs/<key>/`` holds one finished run, named by the hash of its config.

A finished run directory contains ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``history.json`` (training and validation curves), ``metrics.json`` (final validation metrics)
and ``meta.json`` (format version, package versions, wall time). It is built in a temporary
directory and renamed into place (atomic), so a reader never sees half a run. An entry that fails
validation (missing file, truncated safetensors, config hash or format version mismatch) is
reported, moved aside as ``<key>.damaged-<n>`` and retrained, never loaded.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import CACHE_FORMAT_VERSION, RunConfig
from .data import default_data_dir

log = logging.getLogger(__name__)

# TVAE_RUNS_DIR, else the checkout's data/runs, else the user's cache (data.default_data_dir)
DEFAULT_RUNS_DIR = Path(os.environ.get("TVAE_RUNS_DIR", default_data_dir() / "runs"))
RUN_FILES = ("config.json", "model.safetensors", "tokenizer.json", "history.json", "metrics.json", "meta.json")


class DamagedRunError(RuntimeError):
    """A cached run failed validation; the message says why."""


def runs_dir(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else DEFAULT_RUNS_DIR


def write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float))
    os.replace(tmp, path)


def validate_run_dir(path: Path, config: RunConfig) -> None:
    """Raise :class:`DamagedRunError` unless ``path`` is a complete run of ``config``."""
    from safetensors import safe_open

    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise DamagedRunError(f"{path}: missing {missing}")
    try:
        meta = json.loads((path / "meta.json").read_text())
        stored = json.loads((path / "config.json").read_text())
        json.loads((path / "history.json").read_text())
        json.loads((path / "metrics.json").read_text())
    except json.JSONDecodeError as err:
        raise DamagedRunError(f"{path}: unreadable JSON ({err})") from None
    if meta.get("cache_format_version") != CACHE_FORMAT_VERSION:
        raise DamagedRunError(f"{path}: cache format version {meta.get('cache_format_version')} != "
                              f"{CACHE_FORMAT_VERSION}")
    try:
        stored_key = RunConfig.from_dict(stored).key
    except (TypeError, ValueError, KeyError) as err:
        raise DamagedRunError(f"{path}: config.json does not describe a valid run ({err})") from None
    if stored_key != config.key or path.name != config.key:
        raise DamagedRunError(f"{path}: config hash {stored_key} does not match the requested {config.key}")
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)
    except Exception as err:  # truncated or corrupt file
        raise DamagedRunError(f"{path}: model.safetensors is unreadable ({err})") from None


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged entry aside (kept for inspection, never loaded) and log why."""
    n = 0
    while (target := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    log.warning("run cache entry %s is damaged: %s; moved to %s and retraining", path, reason, target)
    os.replace(path, target)
    return target


def finalize_run_dir(staging: Path, final: Path) -> None:
    """Atomically publish a completed staging directory as the run ``final``."""
    if final.exists():  # someone finished the same run first; theirs is equally valid
        shutil.rmtree(staging, ignore_errors=True)
        return
    os.replace(staging, final)


@dataclass
class Run:
    """A finished run: its config, the trained model, vocabulary, curves and final metrics."""

    config: RunConfig
    path: Path
    model: object
    vocab: object
    history: dict
    metrics: dict
    meta: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.config.label or self.config.objective.name


def load_run(config: RunConfig, root: str | Path | None = None) -> Run:
    """Load a finished run; raises :class:`DamagedRunError` (or FileNotFoundError) otherwise."""
    from safetensors.torch import load_model

    from .data import Vocabulary
    from .train import build_model

    path = runs_dir(root) / config.key
    if not path.is_dir():
        raise FileNotFoundError(f"no finished run for {config.label or config.key} in {path.parent}")
    validate_run_dir(path, config)
    vocab_type = Vocabulary
    if config.data.tokenizer == "pretrained":  # a Hugging Face tokenizer, its special ids stored alongside
        from .pretrained import PretrainedVocabulary as vocab_type
    vocab = vocab_type.load(path / "tokenizer.json")
    model = build_model(config, vocab)
    load_model(model, str(path / "model.safetensors"), strict=True, device="cpu")
    model.eval()
    history = json.loads((path / "history.json").read_text())
    metrics = json.loads((path / "metrics.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    return Run(config, path, model, vocab, history, metrics, meta)


def export_pretrained(run: Run, directory: str | Path | None = None) -> Path:
    """Save ``run``'s model in the Hugging Face layout (:meth:`TransformerVAE.save_pretrained`)
    with its tokenizer, by default into ``<run folder>/pretrained/`` next to the cached run;
    ``TransformerVAE.from_pretrained`` loads it back. Returns the folder."""
    target = Path(directory) if directory is not None else run.path / "pretrained"
    run.model.save_pretrained(target)
    run.vocab.save(target / "tokenizer.json")
    return target


def train_or_load(config: RunConfig, root: str | Path | None = None, *, progress: bool = True) -> Run:
    """The finished run for ``config``: loaded from the cache if a valid entry exists, trained
    (resuming from its last checkpoint, if any) otherwise."""
    from .train import train

    path = runs_dir(root) / config.key
    if path.is_dir():
        try:
            run = load_run(config, root)
            log.info("loaded cached run %s (%s)", config.key, config.label)
            return run
        except DamagedRunError as err:
            quarantine(path, str(err))
    train(config, root, progress=progress)
    return load_run(config, root)
