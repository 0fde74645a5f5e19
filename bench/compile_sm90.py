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
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: real JIT functions

import triton
import triton.language as tl
from mgg_fast.kernels import mgg_forward, mgg_step, mgg_step_single, step_prologue
from mgg_fast.kernels.memory_layer import MAX_HIDDEN, SUPPORTED_HEAD_DIMS, launch_config
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
# The fastest measured config of the default MGG (32 coordinates, one warp) spills 12 bytes (16
# with bf16 memory matrices, triton 3.8) and is still 20% faster than two warps; more than this
# means a configuration that was never measured is spilling.
SPILL_BUDGET = 16
POINTER_TYPES = {"table": "*i64", "chunks": "*i64", "checks": "*i64", "step_slots": "*i64", "ticket": "*i64"}
INT_ARGS = {"n", "n_chunks", "n_checks", "n_slots"}
FP32_POINTERS = {"steps", "found_inf", "token", "skipped"}
BF16_MEMORY = {"W_ptr": "*bf16"}  # MGGOptimizer(memory_W_dtype=torch.bfloat16)


def _signature(fn: triton.JITFunction, pointers: dict[str, str]) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.name in pointers:
            sig[p.name] = pointers[p.name]
        elif p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in INT_ARGS:
            sig[p.name] = "i32"
        elif p.name in POINTER_TYPES:
            sig[p.name] = POINTER_TYPES[p.name]
        elif p.name.endswith(("_ptr", "_w", "_b", "_in", "_out")) or p.name in FP32_POINTERS:
            sig[p.name] = "*fp32"
        else:
            sig[p.name] = "fp32"
    return sig


def _ptxas() -> str:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(bin_dir / "ptxas")


def compile_report(
    fn: triton.JITFunction, constexprs: dict, num_warps: int, pointers: dict[str, str]
) -> tuple[int, int]:
    """(registers per thread, spill bytes) of ``fn`` compiled for sm_90 with these constants
    (``pointers``: argument types other than the default fp32 ones)."""
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


def configurations(everything: bool):
    """(kernel name, fn, constexprs, num_warps, pointer types) for the launch configs of the chosen
    MGG sizes."""
    sizes = [(1, 8)]
    if everything:
        sizes = [(nh, f) for f in SUPPORTED_HEAD_DIMS for nh in (1, 2, MAX_HIDDEN // f)]
    for nh, f in sorted(set(sizes)):
        block, warps = launch_config(nh, f)
        for pdl in (False, True):
            step = {"NH": nh, "F": f, "P_DTYPE": tl.float32, "BLOCK": block, "PDL": pdl}
            yield "step", mgg_step._mgg_step_kernel, step, warps, {}
        block, warps = launch_config(nh, f, min_warps=2)
        for tiled in (True, False):
            forward = {"NH": nh, "F": f, "TILED": tiled, "BLOCK": block}
            yield "forward", mgg_forward._mgg_forward_kernel, forward, warps, {}
    block, warps = launch_config(1, 8)
    bf16 = {"NH": 1, "F": 8, "P_DTYPE": tl.bfloat16, "BLOCK": block, "PDL": True}
    yield "step-bf16", mgg_step._mgg_step_kernel, bf16, warps, {}
    yield "step-bf16W", mgg_step._mgg_step_kernel, bf16 | {"P_DTYPE": tl.float32}, warps, BF16_MEMORY
    single = {"NH": 1, "F": 8, "P_DTYPE": tl.float32, "BLOCK": block}
    single |= {"CHECK": step_prologue.CHECK_BLOCK, "SLOTS": step_prologue.SLOT_BLOCK}
    yield "single", mgg_step_single._mgg_step_single_kernel, single, warps, {}
    for pdl in (False, True):
        prologue = {"BLOCK": step_prologue.CHECK_BLOCK, "SLOTS": step_prologue.SLOT_BLOCK, "PDL": pdl}
        yield "prologue", step_prologue._step_prologue_kernel, prologue, step_prologue.NUM_WARPS, {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every supported (nh, f), not only H=8 nh=1")
    args = parser.parse_args(argv)
    worst = 0
    for name, fn, constexprs, warps, pointers in configurations(args.all):
        regs, spills = compile_report(fn, constexprs, warps, pointers)
        worst = max(worst, spills)
        shown = {k: (str(v) if isinstance(v, tl.dtype) else v) for k, v in constexprs.items()}
        print(f"{name:10s} {shown} num_warps={warps}: {regs} registers, {spills} bytes spilled")
    return 1 if worst > SPILL_BUDGET else 0


if __name__ == "__main__":
    sys.exit(main())
