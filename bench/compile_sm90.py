"""Compile the fused kernels for an H100 (sm_90) without a GPU and report registers and spills.

Triton compiles to PTX and ptxas (bundled with the triton wheel) assembles it with no driver, so
compile errors and register spills of every launch configuration can be caught on a CPU-only
machine before a GPU run. Usage: ``python bench/compile_sm90.py [--all]`` (default: only the
configurations ``launch_config`` picks for the default MGG, H=8 nh=1). Prints one line per
kernel/config and exits 1 if any spills more than ``SPILL_BUDGET`` bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: real JIT functions

import triton
import triton.language as tl
from mgg_fast.kernels import mgg_forward, mgg_step
from mgg_fast.kernels.launch_policy import MAX_HIDDEN, SUPPORTED_HEAD_DIMS, launch_config
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
# The fastest measured config of the default MGG (32 coordinates, one warp) spills 12 bytes in
# the step kernel (triton 3.8) and was still faster than two warps on an H100 (7.3 vs 9.1 us at
# 38,400 coords, bench/gpu_runs/2026-11-27-h100-s4-run4). Triton 3.9 spills 16 bytes there and
# 20 with bf16 memory matrices (bench/RESULTS.md); more than this budget means a configuration
# spills well beyond what was measured or compiled before.
SPILL_BUDGET = 24
INT64_POINTERS = {"layout", "ptrs"}  # the chunk table and the address table
INT_ARGS = {"n", "n_params", "n_rows"}
FP32_POINTERS = {"steps", "found_inf", "token", "skipped"}
BF16_MEMORY = {"W_ptr": "*bf16"}  # MGGOptimizer(memory_W_dtype=torch.bfloat16)
ADVANCE_WARPS = 4  # advance_steps launches with Triton's default


def _signature(fn: triton.JITFunction, pointers: dict[str, str]) -> dict[str, str]:
    """Argument types of ``fn`` as the launches pass them (``pointers`` overrides by name)."""
    sig = {}
    for p in fn.params:
        if p.name in pointers:
            sig[p.name] = pointers[p.name]
        elif p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in INT_ARGS:
            sig[p.name] = "i32"
        elif p.name in INT64_POINTERS:
            sig[p.name] = "*i64"
        elif p.name.endswith(("_ptr", "_w", "_b", "_in", "_out")) or p.name in FP32_POINTERS:
            sig[p.name] = "*fp32"
        else:
            sig[p.name] = "fp32"
    return sig


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (triton 3.9 ships two; the older one cannot read
    the PTX version it emits)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return str(get_ptxas(90).path)


def compile_report(
    fn: triton.JITFunction, constexprs: dict, num_warps: int, pointers: dict[str, str]
) -> tuple[int, int]:
    """(registers per thread, spill bytes) of ``fn`` compiled for sm_90 with these constants
    (``pointers``: argument types other than the default ones)."""
    src = ASTSource(fn=fn, signature=_signature(fn, pointers), constexprs=constexprs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run(
            [_ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills


def configurations(everything: bool) -> Iterator[tuple[str, triton.JITFunction, dict, int, dict[str, str]]]:
    """(kernel name, fn, constexprs, num_warps, pointer types) for the launch configs of the chosen
    MGG sizes, the parameter dtypes and bf16 memory matrices (default MGG), and the step advance."""
    sizes = [(1, 8)]
    if everything:
        sizes = [(nh, f) for f in SUPPORTED_HEAD_DIMS for nh in (1, 2, MAX_HIDDEN // f)]
    for nh, f in sorted(set(sizes)):
        block, warps = launch_config(nh, f)
        step = {"NH": nh, "F": f, "P_DTYPE": tl.float32, "BLOCK": block}
        yield "step", mgg_step._mgg_step_kernel, step, warps, {}
        block, warps = launch_config(nh, f, min_warps=2)
        for tiled in (True, False):
            forward = {"NH": nh, "F": f, "TILED": tiled, "BLOCK": block}
            yield "forward", mgg_forward._mgg_forward_kernel, forward, warps, {}
    block, warps = launch_config(1, 8)
    step = {"NH": 1, "F": 8, "P_DTYPE": tl.float32, "BLOCK": block}
    yield "step-bf16", mgg_step._mgg_step_kernel, step | {"P_DTYPE": tl.bfloat16}, warps, {}
    yield "step-fp64", mgg_step._mgg_step_kernel, step | {"P_DTYPE": tl.float64}, warps, {}
    yield "step-bf16W", mgg_step._mgg_step_kernel, step, warps, BF16_MEMORY
    for count in (False, True):
        advance = {"NH": 1, "F": 8, "COUNT": count, "SLOTS": mgg_step.SLOTS}
        yield "advance", mgg_step._advance_steps_kernel, advance, ADVANCE_WARPS, {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every supported (nh, f), not only H=8 nh=1")
    args = parser.parse_args(argv)
    worst = 0
    for name, fn, constexprs, warps, pointers in configurations(args.all):
        regs, spills = compile_report(fn, constexprs, warps, pointers)
        worst = max(worst, spills)
        shown = {k: (str(v) if isinstance(v, tl.dtype) else v) for k, v in constexprs.items()} | pointers
        print(f"{name:10s} {shown} num_warps={warps}: {regs} registers, {spills} bytes spilled")
    return 1 if worst > SPILL_BUDGET else 0


if __name__ == "__main__":
    sys.exit(main())
