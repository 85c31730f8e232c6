"""The run cache: ``data/runs/<key>/`` holds one finished run, named by its key
(:attr:`tvae_core.config.RunConfig.key`: config, corpus content and training code).

A finished run directory contains ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``history.json`` (training and validation curves), ``metrics.json`` (final validation metrics),
``meta.json`` (format version, package versions, thread count, code hashes, wall time) and
``manifest.json`` (the key and every file's SHA-256, :mod:`tvae_core.cache`). It is built in a
per-process staging directory and renamed into place (atomic), so a reader never sees half a run.
Loading verifies the manifest and then every file's content (parsable, finite, the right config);
an entry that fails in any way is set aside as ``<key>.damaged-<n>`` with one warning naming the
file, and retrained, never loaded. One process at a time trains or loads a key (a file lock), so
two identical commands train once; staging folders of killed processes are removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .build import build_model, load_vocabulary
from .cache import (DamagedCacheError, non_finite_numbers, non_finite_tensors, publish_dir, remove_dead_leftovers,
                    set_aside, staging_path, verify_dir)
from .config import CACHE_FORMAT_VERSION, RunConfig
from .data import default_data_dir
from .device import resolve_device
from .train import train

log = logging.getLogger(__name__)

# TVAE_RUNS_DIR, else the checkout's data/runs, else the user's cache (data.default_data_dir)
DEFAULT_RUNS_DIR = Path(os.environ.get("TVAE_RUNS_DIR", default_data_dir() / "runs"))
RUN_FILES = ("config.json", "model.safetensors", "tokenizer.json", "history.json", "metrics.json", "meta.json")


class DamagedRunError(DamagedCacheError):
    """A cached run failed validation; the message names the file and says why."""


def runs_dir(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else DEFAULT_RUNS_DIR


def _read_json(path: Path, kind: type):
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedRunError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(value, kind):
        raise DamagedRunError(f"{path}: holds a {type(value).__name__}, not a {kind.__name__}")
    return value


def validate_run_dir(path: Path, config: RunConfig) -> dict:
    """Raise :class:`DamagedRunError` unless ``path`` is a complete, unaltered run of ``config``;
    returns its manifest. Checks: the manifest's key and checksums, then the content itself
    (config hash, format version, finite metrics), so that a run published by older code or
    edited together with its manifest is refused too."""
    if path.name != config.key:
        raise DamagedRunError(f"{path}: folder name does not match the requested key {config.key}")
    try:
        manifest = verify_dir(path, config.key, RUN_FILES)
    except DamagedCacheError as err:
        raise DamagedRunError(str(err)) from None
    meta = _read_json(path / "meta.json", dict)
    stored = _read_json(path / "config.json", dict)
    history = _read_json(path / "history.json", dict)
    metrics = _read_json(path / "metrics.json", dict)
    if meta.get("cache_format_version") != CACHE_FORMAT_VERSION:
        raise DamagedRunError(f"{path / 'meta.json'}: cache format version {meta.get('cache_format_version')} != "
                              f"{CACHE_FORMAT_VERSION}")
    try:
        stored_key = RunConfig.from_dict(stored).key
    except (TypeError, ValueError, KeyError) as err:
        raise DamagedRunError(f"{path / 'config.json'}: does not describe a valid run ({err})") from None
    if stored_key != config.key:
        raise DamagedRunError(f"{path / 'config.json'}: config hash {stored_key} does not match the requested "
                              f"{config.key}")
    if not isinstance(history.get("train"), list) or not isinstance(history.get("valid"), list):
        raise DamagedRunError(f"{path / 'history.json'}: lacks the 'train' and 'valid' curves")
    bad = non_finite_numbers(metrics)
    if bad or not metrics:
        raise DamagedRunError(f"{path / 'metrics.json'}: non-finite or missing values {bad or 'all'}")
    return manifest


def quarantine(path: Path, reason: str) -> Path | None:
    """Move a damaged entry aside (kept for inspection, never loaded) and log why."""
    return set_aside(path, reason)


def publish_run_dir(staging: Path, final: Path, key: str) -> None:
    """Checksum and atomically publish a completed staging directory as the run ``final``; if
    another process finished the same run first, theirs is kept (it is equally valid)."""
    publish_dir(staging, final, key)


def remove_leftovers(config: RunConfig, root: str | Path | None = None) -> None:
    """Staging folders of killed processes for this key (its final folder, its checkpoints),
    and the checkpoints of a run that was published but not cleaned up."""
    root_dir = runs_dir(root)
    remove_dead_leftovers(root_dir, f"{config.key}.")
    partial = root_dir / f"{config.key}.partial"
    remove_dead_leftovers(partial)
    if partial.is_dir() and (root_dir / config.key / "manifest.json").is_file():
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def run_lock(config: RunConfig, root: str | Path | None = None):
    """Hold the key's lock file (``<root>/_locks/<key>.lock``; released by the OS if the process
    dies). Under ``torchrun`` only rank 0 takes it: the other ranks follow rank 0's training."""
    if not _is_main_process():
        yield
        return
    folder = runs_dir(root) / "_locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{config.key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("run %s is being trained by another process; waiting for it", config.key)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_valid_run(config: RunConfig, root: str | Path | None = None) -> bool:
    """Whether a complete, unaltered run of ``config`` is cached (checksums; the model not loaded)."""
    path = runs_dir(root) / config.key
    if not path.is_dir():
        return False
    try:
        validate_run_dir(path, config)
    except DamagedRunError:
        return False
    return True


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
    manifest: dict = field(default_factory=dict)   # key and SHA-256 of every file (tvae_core.cache)

    @property
    def weights_sha256(self) -> str | None:
        return self.manifest.get("files", {}).get("model.safetensors")

    @property
    def label(self) -> str:
        return self.config.label or self.config.objective.name


def load_run(config: RunConfig, root: str | Path | None = None, device: str | None = None) -> Run:
    """Load a finished run onto ``device`` (None: :func:`tvae_core.device.resolve_device`, the GPU
    when there is one); raises :class:`DamagedRunError` (or FileNotFoundError) otherwise."""
    path = runs_dir(root) / config.key
    if not path.is_dir():
        raise FileNotFoundError(f"no finished run for {config.label or config.key} in {path.parent}")
    manifest = validate_run_dir(path, config)
    try:
        run = _load_verified_run(config, path, manifest)
    except DamagedRunError:
        raise
    except Exception as err:  # any load failure of a checksummed entry: refuse it, never crash on it
        raise DamagedRunError(f"{path}: cannot be loaded ({type(err).__name__}: {err})") from None
    run.model.to(resolve_device(device))
    return run


def _load_verified_run(config: RunConfig, path: Path, manifest: dict) -> Run:
    from safetensors.torch import load_model

    try:
        vocab = load_vocabulary(config, path / "tokenizer.json")
    except Exception as err:
        raise DamagedRunError(f"{path / 'tokenizer.json'}: unreadable ({type(err).__name__}: {err})") from None
    model = build_model(config, vocab)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device="cpu")
    except Exception as err:
        raise DamagedRunError(f"{path / 'model.safetensors'}: does not fit the model "
                              f"({type(err).__name__}: {err})") from None
    bad = non_finite_tensors(dict(model.named_parameters()))
    if bad:
        raise DamagedRunError(f"{path / 'model.safetensors'}: non-finite weights in {bad[:3]}")
    model.eval()
    history = json.loads((path / "history.json").read_text())
    metrics = json.loads((path / "metrics.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    return Run(config, path, model, vocab, history, metrics, meta, manifest)


def export_pretrained(run: Run, directory: str | Path | None = None) -> Path:
    """Save ``run``'s model in the Hugging Face layout (:meth:`~tvae_core.model.TransformerVAE.save_pretrained`)
    with its tokenizer, by default into ``<run folder>/pretrained/`` next to the cached run;
    ``TransformerVAE.from_pretrained`` loads it back. Returns the folder."""
    target = Path(directory) if directory is not None else run.path / "pretrained"
    run.model.save_pretrained(target)
    run.vocab.save(target / "tokenizer.json")
    return target


def train_or_load(config: RunConfig, root: str | Path | None = None, *, progress: bool = True,
                  device: str | None = None, snapshots: tuple[RunConfig, ...] = ()) -> Run:
    """The finished run for ``config``: loaded from the cache (onto ``device``, see
    :func:`load_run`) if a valid entry exists, trained (resuming from its newest complete
    checkpoint, if any) and published otherwise. A damaged entry is set aside with one warning
    and retrained. ``snapshots``: shorter runs of ``config`` (:func:`tvae_core.train.is_prefix_of`)
    that training it publishes on the way, those not cached yet; loading it trains none."""
    path = runs_dir(root) / config.key
    with run_lock(config, root):
        remove_leftovers(config, root)
        if path.is_dir():
            try:
                run = load_run(config, root, device)
                log.info("loaded cached run %s (%s)", config.key, config.label)
                return run
            except DamagedRunError as err:
                quarantine(path, str(err))
        wanted = tuple(s for s in snapshots if not is_valid_run(s, root))
        train_into_cache(config, root, progress=progress, snapshots=wanted)
        return load_run(config, root, device)


def train_into_cache(config: RunConfig, root: str | Path | None = None, *, progress: bool = True,
                     snapshots: tuple[RunConfig, ...] = ()) -> Path:
    """Train ``config`` (resuming from ``<root>/<key>.partial/``) into a staging folder of this
    process and publish it as ``<root>/<key>`` (checksummed, atomic); returns the run folder.
    Under ``torchrun`` every rank trains and rank 0 publishes; the others wait for it.
    ``snapshots`` (shorter runs of ``config``) are published the same way, each under its own
    lock, a damaged entry of one set aside first."""
    root_dir = runs_dir(root)
    final, partial = root_dir / config.key, root_dir / f"{config.key}.partial"
    staging = staging_path(final)
    folders = {shorter: staging_path(root_dir / shorter.key) for shorter in snapshots}
    try:
        train(config, staging, partial, progress=progress, snapshots=folders)
        if _is_main_process():
            for shorter, folder in folders.items():
                if folder.is_dir():   # absent when a resumed run had passed its step
                    _publish_snapshot(shorter, folder, root)
            publish_run_dir(staging, final, config.key)
            shutil.rmtree(partial, ignore_errors=True)
            print(f"[tvae] run {config.label or config.key} stored in {final}", flush=True)
    finally:
        for folder in folders.values():   # a failed run publishes no snapshot
            shutil.rmtree(folder, ignore_errors=True)
    _wait_for_main_process()
    return final


def _publish_snapshot(config: RunConfig, folder: Path, root: str | Path | None) -> None:
    final = runs_dir(root) / config.key
    with run_lock(config, root):
        if final.is_dir() and not is_valid_run(config, root):
            quarantine(final, "damaged; replaced by a snapshot of a longer run")
        publish_run_dir(folder, final, config.key)
        print(f"[tvae] run {config.label or config.key} stored in {final} (a snapshot)", flush=True)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _wait_for_main_process() -> None:
    """A barrier across a distributed run's processes (none in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_run_dir(path: str | Path, device: str | None = None) -> Run:
    """The finished run stored in the folder ``path`` (``<runs folder>/<key>/``), onto ``device``
    (see :func:`load_run`), without knowing its config beforehand: the config is read from
    ``path/config.json``, and the folder must be that config's cache entry (named by its key;
    the key covers the corpus content, so the corpus files must be where the config says).
    Raises FileNotFoundError or ValueError naming the path and what is missing, and
    :class:`DamagedRunError` for an entry that fails verification."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder; accepted: a run folder <runs folder>/<key>/ "
                                f"holding {', '.join(RUN_FILES)}")
    config_file = path / "config.json"
    if not config_file.is_file():
        present = sorted(p.name for p in path.iterdir())[:8]
        raise FileNotFoundError(f"{path}: not a run folder, it lacks config.json (a run folder holds "
                                f"{', '.join(RUN_FILES)}; found {present or 'nothing'})")
    stored = _read_json(config_file, dict)
    try:
        config = RunConfig.from_dict(stored)
        key = config.key
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{config_file}: does not describe a valid run ({err})") from None
    if path.name != key:
        # a copied or renamed folder: its name no longer says which run it is (the cache is keyed by name)
        raise ValueError(f"{path}: the folder is named {path.name!r} but its config.json has the key {key!r}; "
                         "a run folder must keep its key as its name, inside a runs folder (a different key also means "
                         "that the corpus or the training code changed since the run was trained)")
    return load_run(config, path.parent, device)
