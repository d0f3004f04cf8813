"""Where a run computes: ``--device cpu | cuda | cuda:N | auto``.

The device is a property of the machine, not of the experiment: it is not part of a
run's config, and a run started on one device resumes on another. Tasks are always
sampled on the CPU (so the task stream is the same everywhere) and moved to the device
batch by batch.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fewshot.config import ConfigError

ALLOWED = "cpu, cuda, cuda:N, auto"


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a ``torch.device``; "auto" is cuda when one is present; errors name the allowed values.

    Under torchrun, "cuda" means this process's own GPU (``LOCAL_RANK``).
    """
    name = (name or "cpu").strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: allowed: {ALLOWED}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"--device {name!r}: allowed: {ALLOWED}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: no CUDA GPU is available here (torch.cuda.is_available() is False); allowed: cpu, auto")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name!r}: this machine has {torch.cuda.device_count()} GPU(s): allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    torch.cuda.set_device(device)
    return device


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))
