"""Where a run computes: ``--device cpu | cuda | cuda:N | auto``.

The device is a property of the machine, not of the experiment: it is not part of a
run's config, and a run started on one device resumes on another. Tasks are always
sampled on the CPU (so the task stream is the same everywhere) and moved to the device
batch by batch.
"""

from __future__ import annotations

import ctypes
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


# glibc mallopt parameters (malloc.h); mallopt takes C ints
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEPT_HEAP = (
    (_M_MMAP_THRESHOLD, 32 * 1024 * 1024),  # glibc's largest on 64-bit: blocks up to 32 MiB come from the heap
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # the largest int: the heap is never trimmed
    (_M_TOP_PAD, 64 * 1024 * 1024),  # slack kept on top of the heap when it grows
)


def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc reuse freed memory for large CPU tensors instead of returning it to the OS.

    With glibc's defaults a tensor of a few MB is often mapped fresh from the kernel and
    unmapped when freed, so the next one pays a page fault per 4 KiB on first write: a ReLU of
    a 15 MB tensor into a fresh output took 2-20 ms here, into reused memory 1.3 ms
    (BENCHMARKS.md, "Omniglot speed"). This serves blocks up to 32 MiB from the heap and never
    trims the heap: the process keeps its peak memory instead of giving it back between
    meta-batches. Process-wide, so the commands that train or evaluate call it on the CPU and
    the library never does on its own. Returns False, changing nothing, where libc is not
    glibc. Before Python starts, ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment does the same.
    """
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc's among them
    except (OSError, TypeError):  # Windows
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # musl, macOS, ...
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([libc.mallopt(parameter, value) == 1 for parameter, value in _KEPT_HEAP])  # a list: every one is set
