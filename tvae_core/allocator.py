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

:func:`keep_freed_memory` runs when :mod:`tvae_core` is imported (training and notebook kernels
alike). ``TVAE_CORE_MALLOPT=0`` skips it. Only glibc (Linux) has these knobs; elsewhere it does
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


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process). True if they were set; False
    without glibc or with ``TVAE_CORE_MALLOPT=0``."""
    if os.environ.get("TVAE_CORE_MALLOPT", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 for a value glibc rejects
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
