"""What a batch is to the adaptation layer: a tensor, or an ``(x, y, ...)`` tuple whose labels
the unsupervised methods ignore."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def batch_inputs(batch: Tensor | Sequence[Any]) -> Tensor:
    """The inputs of a batch given as a tensor or as an ``(x, y, ...)`` tuple (labels ignored)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"a batch must be a tensor or an (x, y) tuple, got {type(batch).__name__}")
    return batch
