"""Launch policy of the fused kernels: which MGG sizes they compile for and the BLOCK x warps
table. The one place that reads ``TRITON_INTERPRET``: :data:`INTERPRET` at import (Triton itself
decides at kernel definition whether it interprets), :func:`interpreter_requested` now."""

from __future__ import annotations

import os

import triton


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (the kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


INTERPRET = interpreter_requested()
SUPPORTED_HEAD_DIMS = (8, 16, 32)
MAX_HIDDEN = 64
INTERPRET_BLOCK = 128  # few, fat programs under the interpreter (each costs ~1 ms there)
MEASURED_CONFIG = {8: (32, 1), 16: (8, 1), 32: (2, 1)}  # head dim f -> (BLOCK, warps), one head


def launch_config(num_heads: int, f: int, *, min_warps: int = 1) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for an MGG of ``num_heads`` heads of dim ``f``.

    A fixed table rather than ``triton.autotune``: the step kernel updates its buffers in place,
    so autotuning (which re-runs the kernel) would apply the step several times. The table is the
    fastest (or within 1% of it) of a BLOCK x num_warps sweep for one head on an H100
    (bench/RESULTS.md, 2026-11-27): tiles of 2,048 memory entries, one warp. Several heads
    (unmeasured) get at least two warps per head, rounded to a power of two and at most 8; the
    fused forward asks for ``min_warps=2``, below which it spills (``bench/compile_sm90.py``).
    """
    if INTERPRET:
        return INTERPRET_BLOCK, 1
    block, warps = MEASURED_CONFIG[f]
    if num_heads > 1:
        warps = max(warps, 2) * triton.next_power_of_2(num_heads)
    return block, min(max(warps, min_warps), 8)
