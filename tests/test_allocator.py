"""tvae_core.allocator: importing tvae_core keeps freed memory in the process (glibc), so a step
that frees its working set does not fault the same pages in again."""
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt's thresholds are glibc's")

# 16 blocks of 1 MiB allocated and freed together per step, as a training step's activations are
_STEPS = """
import resource, torch, tvae_core
from tvae_core.allocator import keep_freed_memory

def step():
    blocks = [torch.ones(1 << 18) for _ in range(16)]
    del blocks

step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(keep_freed_memory(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_step(**env) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _STEPS], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[-2], float(out[-1])


@glibc
def test_import_keeps_freed_memory_and_the_switch_turns_it_off():
    applied, faults = _faults_per_step()
    assert applied == "True"
    assert faults < 256  # measured ~13 per step
    applied, faults = _faults_per_step(TVAE_CORE_MALLOPT="0")
    assert applied == "False"
    assert faults > 2048  # glibc's defaults: the 16 MiB faulted in again, ~4,100 pages per step
