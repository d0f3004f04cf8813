"""Where a run computes: ``--device cpu | cuda | cuda:N | auto``.

The device is a property of the machine, not of the experiment: it is not part of a
run's config, and a run started on one device resumes on another. Tasks are always
sampled on the CPU (so the task stream is the same everywhere) and moved to the device
batch by batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_GLIBC_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # on 64-bit; larger values are refused


def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc reuse freed memory for large CPU tensors instead of returning it to the OS.

    With glibc's defaults a tensor of a few MB is mapped fresh from the kernel and unmapped
    when freed, so the next one pays a page fault per 4 KiB on first write: a ReLU of a 15 MB
    tensor into a fresh output took 2-20 ms here, into reused memory 1.3 ms (BENCHMARKS.md,
    "Omniglot speed"). This serves blocks up to 32 MiB from the heap and never trims it, with
    64 MiB of slack; the process keeps its peak memory instead of giving it back between
    meta-batches. Process-wide, so ``fewshot train`` and ``fewshot eval`` call it on the CPU and
    the library never does on its own. Returns False (and changes nothing) where libc is not
    glibc. The same can be had before Python starts with ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=...`` in the environment.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, TypeError, AttributeError):  # no libc found, or a libc without mallopt (musl, macOS)
        return False
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, 2**40),
            (_M_TOP_PAD, 64 * 1024 * 1024),
        )
    )
