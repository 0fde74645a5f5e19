"""The demo's trained models, shipped with the package: source models and meta-trained MGGs.

Training the small source models from scratch gave different models (and demo numbers moving by
up to 18 points) on different CPUs; shipping them makes the demo's numbers depend on evaluation
alone. The files sit in ``assets/`` beside this module with ``manifest.json``: per file its
sha256, size and what it is, and for the whole set the command that made them, the versions and
the machine. ``python -m mgg_fast assets --out DIR`` makes them again (:mod:`.make_assets`).

A file is found by a name that holds the key of everything that decided its content (the source
model's recipe; the MGG's source model, recipe, loss, sizes and learning rate), so a run whose
configuration differs from the shipped one trains (and caches) its own instead. A file whose
sha256 does not match the manifest is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mgg_fast.core.files import atomic_write, sha256_file

ASSETS = Path(__file__).parent / "assets"
MANIFEST = "manifest.json"
FORMAT = "mgg_fast.bundled_assets/v1"


def key_of(fields: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def source_name(arch: str, key: str) -> str:
    """The file name of a source model (``key``: its ``SourceConfig.key()``)."""
    return f"source-{arch}-{key}.pt"


def mgg_name(arch: str, key: str) -> str:
    """The file name of a meta-trained MGG (``key``: :func:`key_of` its description)."""
    return f"mgg-{arch}-{key}.pt"


def read_manifest(folder: str | os.PathLike = ASSETS) -> dict[str, Any]:
    """The manifest of ``folder`` (an empty one when there is none)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"format": FORMAT, "files": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    return manifest


def find(name: str, folder: str | os.PathLike = ASSETS) -> Path | None:
    """The shipped file ``name`` if the manifest lists it and its sha256 matches; else ``None``."""
    entry = read_manifest(folder)["files"].get(name)
    path = Path(folder) / name
    if entry is None or not path.is_file() or sha256_file(path) != entry["sha256"]:
        return None
    return path


def entry(name: str, folder: str | os.PathLike = ASSETS) -> dict[str, Any]:
    """What the manifest says of ``name``."""
    return read_manifest(folder)["files"][name]


def write_manifest(folder: str | os.PathLike, files: dict[str, dict[str, Any]], made: dict[str, Any]) -> Path:
    """Write ``manifest.json`` in ``folder``: ``files`` (name → what it is, with ``made``: the
    command, versions and machine that made it) beside the entries already there whose files are
    still present, each with its sha256 and size."""
    folder = Path(folder)
    kept = {
        n: e for n, e in read_manifest(folder)["files"].items() if (folder / n).is_file() and n not in files
    }
    listed = {
        name: {**what, "sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name, what in sorted({**kept, **{n: {**w, **made} for n, w in files.items()}}.items())
    }
    path = folder / MANIFEST
    text = json.dumps({"format": FORMAT, "files": listed}, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))
    return path
