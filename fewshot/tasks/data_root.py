"""Where datasets live: ``--data-root``, else ``$FEWSHOT_DATA``, else the platform's per-user data folder.

Caches (decoded arrays) go to ``$FEWSHOT_CACHE``, else the platform's per-user
cache folder: the data folder may be read-only or shared.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


class DataError(FileNotFoundError):
    """A dataset file is missing or corrupt; the message says which, where, and how to get it."""


def _platform_dir(kind: str) -> Path:
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local")) / "fewshot" / ("Cache" if kind == "cache" else "Data")
    if sys.platform == "darwin":
        return home / "Library" / ("Caches" if kind == "cache" else "Application Support") / "fewshot"
    xdg = os.environ.get("XDG_CACHE_HOME" if kind == "cache" else "XDG_DATA_HOME")
    return Path(xdg) / "fewshot" if xdg else home / (".cache" if kind == "cache" else ".local/share") / "fewshot"


def _resolve(explicit, variable: str, kind: str) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(variable):
        return Path(os.environ[variable])
    return _platform_dir(kind)


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit argument, else ``$FEWSHOT_DATA``, else the per-user data folder."""
    return _resolve(explicit, "FEWSHOT_DATA", "data")


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """The cache folder: the explicit argument, else ``$FEWSHOT_CACHE``, else the per-user cache folder."""
    return _resolve(explicit, "FEWSHOT_CACHE", "cache")


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def require_file(path: Path, how_to_get: str, expected_sha256: str | None = None) -> Path:
    """``path`` if it exists (and matches its checksum), else one clear DataError."""
    if not path.is_file():
        raise DataError(
            f"missing dataset file {path.name}: looked for {path} (data root from --data-root, $FEWSHOT_DATA or "
            f"{_platform_dir('data')}). {how_to_get}"
        )
    if expected_sha256 is not None:
        actual = sha256(path)
        if actual != expected_sha256:
            raise DataError(
                f"corrupt dataset file {path}: sha256 {actual}, expected {expected_sha256}. Replace it. {how_to_get}"
            )
    return path
