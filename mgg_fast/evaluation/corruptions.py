"""The ImageNet-C corruptions (the ``imagecorruptions`` package of the ``shift`` extra): their
names, the 4 held-out validation ones, and applying one with a fixed seed per image."""

from __future__ import annotations

import inspect
import zlib
from typing import Any

import numpy as np

CLEAN = "clean"


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
