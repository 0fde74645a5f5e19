"""Fused MGG optimizer step: moments, MGG memory step and parameter update in one pass.

Naive reference: :func:`mgg_fast.optimizer.reference_group_step` (built on
:mod:`mgg_fast.reference`). Per active coordinate the kernel reads grad, param, m, v, W, b once
and writes param, m, v, W, b once (604 bytes for fp32, H=8, nh=1; 348 with ``memory_W`` stored
as bf16); features, projections, the memory update, post-norm, o_proj and tanh stay in
registers.

Layout: the group's parameters are cut into chunks of ``BLOCK`` coordinates that never straddle
two tensors; one program per chunk, one launch for the whole group (one per parameter dtype if a
group mixes dtypes). A cached int64 table holds per chunk ``[param ptr, grad ptr, flat start,
start in the tensor, valid count, parameter index]``; pointers are cast in-kernel, so parameters
and gradients stay separate tensors (no gather). Tables are cached in ``flat.cache`` keyed by
the tensors' addresses ("plans", a small LRU).

Before the update, the step prologue (``step_prologue.py``) checks every gradient of the step,
sets ``found_inf`` and advances the step counts (unless it skips); advancing them here would race
with the reads of the other chunks of the same tensor. When ``found_inf`` is set the update writes
nothing. No host synchronisation happens in a step (MGG weights and step counts are read
in-kernel), so with the tables cached a step can be captured in a CUDA graph: two kernels. With
programmatic dependent launch (Hopper+) the update starts while the prologue runs: it loads
gradient, parameter and moments, then waits for the prologue's decision.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_wait

from mgg_fast.flat_state import FlatState
from mgg_fast.mgg import MGG

from . import relaunch
from .memory_layer import check_mgg_shape, launch_config, memory_layer_block, rounded_to, weight_args
from .relaunch import Relaunch
from .step_prologue import StepGuard, use_pdl

# chunk table row: param ptr, grad ptr, flat start, start in the tensor, count, parameter index
TABLE_COLUMNS = tl.constexpr(6)
TABLE_CACHE_KEY = "triton_step_plans"
TABLE_CACHE_SIZE = 8  # gradient addresses may alternate (set_to_none=True); keep a few plans
CAPTURED_PLANS_KEY = "triton_step_captured_plans"  # plans used in CUDA-graph capture: never evicted
GUARD_CACHE_KEY = "triton_step_guard"  # the StepGuard of direct fused_group_step calls
PARAM_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


@triton.jit
def _one_minus_pow(ln_beta, e):
    """``1 - beta**e`` from ``ln(beta)`` in fp32, without cancellation for ``beta**e`` near 1."""
    x = e * ln_beta
    series = -x * (
        1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6 * (1.0 + x / 7)))))
    )
    return tl.where(x > -0.25, series, 1.0 - tl.exp(x))


@triton.jit
def chunk_inputs(table, chunk, m_ptr, v_ptr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk's table row and its loaded gradient, parameter and moments (fp32)."""
    row = table + chunk.to(tl.int64) * TABLE_COLUMNS
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    lane = tl.arange(0, BLOCK)
    coords = tl.load(row + 2) + lane
    offs = tl.load(row + 3) + lane
    count = tl.load(row + 4)
    valid = lane < count
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + coords, mask=valid, other=0.0)
    v = tl.load(v_ptr + coords, mask=valid, other=0.0)
    return row, p_ptr, coords, offs, count, g, p, m, v


@triton.jit
def chunk_update(
    p_ptr, coords, offs, mask, g, p, m, v, t,
    m_ptr, v_ptr, W_ptr, b_ptr,
    lr, beta1, one_minus_beta1, ln_beta1, beta2, one_minus_beta2, ln_beta2, eps,
    q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
    NH: tl.constexpr, F: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Moments, memory step and parameter update of one chunk at step count ``t`` (1 on the first
    step); stores where ``mask`` holds."""
    g = tl.where(mask, g, 0.0)  # a skipped step's NaN/Inf stays out of the (unstored) arithmetic
    bc1 = _one_minus_pow(ln_beta1, t + 1.0)  # published quirk: exponent t + 1
    bc2 = _one_minus_pow(ln_beta2, t + 1.0)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt(v / bc2) + eps
    out = memory_layer_block(
        (m / bc1) / denom, g / denom, coords, mask, W_ptr, b_ptr, W_ptr, b_ptr,
        q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
        NH, F, False, BLOCK,
    )  # fmt: skip
    tl.store(m_ptr + coords, m, mask=mask)
    tl.store(v_ptr + coords, v, mask=mask)
    tl.store(p_ptr + offs, rounded_to(p - lr * out, P_DTYPE), mask=mask)


@triton.jit
def _mgg_step_kernel(
    table, steps, found_inf, m_ptr, v_ptr, W_ptr, b_ptr,
    lr, beta1, one_minus_beta1, ln_beta1, beta2, one_minus_beta2, ln_beta2, eps,
    q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
    NH: tl.constexpr, F: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    row, p_ptr, coords, offs, count, g, p, m, v = chunk_inputs(
        table, tl.program_id(0), m_ptr, v_ptr, P_DTYPE, BLOCK
    )
    if PDL:
        gdc_wait()  # the prologue's found_inf and step counts are final past this point
    mask = tl.arange(0, BLOCK) < tl.where(tl.load(found_inf) == 0, count, 0)  # found_inf: no writes
    t = tl.load(steps + tl.load(row + 5))  # advanced by the prologue: 1 on the first step
    chunk_update(
        p_ptr, coords, offs, mask, g, p, m, v, t, m_ptr, v_ptr, W_ptr, b_ptr,
        lr, beta1, one_minus_beta1, ln_beta1, beta2, one_minus_beta2, ln_beta2, eps,
        q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
        NH, F, P_DTYPE, BLOCK,
    )  # fmt: skip


class _Launch(NamedTuple):
    """One launch of a plan: the parameters of one dtype and their chunk table."""

    dtype: tl.dtype
    chunks: Tensor  # [chunks, TABLE_COLUMNS] int64 on the device


class GroupWork(NamedTuple):
    """A parameter group made ready for a fused step (:func:`prepare_group`): validated, tables
    looked up, nothing changed yet."""

    flat: FlatState
    work: list[tuple[int, Tensor, Tensor]]  # (parameter index, contiguous param, contiguous grad)
    copies: list[tuple[Tensor, Tensor]]  # (non-contiguous param, its contiguous working copy)
    key: tuple  # the addresses that key the cached tables (also the step prologue's)
    launches: list[_Launch]  # one per parameter dtype
    weights: list[Tensor]  # the MGG's learned tensors as the kernel takes them
    block: int
    num_warps: int
    pdl: bool  # programmatic dependent launch for this step (the prologue and the update agree)


def _build_launch(flat: FlatState, work: list[tuple[int, Tensor, Tensor]], block: int) -> _Launch:
    """Chunk table of ``work`` = [(parameter index, contiguous param, contiguous grad)], one dtype."""
    offsets = flat.offsets
    index = [i for i, _, _ in work]
    numels = torch.tensor([flat.numels[i] for i in index], dtype=torch.int64)
    per_param = torch.tensor(
        [[p.data_ptr(), g.data_ptr(), offsets[i], i] for i, p, g in work], dtype=torch.int64
    ).reshape(-1, 4)
    n_chunks = (numels + block - 1) // block
    owner = torch.repeat_interleave(torch.arange(len(index)), n_chunks)
    first = torch.cumsum(n_chunks, 0) - n_chunks
    start = (torch.arange(owner.numel()) - first[owner]) * block
    count = torch.clamp(numels[owner] - start, max=block)
    rows = per_param[owner]
    chunks = torch.stack((rows[:, 0], rows[:, 1], rows[:, 2] + start, start, count, rows[:, 3]), dim=1)
    return _Launch(PARAM_DTYPES[work[0][1].dtype], chunks.contiguous().to(flat.exp_avg.device))


def _build_plan(
    flat: FlatState, work: list[tuple[int, Tensor, Tensor]], block: int, capturable: bool
) -> list[_Launch]:
    """Validate the work list and build one launch per parameter dtype (a cache miss)."""
    device = flat.exp_avg.device
    if capturable and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the fused MGG step needs its pointer table before CUDA-graph capture: run one step "
            "with the same parameter and gradient tensors before capturing"
        )
    by_dtype: dict[torch.dtype, list[tuple[int, Tensor, Tensor]]] = {}
    for i, p, g in work:
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"the fused MGG step supports {list(PARAM_DTYPES)} parameters, got {p.dtype}")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != device or p.device != device:
            raise ValueError(
                f"gradient {i} ({g.dtype}, {list(g.shape)}, {g.device}) does not match its parameter "
                f"({p.dtype}, {list(p.shape)}, {p.device}) and the state on {device}"
            )
        by_dtype.setdefault(p.dtype, []).append((i, p, g))
    return [_build_launch(flat, items, block) for items in by_dtype.values()]


def _ln(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf


def prepare_group(flat: FlatState, grads: list[Tensor | None], mgg: MGG, *, capturable: bool) -> GroupWork:
    """Everything a fused step of this group needs, validated before anything changes.

    Raises ``TypeError`` for float64 state, a ``memory_W`` neither float32 nor bfloat16, or
    parameter dtypes the kernels lack; ``ValueError`` for unsupported MGG sizes and for gradients
    that do not match their parameters (checked when a table is built for new addresses);
    ``RuntimeError`` for a missing table during capture.
    Non-contiguous gradients are copied; non-contiguous parameters get a contiguous working copy.
    """
    if flat.exp_avg.dtype != torch.float32:
        raise TypeError(
            f"the fused MGG step keeps float32 state, the MGG is {flat.exp_avg.dtype}; "
            "use backend='reference' for float64"
        )
    if flat.memory_W.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(
            f"the fused MGG step stores memory_W as float32 or bfloat16, got {flat.memory_W.dtype}"
        )
    check_mgg_shape(mgg.num_heads, mgg.head_dim)
    weights = weight_args(mgg.weights(), flat.exp_avg.device)
    if len(grads) != len(flat.params):
        raise ValueError(f"{len(grads)} gradients for {len(flat.params)} parameters")
    work, copies, key = [], [], []
    for i, (p, g) in enumerate(zip(flat.params, grads, strict=True)):
        if g is None:
            continue
        if not g.is_contiguous():
            g = g.contiguous()
        if not p.is_contiguous():
            copies.append((p, p.contiguous()))
            p = copies[-1][1]
        work.append((i, p, g))
        key += (i, p.data_ptr(), g.data_ptr())
    block, num_warps = launch_config(mgg.num_heads, mgg.head_dim)
    key = (block, *key)
    launches = []
    if work:
        cache: OrderedDict = flat.cache.setdefault(TABLE_CACHE_KEY, OrderedDict())
        launches = cache.get(key)
        if launches is None:
            launches = cache[key] = _build_plan(flat, work, block, capturable)
            if len(cache) > TABLE_CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        if capturable and flat.exp_avg.is_cuda and torch.cuda.is_current_stream_capturing():
            # A captured graph holds the table's address: keep it alive past LRU eviction.
            flat.cache.setdefault(CAPTURED_PLANS_KEY, {})[key] = launches
    pdl = use_pdl(flat.exp_avg.device)
    return GroupWork(flat, work, copies, key, launches, weights, block, num_warps, pdl)


def step_scalars(lr: float, beta1: float, beta2: float, eps: float) -> tuple[float, ...]:
    """The update kernel's float arguments, in order (``SCALARS`` of its argument list)."""
    return (lr, beta1, 1.0 - beta1, _ln(beta1), beta2, 1.0 - beta2, _ln(beta2), eps)


SCALARS = slice(7, 15)  # where step_scalars() sit in the update kernel's arguments


def fused_group_update(
    group: GroupWork,
    mgg: MGG,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    found_inf: Tensor,
) -> list[Relaunch | None]:
    """The update kernel of a prepared group, after the step prologue (:meth:`StepGuard.check`)
    has set ``found_inf`` and advanced the step counts: nothing is written when it is nonzero.

    Returns a :class:`Relaunch` per launch (``None`` under the interpreter) for
    :func:`rebind_update`, to repeat the update while the tensors stay where they are."""
    flat = group.flat
    scalars = step_scalars(lr, beta1, beta2, eps)
    pdl = group.pdl
    options = {"num_warps": group.num_warps, **({"launch_pdl": True} if pdl else {})}
    relaunches = []
    for launch in group.launches:
        args = (
            launch.chunks, flat.steps, found_inf,
            flat.exp_avg, flat.exp_avg_sq, flat.memory_W, flat.memory_b,
            *scalars, *group.weights,
            mgg.num_heads, mgg.head_dim, launch.dtype, group.block, pdl,  # NH, F, P_DTYPE, BLOCK, PDL
        )  # fmt: skip
        relaunches.append(relaunch.launch(_mgg_step_kernel, launch.chunks.shape[0], args, **options))
    copy_back(group)
    return relaunches


def copy_back(group: GroupWork) -> None:
    """Copy the updated working copies of non-contiguous parameters back into them."""
    for p, w in group.copies:
        p.copy_(w)


def rebind_update(
    relaunches: list[Relaunch], *, lr: float, beta1: float, beta2: float, eps: float
) -> list[Relaunch]:
    """A group's update relaunches with new hyper-parameters (same tensors, same addresses);
    nothing is launched."""
    scalars = step_scalars(lr, beta1, beta2, eps)
    return [r._replace(args=r.args[: SCALARS.start] + scalars + r.args[SCALARS.stop :]) for r in relaunches]


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device inside the block (Triton launches on the current
    one); nothing for other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fused_group_step(
    flat: FlatState,
    grads: list[Tensor | None],
    mgg: MGG,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    guard: StepGuard | None = None,
    capturable: bool = False,
) -> None:
    """One MGG optimizer step of one parameter group, fused: the step prologue, then the update
    (same semantics as ``reference_group_step``, plus skipping a step with a NaN/Inf gradient).

    ``grads`` is aligned with ``flat.params``; a ``None`` gradient leaves that parameter, its
    state and its step count untouched. ``guard`` holds the device-side skip decision and its
    skipped-step counter (default: one kept in ``flat.cache``). Launches on the state's device
    whatever the current CUDA device. No host synchronisation; with
    ``capturable=True`` a missing pointer table during CUDA-graph capture raises (warm up first).

    Supported: float32 optimizer state only (use ``backend="reference"`` for float64), with
    ``memory_W`` in float32 or bfloat16;
    float32/bfloat16/float16/float64 parameters (computed in fp32, rounded once on store); head
    dim 8/16/32 with hidden size <= 64. See :func:`prepare_group` for what is validated.
    """
    group = prepare_group(flat, grads, mgg, capturable=capturable)
    if not group.work:
        return
    if guard is None:
        guard = flat.cache.get(GUARD_CACHE_KEY) or flat.cache.setdefault(
            GUARD_CACHE_KEY, StepGuard(flat.exp_avg.device)
        )
    with on_device(flat.exp_avg.device):
        found_inf = guard.check([group], capturable=capturable, pdl=group.pdl)
        fused_group_update(group, mgg, lr=lr, beta1=beta1, beta2=beta2, eps=eps, found_inf=found_inf)
