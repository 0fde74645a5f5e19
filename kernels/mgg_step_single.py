"""Single-launch MGG optimizer step: the step prologue's decision and the update in one kernel.

Naive reference: :func:`mgg_fast.optimizer.reference_group_step`, as for the two-kernel step
(``step_prologue.py`` then ``mgg_step.py``), whose results this kernel reproduces bit for bit.
A step is skipped whole if any gradient holds NaN/Inf, so nothing may be written before every
gradient has been checked; the two-kernel step pays a second launch for that. Here one
persistent grid (no more programs than the GPU holds at once, launched cooperatively so that
all of them are resident) does it all:

1. each program checks its share of the step prologue's check table and draws an arrival
   ticket (``1 + 2**32`` if it saw a NaN/Inf);
2. it waits until every program has arrived (a grid barrier); the ticket then tells whether
   the step is skipped;
3. it updates its share of the chunk table at step count ``t + 1`` (writing nothing if skipped);
4. it draws a departure ticket; the last program to depart, after every read of the step
   counts, writes ``found_inf``, counts a skip, advances the step counts and resets both tickets.

Only the tickets are atomic: results are deterministic. Under the interpreter programs run one
after another, so there the grid is a single program. Opt-in (:func:`forced_single_launch`)
until it is measured against the two-kernel step on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import os
from contextlib import AbstractContextManager

import torch
import triton
import triton.language as tl
from torch import Tensor

from mgg_fast.mgg import MGG

from . import relaunch
from .mgg_step import GroupWork, chunk_inputs, chunk_update, copy_back, on_device, step_scalars
from .overrides import Override
from .relaunch import Relaunch
from .step_prologue import (
    CHECK_BLOCK,
    FLAGGED,
    SLOT_BLOCK,
    ProloguePlan,
    StepGuard,
    advance_step_counts,
    check_chunk,
)


@triton.jit(do_not_specialize=["n_chunks", "n_checks", "n_slots"])
def _mgg_step_single_kernel(
    table, steps, found_inf, m_ptr, v_ptr, W_ptr, b_ptr,
    lr, beta1, one_minus_beta1, ln_beta1, beta2, one_minus_beta2, ln_beta2, eps,
    q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
    n_chunks, checks, n_checks, step_slots, n_slots, ticket, skipped,
    NH: tl.constexpr, F: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    CHECK: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    # Same leading arguments as the update kernel (mgg_step.SCALARS holds for both).
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    bad = tl.load(checks) * 0  # int64 zero
    i = pid
    while i < n_checks:  # phase 1: this program's gradient check rows
        bad += check_chunk(checks, i, CHECK)
        i += programs
    increment = 1 + (bad > 0).to(tl.int64) * FLAGGED
    arrived = tl.atomic_add(ticket, increment, sem="acq_rel") + increment
    while arrived % FLAGGED < programs:  # grid barrier: all programs are resident (cooperative)
        arrived = tl.load(ticket, volatile=True)  # a plain read: no atomics contend with arrivals
    found = arrived >= FLAGGED
    lane = tl.arange(0, BLOCK)
    c = pid
    while c < n_chunks:  # phase 2: this program's chunks, updated unless the step is skipped
        row, p_ptr, coords, offs, count, g, p, m, v = chunk_inputs(table, c, m_ptr, v_ptr, P_DTYPE, BLOCK)
        mask = lane < tl.where(found, 0, count)
        t = tl.load(steps + tl.load(row + 5)) + 1.0  # the count this step advances to
        chunk_update(
            p_ptr, coords, offs, mask, g, p, m, v, t, m_ptr, v_ptr, W_ptr, b_ptr,
            lr, beta1, one_minus_beta1, ln_beta1, beta2, one_minus_beta2, ln_beta2, eps,
            q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
            NH, F, P_DTYPE, BLOCK,
        )  # fmt: skip
        c += programs
    departed = tl.atomic_add(ticket + 1, 1, sem="acq_rel") + 1
    if departed == programs:  # the last: every program has read its step counts
        found_f = found.to(tl.float32)
        tl.store(found_inf, found_f)
        tl.store(skipped, tl.load(skipped) + found_f)
        advance_step_counts(step_slots, n_slots * 0, n_slots, 1.0 - found_f, SLOTS)
        tl.store(ticket, 0)
        tl.store(ticket + 1, 0)


_forced_single: Override[bool] = Override()


def use_single_launch(device: torch.device) -> bool:
    """Whether ``MGGOptimizer`` takes a one-group, one-dtype fused step in a single launch.

    Off unless :func:`forced_single_launch` turns it on: it has run only under the interpreter
    (one program) and waits for a GPU measurement against the two-kernel step."""
    if not _forced_single.value:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def forced_single_launch(enabled: bool) -> AbstractContextManager[None]:
    """Turn the single-launch step on or off inside the block (tests and benchmarks)."""
    return _forced_single.forced(enabled)


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def resident_programs(compiled, device: torch.device) -> int:
    """How many programs of a compiled kernel the GPU holds at once (CUDA's occupancy query)."""
    compiled[(1, 1, 1)]  # loads the kernel: its function handle
    blocks = ctypes.c_int()
    status = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks),
        ctypes.c_void_p(compiled.function),
        ctypes.c_int(32 * compiled.metadata.num_warps),
        ctypes.c_size_t(compiled.metadata.shared),
    )
    if status != 0 or blocks.value < 1:
        raise RuntimeError(f"CUDA occupancy query failed (status {status}, {blocks.value} blocks)")
    return blocks.value * torch.cuda.get_device_properties(device).multi_processor_count


def single_launch_step(
    group: GroupWork,
    mgg: MGG,
    guard: StepGuard,
    plan: ProloguePlan,
    skipped: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> Relaunch | None:
    """The whole step of a prepared group with one parameter dtype, in one launch: checks the
    gradients of ``plan`` (:meth:`StepGuard.plan` of this group), updates unless one is not
    finite, adds a skip to ``skipped`` otherwise, advances the step counts. Returns its
    :class:`Relaunch` (``None`` under the interpreter)."""
    if len(group.launches) != 1:
        raise ValueError(f"a single-launch step takes one parameter dtype, got {len(group.launches)}")
    (launch,) = group.launches
    flat = group.flat
    n_chunks = launch.chunks.shape[0]
    args = (
        launch.chunks, flat.steps, guard.found_inf,
        flat.exp_avg, flat.exp_avg_sq, flat.memory_W, flat.memory_b,
        *step_scalars(lr, beta1, beta2, eps), *group.weights,
        n_chunks, plan.chunks, plan.n_chunks, plan.slots, plan.n_slots, guard.ticket, skipped,
        mgg.num_heads, mgg.head_dim, launch.dtype, group.block, CHECK_BLOCK, SLOT_BLOCK,
    )  # fmt: skip
    device = flat.exp_avg.device
    with on_device(device):
        if os.environ.get("TRITON_INTERPRET") == "1":
            grid, options = 1, {}  # programs run one after another: a barrier needs them all at once
        else:
            options = {"num_warps": group.num_warps, "launch_cooperative_grid": True}
            compiled = _mgg_step_single_kernel.warmup(*args, grid=(1,), **options)
            grid = min(max(n_chunks, plan.n_chunks), resident_programs(compiled, device))
        result = relaunch.launch(_mgg_step_single_kernel, grid, args, **options)
    copy_back(group)
    return result
