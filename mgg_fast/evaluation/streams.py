"""Streams of batches for the protocol: consecutive batches of a set in memory, a class-imbalanced
(label-shifted) order, and the mixed-domain stream of several sets.

A stream is a list of ``(x, y)`` batches (:data:`mgg_fast.evaluation.protocol.Batch`): inputs on
the device, labels on the CPU (``-1`` where unknown).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from mgg_fast.evaluation.images import ImageSet

Batch = tuple[Tensor, Tensor]  # (inputs on the device, labels on the CPU; -1 where unknown)


def make_batches(
    data: ImageSet, batch_size: int, device: torch.device | str, to_input: Callable[[np.ndarray], Tensor]
) -> list[Batch]:
    """Consecutive batches ``(x, y)`` of a set, on ``device``; ``to_input`` turns the uint8 images
    into the model's input."""
    x, y = to_input(data.images), torch.from_numpy(data.labels)
    return [
        (x[i : i + batch_size].to(device), y[i : i + batch_size]) for i in range(0, len(data), batch_size)
    ]


def label_shift_order(labels: np.ndarray, run: int, seed: int) -> np.ndarray:
    """A class-imbalanced order of ``labels``' indices: runs of ``run`` images of one class, the
    class of each run drawn with probability proportional to its images left (seeded). A batch
    of ``2 * run`` images then holds two or three classes instead of all of them."""
    rng = np.random.default_rng(seed)
    left = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
    order: list[int] = []
    while left:
        classes = sorted(left)
        counts = np.array([len(left[c]) for c in classes], dtype=float)
        c = classes[int(rng.choice(len(classes), p=counts / counts.sum()))]
        order += left[c][:run]
        left[c] = left[c][run:]
        if not left[c]:
            del left[c]
    return np.array(order, dtype=np.int64)


def reordered(data: ImageSet, order: np.ndarray) -> ImageSet:
    """The same images in another order."""
    return ImageSet(data.images[order], data.labels[order], data.name, data.skipped)


def mixed(sets: list[ImageSet], seed: int) -> ImageSet:
    """One set of every image of ``sets``, shuffled together (seeded): a mixed-domain stream,
    whose batches mix the corruptions."""
    images = np.concatenate([s.images for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    order = np.random.default_rng(seed).permutation(len(labels))
    return ImageSet(images[order], labels[order], "mixed")
