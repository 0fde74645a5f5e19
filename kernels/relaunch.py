"""Launch a Triton kernel once through the JIT, then again without the JIT's per-call dispatch.

Every ``kernel[grid](...)`` call binds and specialises each argument and looks the compiled
kernel up: tens of microseconds of Python for the update kernel's 30 arguments, most of the host
time of an optimizer step. When nothing the specialisation depends on has changed (the same
tensors at the same addresses, the same integers and constants; only float arguments differ,
and Triton does not specialise on float values), the kernel compiled for the first launch is the
one the JIT would pick again, so it can be launched directly (``CompiledKernel[grid](*args)``,
which still honours Triton's launch hooks), with addresses in place of tensors.
``MGGOptimizer``'s repeat path does that: its checks guarantee the same tensors at the same
addresses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton


class Relaunch(NamedTuple):
    """A compiled kernel bound to its grid, and the arguments of its first launch with every tensor
    replaced by its address (Triton's launcher otherwise asks each tensor for ``data_ptr()`` and
    the driver for its attributes, a microsecond per tensor, on every launch)."""

    runner: Callable[..., None]
    args: tuple
    tensors: tuple  # the first launch's tensors, kept alive so that their addresses stay theirs

    def __call__(self) -> None:
        """Launch on the current stream."""
        self.runner(*self.args)


def launch(kernel: triton.JITFunction, grid: int, args: tuple, **options: Any) -> Relaunch | None:
    """``kernel[(grid,)](*args, **options)``; ``args`` holds every parameter, constants too, in
    order. Returns its :class:`Relaunch`, or ``None`` where the JIT does not hand back a compiled
    kernel (the interpreter)."""
    compiled = kernel[(grid,)](*args, **options)
    if compiled is None or not hasattr(compiled, "function"):
        return None
    addresses = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    return Relaunch(compiled[(grid, 1, 1)], addresses, tuple(a for a in args if isinstance(a, torch.Tensor)))
