"""The one device decision, and the helpers that honour it.

:func:`resolve_device` is the only place that picks a device: an explicit argument wins, then
the ``TVAE_DEVICE`` environment variable (``cpu`` reproduces the book's CPU numbers on a GPU
machine), then the first CUDA device if there is one, else the CPU. Training asks it whether to
let Accelerate use the GPU; :func:`tvae_core.runs.load_run` puts a loaded model there. Everything
downstream (validation, evaluation, the estimators, generation) follows the *model's* device
(:func:`module_device`) and moves each batch there (:func:`move_batch`), so a model moved by hand
is evaluated where it is. The mixed membership model (:mod:`tvae_core.mmm`) fits on the CPU: its
data are a few thousand latent samples, kept on the CPU in float64 like every posterior's
parameters.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

DEVICE_ENV = "TVAE_DEVICE"
HEAD_DTYPE_ENV = "TVAE_CPU_HEAD_DTYPE"
HEAD_DTYPES = ("float32", "bfloat16")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86-64 with AVX512-BF16 or AMX,
    which torch's CPU kernels then use). Elsewhere torch converts bfloat16 in software: one
    64 x 64 x 10k block of the LM head took 19.9 ms in bfloat16 and 1.04 ms in float32 on an AVX2
    AMD EPYC (idle, one thread), where an AVX512-BF16 one ran bfloat16 3.9x faster than float32 (benchmarks/README.md).
    No ARM machine was measured, so ARM counts as without."""
    def supported(name: str) -> bool:
        check = getattr(torch.cpu, name, None)   # private probes of torch's own CPU dispatch
        return bool(check()) if callable(check) else False

    return supported("_is_avx512_bf16_supported") or supported("_is_amx_tile_supported")


def cpu_head_dtype() -> str:
    """The LM head's dtype in the CPU profiles (``smoke``, ``default``): ``bfloat16`` where the CPU
    computes it in hardware (:func:`cpu_has_native_bfloat16`), else ``float32``, which is then ~10x
    faster. ``$TVAE_CPU_HEAD_DTYPE`` overrides it (``bfloat16`` trains the very runs of a page
    built on such a CPU, slowly). It is part of every run's config, hence of its key: the two
    dtypes give numbers that differ in the second or third digit, never the same cached run."""
    chosen = os.environ.get(HEAD_DTYPE_ENV) or None
    if chosen is None:
        return "bfloat16" if cpu_has_native_bfloat16() else "float32"
    if chosen not in HEAD_DTYPES:
        raise ValueError(f"{HEAD_DTYPE_ENV}={chosen!r} is not accepted; accepted values: {HEAD_DTYPES} "
                         "(unset: bfloat16 where the CPU has it in hardware, else float32)")
    return chosen


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else ``$TVAE_DEVICE``, else ``cuda`` when available, else ``cpu``."""
    chosen = device if device is not None else (os.environ.get(DEVICE_ENV) or None)
    if chosen is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(chosen)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={chosen!r} is not a torch device; accepted values: 'cpu', 'cuda', "
                         "'cuda:N' (also via the TVAE_DEVICE environment variable)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(chosen)!r} was asked for but no CUDA device is available; "
                         "accepted values here: 'cpu'")
    return chosen


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def move_batch(batch: Mapping[str, torch.Tensor], device: str | torch.device | None) -> dict:
    """A batch dict with every tensor on ``device`` (unchanged for ``None``)."""
    if device is None:
        return dict(batch)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
