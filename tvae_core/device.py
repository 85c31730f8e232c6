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
