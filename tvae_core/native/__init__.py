"""Compiled CPU kernels, built once on first use with the machine's C++ compiler.

:func:`lm_head_nll` is the LM head's per-row negative log-likelihood for gradient-free
evaluation of a bias-free head whose vocabulary matmul runs in bfloat16 (the default profile's
evaluation of the scratch decoders; the pretrained study evaluates in float32 and keeps the torch
path), the inner loop of the importance-weighted log-likelihood:

    nll_m = log( sum_{v != t_m} exp(l_mv) + exp(x_m) ) - x_m,   l_m = W h_m (bfloat16 matmul)

with x_m = w_{t_m} . h_m the target's logit computed exactly in float32, as in
:mod:`tvae_core.lm_head`. The torch path takes a float32 log-softmax of each ``[rows, V]``
block: several passes over the block (convert, max, exponentials, output) with libm-accurate
exponentials; with the conversions it was 46% of an IW evaluation's time, the matmul 28% (torch
profiler, one thread). Here the block's logits come out of the matmul transposed (``[V, rows]``)
so that 16 rows (8 with AVX2) are one vector of floats, and one sweep over the vocabulary takes
the max and the sum of exponentials vertically, in L1-sized chunks (online log-sum-exp), with a
degree-5 polynomial exponential (relative error 2.0e-7). Against float64 on the same bfloat16
logits it is off by at most ~2e-6 nats per row with no bias, as close as the torch path (tested);
``benchmarks/bench_core.py`` measures the speed-up side by side.

The kernel is compiled with ``torch.utils.cpp_extension`` (g++/clang and ninja; ~20 s once,
cached in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; concurrent processes
wait for one build) for this machine's CPU (``-march=native``), on x86-64 CPUs with AVX2 or
AVX-512 (``FASTER_ON``). Elsewhere, where it cannot be built (no compiler; a warning says why), or
with ``TVAE_CORE_NATIVE=0``, :func:`available` is False and :mod:`tvae_core.lm_head` keeps the
torch path.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("lm_head_nll.cpp")
DISABLE_VARIABLE = "TVAE_CORE_NATIVE"
# x86-64 vector extensions where the kernel beats the torch path (per row, one thread, measured on
# this AVX-512 CPU with builds for each: AVX-512 4.8-5.0 us, AVX2 6.9 us, torch path 8.1 us; an
# SSE2-only build took 14.9 us, and no ARM machine was available to measure NEON)
FASTER_ON = ("AVX512", "AVX2")
_enabled = True  # switched off by `disabled()` (benchmarks and tests compare both paths)
_build_lock = threading.Lock()  # the IW evaluation's worker threads may be the first callers


def _module():
    with _build_lock:
        return _load_module()


def _required_module():
    """The built kernels, or RuntimeError for the callers that have no torch path to fall back on."""
    module = _module()
    if module is None:
        raise RuntimeError("tvae_core.native is not available (see the warning when it was loaded, "
                           f"or {DISABLE_VARIABLE}=0)")
    return module


def _not_attempted_because() -> str | None:
    """Why no kernel is built in this process (None: it is, or was tried)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return f"{DISABLE_VARIABLE}=0"
    if platform.system() == "Windows" or capability not in FASTER_ON:  # the flags below are gcc/clang's
        return f"no kernel for {platform.system()} {platform.machine()} {capability}"
    return None


@functools.cache
def _load_module():
    if _not_attempted_because() is not None:
        return None
    from torch.utils.cpp_extension import load

    # the build is for this CPU, this Python and this torch (an extension module is tied to both
    # ABIs: a build of another Python fails to import and falls back to the torch path) and this
    # source: its name says which, so checkouts and environments sharing a home directory each keep
    # their own build instead of loading or rebuilding over each other's
    digest = hashlib.sha256(f"{_SOURCE.read_text()}|{sys.implementation.cache_tag}|{torch.__version__}"
                            .encode()).hexdigest()[:8]
    name = f"tvae_lm_head_nll_{platform.machine()}_{torch.backends.cpu.get_cpu_capability()}_{digest}".lower()
    build_directory = _extensions_directory() / name
    try:
        build_directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(build_directory / "lock")
        return load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-march=native"],
                    build_directory=str(build_directory), verbose=False)
    except Exception as error:  # no compiler or ninja, or a failed build: the torch path stays
        warnings.warn(f"tvae_core.native: the LM-head kernel could not be built ({type(error).__name__}: "
                      f"{str(error).strip()[:300]}); using the torch path (slower, the same numbers to "
                      f"~2e-6 nats per token)", RuntimeWarning, stacklevel=3)
        return None


def _extensions_directory() -> Path:
    """torch's own default: ``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


def _remove_stale_lock(lock: Path, max_age_seconds: float = 600.0) -> None:
    """torch waits for ever on the lock file of a build that was killed (Ctrl-C in a notebook);
    a build takes ~20 s, so a lock older than ``max_age_seconds`` is a dead build's."""
    try:
        if time.time() - lock.stat().st_mtime > max_age_seconds:
            lock.unlink()
    except FileNotFoundError:
        pass


def available() -> bool:
    """Whether the compiled kernels are used (built now if needed): False where they cannot be
    built, with ``TVAE_CORE_NATIVE=0``, and inside :func:`disabled`."""
    return _enabled and _module() is not None


def describe() -> str:
    """Which path gradient-free bfloat16 evaluation takes for the LM head in this process, and
    why, for provenance records (the two paths differ by ~2e-6 nats per token)."""
    if not _enabled:
        return "torch path (tvae_core.native.disabled)"
    reason = _not_attempted_because()
    if reason is not None:
        return f"torch path ({reason})"
    if _module() is None:
        return "torch path (the kernel could not be built)"
    return f"compiled kernel (tvae_core.native, {platform.machine()} {torch.backends.cpu.get_cpu_capability()} build)"


@contextlib.contextmanager
def disabled():
    """Within this block the torch paths are used (process-wide, not thread-local)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def lm_head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                target_logits: torch.Tensor) -> torch.Tensor:
    """Per-row NLL ``[M]`` (float32) of the bias-free head ``weight`` [V, H] (bfloat16) on ``hidden``
    [M, H] (bfloat16), with ``targets`` [M] (int64) and their exact logits ``target_logits`` [M]
    (float32). Blocks of 64 rows run in parallel on torch's intra-op threads. Raises if
    :func:`available` is False."""
    module = _required_module()
    return module.lm_head_nll(hidden, weight, targets, target_logits)


def lm_head_nll_keeping_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               target_logits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`lm_head_nll` (same arguments, same values) and each block's bfloat16 logits
    ``[V, 64]`` (``[V, 32]`` with AVX2), the matmul's own output, for
    :func:`lm_head_nll_backward`: the training head's forward pass, so that its backward pass
    does not compute the same matmul again. Holds ``2 V`` bytes per row until then."""
    module = _required_module()
    nll, *logits = module.lm_head_nll_blocks(hidden, weight, targets, target_logits, True)
    return nll, logits


def lm_head_nll_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         target_logits: torch.Tensor, lse: torch.Tensor,
                         grad_nll: torch.Tensor, logits: list[torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d/dhidden [M, H], d/dweight [V, H])``, float32, of ``sum_m grad_nll_m nll_m`` for
    the head of :func:`lm_head_nll` (same arguments), given each row's log-sum-exp ``lse`` [M]
    (float32; ``nll + target_logits``) from the forward pass. Per block of rows: the logits
    recomputed (bfloat16 matmul), ``(softmax - onehot) * grad_nll`` in one sweep with the same
    exponential as :func:`lm_head_nll`, rounded to bfloat16 for the two gradient matmuls; the
    weight gradient summed over blocks in float32, as :mod:`tvae_core.lm_head`'s torch path does.
    ``logits``: the blocks kept by :func:`lm_head_nll_keeping_logits` for these same arguments,
    used instead of recomputing them (the same numbers) and **overwritten** with the gradient.
    Raises if :func:`available` is False."""
    module = _required_module()
    grad_hidden, grad_weight = module.lm_head_nll_backward(hidden, weight, targets, target_logits, lse,
                                                           grad_nll.float(), logits or [])
    return grad_hidden, grad_weight
