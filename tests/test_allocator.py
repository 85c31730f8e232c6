"""tvae_core.allocator: the entry points keep freed memory in the process (glibc), so a step that
frees its working set does not fault the same pages in again; importing tvae_core changes nothing."""
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt's thresholds are glibc's")

# a step's working set, 64 blocks of 1 MiB from glibc's malloc (as torch's CPU allocator takes
# them), written and freed together: with glibc's defaults the freed top of the heap is trimmed
# and all 16,384 pages fault in again at the next step (measured 16,352 in 6 of 6 processes)
_STEPS = """
import ctypes, os, resource, sys, tvae_core
from tvae_core.allocator import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "apply" else None

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 1 << 20

def step():
    blocks = [libc.malloc(SIZE) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)
    for block in reversed(blocks):
        libc.free(block)

step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(action: str, **env) -> tuple[str, float]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _STEPS, action], env={**environment, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[-2], float(out[-1])


@glibc
def test_the_entry_points_setting_keeps_freed_memory_and_the_switch_turns_it_off():
    applied, faults = _faults_per_step("apply", TVAE_CORE_MALLOPT="1")
    assert applied == "True"
    assert faults < 256  # measured 0 per step
    applied, faults = _faults_per_step("apply", TVAE_CORE_MALLOPT="0")
    assert applied == "False"
    assert faults > 8192  # glibc's defaults: the 64 MiB faulted in again


@glibc
def test_importing_tvae_core_changes_nothing_and_child_processes_get_the_setting_from_their_environment():
    from tvae_core.allocator import child_environment

    _, faults = _faults_per_step("import only")
    assert faults > 8192   # glibc's defaults
    _, faults = _faults_per_step("import only", **child_environment())
    assert child_environment() and faults < 256   # what the book's notebook kernels start with
    assert _faults_per_step("import only", TVAE_CORE_MALLOPT="0")[1] > 8192


def test_the_command_line_and_the_book_executor_apply_it():
    import inspect

    from tvae_core import book, cli

    assert "keep_freed_memory()" in inspect.getsource(cli.main)
    assert "child_environment()" in inspect.getsource(book.execute_all)
