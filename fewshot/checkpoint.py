"""Atomic files and safe checkpoints.

Files are written to a temporary name in the same folder, fsynced, then renamed
over the target, so a crash leaves either the old file or the new one. A run
directory may come from someone else: checkpoints are loaded with
``weights_only=True`` (tensors and plain containers only, no pickled code).
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path

import torch

from fewshot.config import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process's umask: read from /proc where Linux has it (setting it, even back, races with other
    threads creating files), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files that writes of ``path`` left when their process was killed mid-write."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or is not one of fewshot's: the message names the file (bad input,
    exit status 2 at the command line, as every ConfigError)."""


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict:
    """The checkpoint at ``path``, tensors and plain containers only; ``CheckpointError`` if it cannot be read
    that way or lacks one of the ``required`` keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # truncated, corrupt, or holding more than tensors (refused by weights_only)
        if isinstance(e, pickle.UnpicklingError):  # torch's text suggests weights_only=False: unsafe here
            reason = "corrupt, or holding objects other than tensors, which are not loaded from a shared run directory"
        else:
            reason = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else "unreadable"
        raise CheckpointError(f"{path}: not a readable fewshot checkpoint ({type(e).__name__}: {reason})") from None
    missing = [key for key in required if not (isinstance(state, dict) and key in state)]
    if missing:
        raise CheckpointError(f"{path}: not a fewshot checkpoint of this kind (no {', '.join(missing)})")
    return state
