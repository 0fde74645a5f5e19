"""Python cost of one relaunch of the update kernel, public runner vs direct launcher, without a GPU.

The update kernel is compiled for sm_90 (as ``compile_sm90.py`` does); its GPU handles, the C
launcher and Triton's driver are then replaced by stand-ins, so that what remains is the Python
each path runs per launch: ``CompiledKernel[grid](*args)`` (device and stream through the driver
proxy, the hooks' launch metadata, the empty hook chains) against
:func:`mgg_fast.kernels.relaunch.runner`'s direct call. The stand-in launcher does the same work
on both paths and the stand-in device and stream lookups cost less than torch's, so the
difference is an estimate of the saving per launch, not a GPU measurement.
Usage: ``python bench/relaunch_overhead.py``.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: real JIT functions
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_sm90
import triton
import triton.compiler.compiler as triton_compiler
from mgg_fast.kernels import relaunch
from triton.compiler import ASTSource

GRID = (1200, 1, 1)  # 38,400 coordinates in chunks of 32


def _stand_in_launcher(gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave, *args):
    """What the C launcher does in Python: call the hooks it is given."""
    if enter is not None:
        enter(launch_metadata)
    if leave is not None:
        leave(launch_metadata)


def compiled_update_kernel():
    """The default update kernel compiled for sm_90, with its GPU handles stubbed."""
    name, fn, constexprs, warps, pointers = next(iter(compile_sm90.configurations(False)))
    assert name == "step"
    src = ASTSource(fn=fn, signature=compile_sm90._signature(fn, pointers), constexprs=constexprs)
    kernel = triton.compile(src, target=compile_sm90.TARGET, options={"num_warps": warps})
    kernel._run, kernel.function, kernel.module = _stand_in_launcher, 1, 1
    kernel._init_handles = lambda: None
    return kernel


def per_call_us(fn, args: tuple, calls: int = 20_000, repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> int:
    driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 0)
    triton_compiler.driver = types.SimpleNamespace(active=driver)
    relaunch.current_stream = lambda device: 0
    kernel = compiled_update_kernel()
    args = tuple(range(len(kernel.src.fn.arg_names)))
    public, direct = kernel[GRID], relaunch.runner(kernel, GRID, 0)
    print(f"triton {triton.__version__}, {len(args)} arguments, launcher and driver stubbed")
    for _ in range(3):
        print(f"public runner {per_call_us(public, args):.2f} us, direct {per_call_us(direct, args):.2f} us")
    kernel.module = None  # nothing was loaded: nothing to unload
    return 0


if __name__ == "__main__":
    sys.exit(main())
