"""Keep freed memory in the process: glibc's ``malloc`` otherwise hands it back to the kernel at
every ``free`` and the next training step faults the same pages in again.

glibc serves each block of 128 KiB or more with its own ``mmap`` and trims the heap's free top
above 128 KiB. Its dynamic threshold only rises to a block's size once such a block is freed, so a
process whose largest blocks come and go every step keeps paying: a default VAE training step (one
thread, batch 32, then with a 2-layer encoder) took 6,900-11,200 minor page faults (27-44 MiB
faulted in again) and 65-72 ms; with the thresholds below ~1 fault and 49-53 ms; the LM's step
50-56 ms -> 35-36 ms (fresh processes, alternated; the losses bit-identical;
``benchmarks/bench_train_process.py``). PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc
(``LD_PRELOAD``) for the same reason; ``mallopt`` needs no extra library.

Importing :mod:`tvae_core` changes nothing: the entry points that want the setting apply it. The
command line (``tvae``, hence every ``train-all`` worker) calls :func:`keep_freed_memory` first;
the book's executor hands the notebook kernels it starts :func:`child_environment`, the same
thresholds as glibc's start-up variables. A process of your own calls :func:`keep_freed_memory`.
``TVAE_CORE_MALLOPT=0`` turns both off. Only glibc (Linux) has these knobs; elsewhere they do
nothing. The cost: up to :data:`TRIM_THRESHOLD` of freed memory stays mapped, memory the process
had in use at its peak anyway.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): smaller blocks come from
# the heap (the default LM head's 64-row logit blocks are 2.5 MiB, the 49k-word head's 12.5 MiB)
MMAP_THRESHOLD = 32 * 1024 * 1024
# freed memory at the heap's top kept up to this size instead of being returned to the kernel
TRIM_THRESHOLD = 1024 * 1024 * 1024


def _wanted() -> bool:
    """glibc, and not switched off with ``TVAE_CORE_MALLOPT=0``."""
    if os.environ.get("TVAE_CORE_MALLOPT", "1") == "0":
        return False
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def child_environment() -> dict[str, str]:
    """The thresholds as the environment variables glibc reads when a process starts (the
    aliases of its ``glibc.malloc.mmap_threshold``/``trim_threshold`` tunables), for processes
    this one starts, e.g. notebook kernels; empty where :func:`keep_freed_memory` would do nothing."""
    if not _wanted():
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds in this process (once). True if they were set; False
    without glibc or with ``TVAE_CORE_MALLOPT=0``."""
    if not _wanted():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 for a value glibc rejects
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
