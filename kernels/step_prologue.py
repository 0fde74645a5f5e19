"""Step prologue: the whole-step non-finite decision and the step counts, in one launch.

Naive reference: the host path of :meth:`mgg_fast.MGGOptimizer.step` (``torch``'s fused
non-finite check, then ``steps += 1`` unless it found NaN/Inf). One program per chunk of at most
``CHECK_BLOCK`` gradient elements (chunks never straddle two tensors; every gradient of every
group in one launch) tests the exponent bits of its elements, so bf16/fp16/fp32/fp64 gradients
are checked as they are, without a float copy. Each program then adds ``1 + 2**32 * flagged`` to
a ticket; the program that draws the last ticket knows the whole step's answer and alone writes
``found_inf``, adds it to the skipped-step counter, advances the step counts of the stepped
parameters (unless it skips) and resets the ticket. Only that counter is atomic: the results are
deterministic. The fused update (``mgg_step.py``) then reads ``found_inf`` and the advanced counts.

With programmatic dependent launch (Hopper and newer) the prologue lets the update kernel start
early: the update loads its inputs while the prologue finishes, then waits for it.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents

from . import relaunch
from .overrides import Override
from .relaunch import Relaunch

if TYPE_CHECKING:
    from .mgg_step import GroupWork

CHECK_BLOCK = 2048  # gradient elements per program
SLOT_BLOCK = 256  # step counts advanced per iteration by the deciding program
NUM_WARPS = 4
PLAN_CACHE_SIZE = 8  # gradient addresses may alternate (set_to_none=True): keep a few tables
# exponent mask per element size and dtype: all exponent bits set means Inf or NaN
EXPONENT_MASKS = {
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
}
FLAGGED = tl.constexpr(1 << 32)  # ticket increment of a program that saw a non-finite value


@triton.jit
def _count_nonfinite(ptr, lane, mask, exp_mask, BITS: tl.constexpr):
    """Elements of the chunk at ``ptr`` (read as ``BITS``-bit integers) whose exponent is all ones."""
    int_type: tl.constexpr = tl.int16 if BITS == 16 else (tl.int32 if BITS == 32 else tl.int64)
    bits = tl.load(ptr.to(tl.pointer_type(int_type)) + lane, mask=mask, other=0).to(tl.int64)
    return tl.sum(((bits & exp_mask) == exp_mask).to(tl.int32), axis=0)


@triton.jit
def check_chunk(chunks, index, BLOCK: tl.constexpr):
    """NaN/Inf elements (int64) in row ``index`` of a check table: [grad ptr, count, element
    bytes, exponent mask]."""
    row = chunks + index.to(tl.int64) * 4
    ptr = tl.load(row)
    lane = tl.arange(0, BLOCK)
    mask = lane < tl.load(row + 1)
    width = tl.load(row + 2)
    exp_mask = tl.load(row + 3)
    bad = tl.load(row + 1) * 0  # int64 zero
    if width == 2:
        bad += _count_nonfinite(ptr, lane, mask, exp_mask, 16)
    if width == 4:
        bad += _count_nonfinite(ptr, lane, mask, exp_mask, 32)
    if width == 8:
        bad += _count_nonfinite(ptr, lane, mask, exp_mask, 64)
    return bad


@triton.jit
def advance_step_counts(step_slots, start, n_slots, add, SLOTS: tl.constexpr):
    """Add ``add`` to the float32 step counts at addresses ``step_slots[start:n_slots]``."""
    offs = tl.arange(0, SLOTS)
    while start < n_slots:  # not range(): triton 3.6's interpreter
        more = start + offs
        valid = more < n_slots
        slot = tl.load(step_slots + more, mask=valid, other=0).to(tl.pointer_type(tl.float32))
        tl.store(slot, tl.load(slot, mask=valid, other=0.0) + add, mask=valid)
        start += SLOTS


# Counts are not specialised: Triton would compile n == 1 as a constant (a recompile per count),
# and triton 3.6 crashes compiling this kernel with n_slots == 1 (TritonGPUCoalesce).
@triton.jit(do_not_specialize=["n_chunks", "n_slots"])
def _step_prologue_kernel(
    chunks,
    n_chunks,
    step_slots,
    n_slots,
    ticket,
    found_inf,
    skipped,
    BLOCK: tl.constexpr,
    SLOTS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the update kernel may start loading; it waits for this one
    bad = check_chunk(chunks, tl.program_id(0), BLOCK)
    # Every program reads the first SLOTS step counts (and the skip counter) before its ticket,
    # so the last one finds them loaded: only its stores remain once it knows the answer. Only
    # the last program writes them, after every other program's ticket: no read sees a write.
    offs = tl.arange(0, SLOTS)
    valid = offs < n_slots
    slot = tl.load(step_slots + offs, mask=valid, other=0).to(tl.pointer_type(tl.float32))
    count = tl.load(slot, mask=valid, other=0.0)
    skipped_before = tl.load(skipped)
    increment = 1 + (bad > 0).to(tl.int64) * FLAGGED
    total = tl.atomic_add(ticket, increment, sem="acq_rel") + increment
    if total % FLAGGED == n_chunks:  # the last program: every chunk has been checked
        found = (total >= FLAGGED).to(tl.float32)
        tl.store(found_inf, found)
        tl.store(skipped, skipped_before + found)
        tl.store(slot, count + (1.0 - found), mask=valid)
        advance_step_counts(step_slots, n_slots * 0 + SLOTS, n_slots, 1.0 - found, SLOTS)
        tl.store(ticket, 0)


class ProloguePlan(NamedTuple):
    """Device tables of one set of gradients: check chunks and the step-count addresses."""

    chunks: Tensor  # [n_chunks, 4] int64
    slots: Tensor  # [n_slots] int64 addresses of the float32 step counts of stepped parameters
    n_chunks: int  # >= 1: every gradient has a row
    n_slots: int


def _build_plan(groups: Sequence[GroupWork], device: torch.device) -> ProloguePlan:
    rows, slots = [], []
    for group in groups:
        steps = group.flat.steps
        for i, _, g in group.work:
            if g.dtype not in EXPONENT_MASKS:
                raise TypeError(f"gradients must be one of {list(EXPONENT_MASKS)}, got {g.dtype}")
            slots.append(steps.data_ptr() + i * steps.element_size())
            size, mask = g.element_size(), EXPONENT_MASKS[g.dtype]
            rows += [
                (g.data_ptr() + start * size, min(CHECK_BLOCK, g.numel() - start), size, mask)
                for start in range(0, max(g.numel(), 1), CHECK_BLOCK)  # empty: one row of 0
            ]
    chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)
    return ProloguePlan(chunks, torch.tensor(slots, dtype=torch.int64).to(device), len(rows), len(slots))


_forced_pdl: Override[bool] = Override()


@functools.cache
def _hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether the update kernel is launched with programmatic dependent launch: on CUDA sm_90+,
    unless ``forced_pdl(False)``. On an H100 (2026-11-27, bench/RESULTS.md) it made a plain step
    2% faster at 1 M and 8 M coordinates and 0.2 us faster at 38,400; a CUDA-graph replay at
    38,400 coordinates was 0.3 us slower (11.3 against 11.0 us), at 1 M and 8 M 2% faster."""
    if _forced_pdl.value is False:
        return False
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and _hopper_or_newer(device)


def forced_pdl(enabled: bool) -> AbstractContextManager[None]:
    """Turn programmatic dependent launch on or off inside the block (benchmarks compare both)."""
    return _forced_pdl.forced(enabled)


class StepGuard:
    """Device state of the whole-step non-finite decision of one optimizer.

    ``found_inf`` (float32 ``[1]``) is 1.0 after :meth:`check` saw a NaN/Inf in any gradient of
    the step; the fused update kernels then write nothing. ``ticket`` holds the counters of the
    prologue (``[0]``) and of the single-launch step (arrivals ``[0]``, departures ``[1]``); every
    launch leaves them at zero.
    Check tables are cached by gradient address (a small LRU; tables used while a CUDA graph was
    being captured are pinned, since the graph holds their addresses).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.ticket = torch.zeros(2, dtype=torch.int64, device=device)  # arrivals, departures
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)  # when check() gets none
        self.plans: OrderedDict = OrderedDict()
        self.captured: dict = {}

    def check(
        self,
        groups: Sequence[GroupWork],
        skipped: Tensor | None = None,
        *,
        capturable: bool = False,
        pdl: bool = False,
    ) -> Tensor:
        """Check every gradient of a step and advance the step counts unless one is not finite.

        ``groups``: the step's prepared groups (their float32 ``flat.steps`` advance).
        ``skipped`` (float32, on the device; default :attr:`skipped`) gains 1.0 when the step is
        skipped. Returns ``found_inf``; no host synchronisation.
        """
        self.launch(self.plan(groups, capturable=capturable), skipped, pdl=pdl)
        return self.found_inf

    def plan(self, groups: Sequence[GroupWork], *, capturable: bool = False) -> ProloguePlan:
        """The cached tables for these gradients (built on a miss; pinned during graph capture)."""
        key = tuple((group.flat.steps.data_ptr(), group.key) for group in groups)
        plan = self.plans.get(key)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if plan is None:
            if capturable and capturing:
                raise RuntimeError(
                    "the fused MGG step needs its pointer tables before CUDA-graph capture: run one "
                    "step with the same parameter and gradient tensors before capturing"
                )
            plan = self.plans[key] = _build_plan(groups, self.device)
            if len(self.plans) > PLAN_CACHE_SIZE:
                self.plans.popitem(last=False)
        else:
            self.plans.move_to_end(key)
        if capturing:
            self.captured[key] = plan
        return plan

    def launch(
        self, plan: ProloguePlan, skipped: Tensor | None = None, *, pdl: bool = False
    ) -> Relaunch | None:
        """Run the prologue kernel on a plan from :meth:`plan` (result in :attr:`found_inf`);
        returns its :class:`Relaunch` (``None`` under the interpreter)."""
        skipped = self.skipped if skipped is None else skipped
        args = (
            plan.chunks, plan.n_chunks, plan.slots, plan.n_slots, self.ticket, self.found_inf, skipped,
            CHECK_BLOCK, SLOT_BLOCK, pdl,  # BLOCK, SLOTS, PDL
        )  # fmt: skip
        return relaunch.launch(_step_prologue_kernel, plan.n_chunks, args, num_warps=NUM_WARPS)
