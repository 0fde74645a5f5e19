"""Images on disk, the one loader of every suite: the ImageNet-C release layout or an ImageFolder,
streamed by a DataLoader (:func:`make_loader`) or decoded into memory at a fixed size
(:func:`load_image_folder`, for the bundled models); and :class:`ImageSet`, images held in memory.

Layouts (``detect_layout`` tells them apart when none is given):

* ``imagenet-c``: ``ROOT/<corruption>/<severity>/<class>/<image>`` (or ``.../<severity>/<image>``
  for unlabeled images). One stream per corruption at the chosen severity.
* ``imagefolder``: ``ROOT/<class>/<image>``, or ``ROOT/<image>`` (unlabeled). One stream.

Labels of class folders, in order of precedence: a ``classes.txt`` or ``wnids.txt`` in ROOT (one
folder name per line, line i = label i); ImageNet wnids (``n01440764`` …) in timm's class order
when the model predicts 1,000 classes; folder names that are numbers; else the sorted folder
names. A folder that the mapping does not know, or whose label the head cannot predict, is an
error. An image that cannot be decoded is skipped (:class:`Skipped` counts it), never fatal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

LAYOUTS = ("imagenet-c", "imagefolder")
SEVERITIES = ("1", "2", "3", "4", "5")
LABEL_FILES = ("classes.txt", "wnids.txt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_CLASSES = 1000
# the 15 ImageNet-C test corruptions in their usual order (reports list them so)
IMAGENET_C_ORDER = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)  # fmt: skip
_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ImageSet:
    """Images ``[n, H, W, 3]`` uint8 held in memory, and labels ``[n]`` int64 (``-1`` where unknown);
    ``skipped``: files of its folder that could not be decoded and were left out."""

    images: np.ndarray
    labels: np.ndarray
    name: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labeled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


@dataclass(frozen=True)
class ImageStream:
    """The images of one stream (a corruption at a severity, or a folder), in a fixed order."""

    name: str
    files: tuple[Path, ...]
    labels: tuple[int, ...]  # -1 where unlabeled

    @property
    def labeled(self) -> bool:
        return bool(self.labels) and min(self.labels) >= 0

    def __len__(self) -> int:
        return len(self.files)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_root(root: str | os.PathLike, flag: str = "--data") -> Path:
    """``root`` as a path, if it is an existing folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is not a folder")
    return path


def detect_layout(root: Path) -> str:
    """``imagenet-c`` when some subfolder holds severity folders ``1``..``5``, else ``imagefolder``."""
    for sub in _folders(root):
        if any(child.name in SEVERITIES for child in _folders(sub)):
            return "imagenet-c"
    return "imagefolder"


def _files_of(folder: Path) -> list[tuple[Path, str | None]]:
    """``(image, class folder name)`` of a labeled folder, or ``(image, None)`` of a flat one."""
    classes = [(c, _images(c)) for c in _folders(folder)]
    labeled = [(f, c.name) for c, files in classes for f in files]
    found = labeled or [(f, None) for f in _images(folder)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} or its class folders")
    return found


def class_labels(names: Sequence[str], root: Path, num_labels: int | None) -> dict[str, int]:
    """Label of each class folder name (see the module docstring for the precedence), checked to
    fit a head of ``num_labels`` classes (``None``: no head to check against)."""
    listing = next((root / n for n in LABEL_FILES if (root / n).is_file()), None)
    if listing is not None:
        order = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        index, source = {n: i for i, n in enumerate(order)}, str(listing)
    elif num_labels == IMAGENET_CLASSES and all(_WNID.fullmatch(n) for n in names):
        from timm.data import ImageNetInfo

        index = {n: i for i, n in enumerate(ImageNetInfo().label_names())}
        source = "the ImageNet wnids"
    elif all(n.isdigit() for n in names):
        index, source = {n: int(n) for n in names}, "the folder numbers"
    else:
        index, source = {n: i for i, n in enumerate(sorted(set(names)))}, "the sorted folder names"
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} are not listed in {source}")
    limit = float("inf") if num_labels is None else num_labels
    beyond = sorted({n for n in names if index[n] >= limit}, key=index.__getitem__)
    if beyond:
        raise ValueError(
            f"class folder {beyond[0]!r} gets label {index[beyond[0]]} from {source}, but the model "
            f"predicts {num_labels} classes (add a {LABEL_FILES[0]} in {root}, or a --class-mask)"
        )
    return index


def _stream(name: str, files: list[tuple[Path, str | None]], labels: dict[str, int]) -> ImageStream:
    return ImageStream(
        name, tuple(f for f, _ in files), tuple(-1 if c is None else labels[c] for _, c in files)
    )


def _imagenet_c_corruptions(root: Path) -> list[str]:
    found = [d.name for d in _folders(root) if any(c.name in SEVERITIES for c in _folders(d))]
    known = [c for c in IMAGENET_C_ORDER if c in found]
    return known + sorted(set(found) - set(known))


def find_streams(
    root: Path,
    layout: str,
    *,
    corruptions: Sequence[str] | None,
    severity: int,
    num_labels: int | None,
    labeled: bool = True,
) -> list[ImageStream]:
    """The streams under ``root``: one per corruption (``imagenet-c``; ``None`` or ``["all"]`` for
    every corruption folder), or the whole folder (``imagefolder``). Labels in ``0..num_labels-1``
    (``None``: unchecked); ``labeled=False`` leaves every image unlabeled (source data for
    statistics, meta-training)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "imagefolder":
        if corruptions is not None:
            raise ValueError("--corruptions needs the imagenet-c layout (ROOT/<corruption>/<severity>/...)")
        groups = {root.name or "images": _files_of(root)}
    else:
        available = _imagenet_c_corruptions(root)
        if not available:
            raise ValueError(f"{root} has no <corruption>/<severity> folders (the imagenet-c layout)")
        chosen = available if corruptions is None or list(corruptions) == ["all"] else list(corruptions)
        unknown = [c for c in chosen if c not in available]
        if unknown:
            raise ValueError(f"{root} has no corruption folder {unknown[0]!r} (found {', '.join(available)})")
        groups = {}
        for c in chosen:
            folder = root / c / str(severity)
            if not folder.is_dir():
                present = ", ".join(s.name for s in _folders(root / c) if s.name in SEVERITIES)
                raise ValueError(f"{root / c} has no severity {severity} folder (found {present or 'none'})")
            groups[c] = _files_of(folder)
    names = sorted({c for files in groups.values() for _, c in files if c is not None})
    if not labeled:
        groups = {name: [(f, None) for f, _ in files] for name, files in groups.items()}
    labels = class_labels(names, root, num_labels) if names and labeled else {}
    return [_stream(name, files, labels) for name, files in groups.items()]


def subsample(stream: ImageStream, n: int | None, seed: int) -> ImageStream:
    """At most ``n`` images of ``stream``, a seeded random choice kept in file order (class folders
    come sorted, so a plain prefix would hold only the first classes)."""
    if n is None or n >= len(stream):
        return stream
    keep = sorted(torch.randperm(len(stream), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return ImageStream(
        stream.name, tuple(stream.files[i] for i in keep), tuple(stream.labels[i] for i in keep)
    )


def interleave(streams: Sequence[ImageStream], n: int, seed: int) -> ImageStream:
    """At most ``n`` images taken round-robin from the streams (each subsampled first), so that
    a meta-training set mixes every corruption."""
    per = -(-n // max(1, len(streams)))
    parts = [subsample(s, per, seed) for s in streams]
    order = [(p, k) for k in range(per) for p in parts if k < len(p)][:n]
    return ImageStream(
        "+".join(s.name for s in streams),
        tuple(p.files[i] for p, i in order),
        tuple(p.labels[i] for p, i in order),
    )


def read_class_mask(path: str | os.PathLike, num_classes: int) -> list[int]:
    """Class indices from a text file (integers separated by commas, spaces or newlines), checked
    to be distinct and to fit a head of ``num_classes`` outputs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--class-mask {path} does not exist")
    words = path.read_text().replace(",", " ").split()
    if not words or not all(w.lstrip("-").isdigit() for w in words):
        raise ValueError(f"--class-mask {path} must hold class indices (integers), got {words[:3]}")
    mask = [int(w) for w in words]
    bad = [i for i in mask if not 0 <= i < num_classes]
    if bad:
        raise ValueError(
            f"--class-mask {path} has index {bad[0]}, but the model's head has {num_classes} classes"
        )
    if len(set(mask)) != len(mask):
        raise ValueError(f"--class-mask {path} lists a class twice")
    return mask


# ---- loading -------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """``(image or None, label, index, error)`` of each file, the image as ``transform`` makes it
    from an RGB PIL image; None where it cannot be decoded."""

    def __init__(self, stream: ImageStream, transform: Callable[[Any], Any]):
        self.stream = stream
        self.transform = transform

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, i: int) -> tuple[Any, int, int, str]:
        from PIL import Image

        try:
            with Image.open(self.stream.files[i]) as image:
                x = self.transform(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for broken or odd files
            return None, self.stream.labels[i], i, f"{type(exc).__name__}: {exc}"
        return x, self.stream.labels[i], i, ""


@dataclass
class LoadedBatch:
    """The decodable images of one loader batch, and the ones that were skipped."""

    x: Tensor | None
    labels: Tensor
    indices: Tensor
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _collate(items: list[tuple[Tensor | None, int, int, str]]) -> LoadedBatch:
    good = [it for it in items if it[0] is not None]
    return LoadedBatch(
        torch.stack([it[0] for it in good]) if good else None,
        torch.tensor([it[1] for it in good], dtype=torch.long),
        torch.tensor([it[2] for it in good], dtype=torch.long),
        [(it[2], it[3]) for it in items if it[0] is None],
    )


def batch_indices(n: int, batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Image indices of each batch: a seeded permutation cut into ``batch_size`` pieces, the last
    one merged into the one before when it would hold a single image (a batch std, and BatchNorm
    in train mode, need at least two)."""
    order = (
        torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        if shuffle
        else list(range(n))
    )
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2].extend(batches.pop())
    return batches


def make_loader(
    stream: ImageStream,
    transform: Callable[[Any], Tensor],
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    seed: int,
    shuffle: bool = True,
) -> DataLoader:
    """Batches of ``stream`` (:func:`batch_indices`: the same order on every run, so a resumed run
    sees what the interrupted one would have), decoded in ``workers`` processes, pinned on CUDA."""
    return DataLoader(
        ImageFiles(stream, transform),
        batch_sampler=batch_indices(len(stream), batch_size, seed, shuffle),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate,
    )


@dataclass
class Skipped:
    """Images skipped because they could not be decoded: a count and the first few, for warnings."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    shown: int = 3

    def add(self, stream: ImageStream, batch: LoadedBatch, warn: Callable[[str], None]) -> None:
        for index, error in batch.skipped:
            self.count += 1
            if len(self.examples) < self.shown:
                self.examples.append(str(stream.files[index]))
                warn(f"warning: skipped unreadable image {stream.files[index]} ({error})")


# ---- in memory, at a fixed size (the bundled models) ---------------------------------------------


def fit_image(image: Any, size: int) -> np.ndarray:
    """A PIL image → uint8 ``[size, size, 3]``: RGB, longer side resized to ``size``, zero-padded."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, ((size - w) // 2, (size - h) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def read_image_folder(
    path: str | os.PathLike,
    size: int,
    *,
    num_labels: int | None = None,
    warn: Callable[[str], None] = lambda _message: None,
) -> ImageSet:
    """The images of one folder (the ``imagefolder`` layout: flat, unlabeled, or one subfolder
    per class, labelled as :func:`class_labels` says) decoded into memory at ``size`` (see
    :func:`fit_image`), in file order. An image that cannot be decoded is skipped and counted
    (``warn`` is told of the first few); ``ValueError`` when none is left."""
    root = check_root(path, "image folder")
    (stream,) = find_streams(root, "imagefolder", corruptions=None, severity=5, num_labels=num_labels)
    files = ImageFiles(stream, lambda image: fit_image(image, size))
    skipped, images, labels = Skipped(), [], []
    for i in range(len(files)):
        image, label, index, error = files[i]
        if image is None:
            skipped.add(stream, LoadedBatch(None, torch.empty(0), torch.empty(0), [(index, error)]), warn)
            continue
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError(f"none of the {len(stream)} images in {root} could be read")
    return ImageSet(np.stack(images), np.array(labels, dtype=np.int64), str(root), skipped.count)
