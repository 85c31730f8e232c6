"""Checksummed cache entries: publish atomically, verify before use, set aside when damaged.

Every cache entry (a run folder, a training checkpoint, a tokenised corpus, an evaluation JSON,
a posterior file) is published with the key it belongs to and the SHA-256 of its content:

* a folder gets a ``manifest.json`` (``{"key", "files": {relative path: sha256}}``), written into
  a per-process staging folder ``<name>.tmp-<pid>-<random>`` that is then renamed into place, so a
  reader sees a whole entry or none, and two processes never share a staging folder;
* a JSON file is ``{"key", "sha256", "payload"}``, the hash taken over the canonical JSON of key
  and payload (:func:`write_checked_json`).

:func:`verify_dir` / :func:`read_checked_json` raise :class:`DamagedCacheError` naming the file on
any mismatch; callers then :func:`set_aside` the entry (one warning naming it, renamed to
``<name>.damaged-<n>`` for inspection, never loaded again) and rebuild it. Staging folders left by
killed processes are removed by :func:`remove_dead_leftovers` (the pid in the name is not alive).

The bottom of the import graph: standard library only (torch is imported inside the functions
that check tensors), so :mod:`tvae_core.config` can use :func:`source_fingerprint` for run keys.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TMP_RE = re.compile(r"\.tmp-(\d+)(?:-[0-9a-f]+)?$")


class DamagedCacheError(RuntimeError):
    """A cache entry failed verification; the message names the file and says why."""


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(payload) -> str:
    """The JSON text hashed for keys and checksums: sorted keys, no whitespace; NaN/inf refused
    (``allow_nan=False``) so a non-finite number can never be part of a published entry."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def source_fingerprint(paths, root: str | Path | None = None) -> dict[str, str]:
    """SHA-256 per source file of what the code *does*: a ``.py`` file is parsed and its AST
    dumped without docstrings, so comments, docstrings and formatting do not count and any change
    of a statement, expression or default does; other files (C++ sources) are hashed as bytes.
    The AST dump is stable for one Python minor version (the project pins 3.11). Files are named
    by their path relative to ``root`` (so ``model.py`` and ``pretrained/model.py`` stay two
    entries), or by their file name without it."""
    out = {}
    for path in paths:
        path = Path(path)
        name = path.relative_to(root).as_posix() if root is not None else path.name
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".py":
            text = ast.dump(_strip_docstrings(ast.parse(text)), include_attributes=False)
        out[name] = hashlib.sha256(text.encode()).hexdigest()
    return out


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


# --------------------------------------------------------------------------------------------
# Staging, leftovers, setting aside
# --------------------------------------------------------------------------------------------
def staging_path(final: Path) -> Path:
    """A staging name of this process only: ``<name>.tmp-<pid>-<random>``."""
    return final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_dead_leftovers(folder: Path, prefix: str = "") -> list[Path]:
    """Remove staging entries ``<prefix>*.tmp-<pid>[-<random>]`` in ``folder`` whose process is
    gone (killed during a write); a live process's staging folder is left alone."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TMP_RE.search(entry.name)
        if not match or not entry.name.startswith(prefix) or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    if removed:
        log.info("removed %d leftover staging entries of killed processes in %s", len(removed), folder)
    return removed


def set_aside(path: Path, reason: str) -> Path | None:
    """Move a damaged entry to ``<name>.damaged-<n>`` (kept for inspection, never loaded) with one
    warning naming it; returns the new path (None if it vanished meanwhile)."""
    n = 0
    while (target := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    log.warning("cache entry %s is damaged: %s; set aside as %s and rebuilt", path, reason, target.name)
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process set it aside first
        return None
    return target


# --------------------------------------------------------------------------------------------
# Folders with a manifest
# --------------------------------------------------------------------------------------------
def write_manifest(folder: Path, key: str) -> dict:
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"key": key, "files": files}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def publish_dir(staging: Path, final: Path, key: str) -> bool:
    """Checksum every file of ``staging`` into its manifest and rename it to ``final`` (atomic).
    Returns False (and removes ``staging``) if another process published ``final`` first."""
    write_manifest(staging, key)
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True


def verify_dir(folder: Path, key: str, required: tuple[str, ...] = ()) -> dict:
    """The manifest of ``folder`` after checking its key and every file's checksum; raises
    :class:`DamagedCacheError` naming the first file that does not match."""
    path = folder / MANIFEST
    manifest = _read_keyed_json(path, key)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise DamagedCacheError(f"{path}: unreadable (TypeError: 'files' is not a mapping)")
    missing = [name for name in required if name not in files]
    if missing:
        raise DamagedCacheError(f"{path}: lists no {missing}")
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise DamagedCacheError(f"{file}: missing")
        if sha256_file(file) != expected:
            raise DamagedCacheError(f"{file}: checksum mismatch (content changed after publishing)")
    return manifest


# --------------------------------------------------------------------------------------------
# Single JSON files
# --------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, payload) -> None:
    tmp = staging_path(path)
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float, allow_nan=False))
    os.replace(tmp, path)


def _json_checksum(key: str, payload) -> str:
    return hashlib.sha256(canonical_json({"key": key, "payload": payload}).encode()).hexdigest()


def write_checked_json(path: Path, payload, key: str) -> None:
    """``payload`` published with its key and checksum (refuses NaN/inf: ValueError)."""
    write_json_atomic(path, {"key": key, "sha256": _json_checksum(key, payload), "payload": payload})


def _read_keyed_json(path: Path, key: str) -> dict:
    """A JSON object with a ``key`` field equal to ``key``; :class:`DamagedCacheError` otherwise."""
    try:
        stored = json.loads(path.read_text())
        stored_key = stored["key"]
    except FileNotFoundError:
        raise DamagedCacheError(f"{path}: missing") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise DamagedCacheError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if stored_key != key:
        raise DamagedCacheError(f"{path}: belongs to key {stored_key!r}, not {key!r}")
    return stored


def read_checked_json(path: Path, key: str):
    stored = _read_keyed_json(path, key)
    try:
        checksum, payload = stored["sha256"], stored["payload"]
    except KeyError as err:
        raise DamagedCacheError(f"{path}: unreadable (KeyError: {err})") from None
    try:
        ok = _json_checksum(key, payload) == checksum
    except ValueError:  # NaN/inf in the payload
        ok = False
    if not ok:
        raise DamagedCacheError(f"{path}: checksum mismatch (content changed after publishing)")
    return payload


# --------------------------------------------------------------------------------------------
# Content checks shared by the publishers and loaders
# --------------------------------------------------------------------------------------------
def non_finite_numbers(values: dict) -> list[str]:
    """Names of the entries of ``values`` that are not finite numbers (bools and ints count as
    numbers; lists are checked element-wise)."""
    bad = []
    for name, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, bool):
                continue
            if not isinstance(item, (int, float)) or not math.isfinite(item):
                bad.append(name)
                break
    return bad


def non_finite_tensors(tensors: dict) -> list[str]:
    import torch

    return [name for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]
