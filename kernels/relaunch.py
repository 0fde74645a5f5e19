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

While no launch hook is registered (a profiler such as proton registers them), the relaunch
goes one layer further down: straight to the compiled kernel's launcher, with the current stream
and without the per-launch metadata that only hooks read (microseconds of Python per launch).
This relies on the launcher's calling convention, which ``CompiledKernel[grid]`` uses in triton
3.6 and 3.8 alike; a compiled kernel without those attributes is launched the public way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton

_knobs = getattr(triton, "knobs", None)  # where triton keeps its launch hooks (3.4+)


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
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    addresses = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    device = tensors[0].device.index if tensors else None
    return Relaunch(runner(compiled, (grid, 1, 1), device), addresses, tensors)


def current_stream(device: int | None) -> int:
    """The raw current CUDA stream of ``device``, as Triton's own launch path reads it."""
    return torch._C._cuda_getCurrentRawStream(device)


def hooks_registered() -> bool:
    """Whether a Triton launch hook is registered (it must see every launch, with metadata)."""
    enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))  # chains, or callables


def runner(compiled: Any, grid: tuple[int, int, int], device: int | None) -> Callable[..., None]:
    """A launcher of ``compiled`` over ``grid`` on ``device``'s current stream: the compiled
    kernel's own launcher while no launch hook is registered, ``compiled[grid]`` otherwise."""
    public = compiled[grid]
    run, function, metadata = (getattr(compiled, a, None) for a in ("run", "function", "packed_metadata"))
    if _knobs is None or run is None or metadata is None:
        return public
    x, y, z = grid

    def direct(*args: Any) -> None:
        if hooks_registered():
            public(*args)
        else:  # what compiled[grid] passes, minus the hooks and their metadata
            run(x, y, z, current_stream(device), function, metadata, None, None, None, *args)

    return direct
