"""Writing files atomically with the user's umask, and weights-only loading with errors that name the file.

Every file this library writes for a user (MGG checkpoints, source statistics, per-corruption
results, reports) goes through :func:`atomic_write`: a temporary file in the same folder, then
a rename, so a reader never sees half a file. ``mkstemp`` creates its file with mode 0600; the
final file gets ``0666 & ~umask`` instead, like any file the user's shell would create.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX has no read-only call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it over ``path``.

    Parent folders are created. On any error the temporary file is removed and ``path`` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_weights(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing or unreadable file is an error naming ``path``.

    ``FileNotFoundError`` when there is no file, ``ValueError`` when it is not a weights-only torch
    file (corrupt, truncated, or holding pickled objects). Torch's warning about the pickle
    protocol of a raw pickle is silenced: the error that follows says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt / truncated / not a torch file / pickled objects
        raise ValueError(
            f"{path} is not a readable {what} (corrupt, truncated, or not a weights-only torch file: "
            f"the weights-only load failed with {type(exc).__name__})"
        ) from exc


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (manifests of cached data and shipped models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
