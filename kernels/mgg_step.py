"""Fused MGG optimizer step: moments, MGG memory step and parameter update in one pass.

Naive reference: :func:`mgg_fast.core.reference.optimizer_step` and
:func:`mgg_fast.core.reference.apply_update`. Per stepped coordinate the kernel reads grad, param,
m, v, W, b once and writes param, m, v, W, b once (604 bytes for fp32, H=8, nh=1; 348 with
``memory_W`` stored as bf16); features, projections, the memory update, post-norm, o_proj and
tanh stay in registers.

Layout: a group's state lives in flat buffers (``mgg_fast.optim.packed_state``); its parameters are
cut into chunks of ``BLOCK`` coordinates that never straddle two tensors, one program per chunk,
one launch per group (one per parameter dtype if a group mixes them). The chunk table
(:func:`chunk_layout`) depends on the parameters' sizes only. The parameter and gradient
addresses go in a small table built anew on every step (with a flag: is that parameter
stepped), so parameters and gradients stay separate tensors, without a gather.

A step is three launches, with no host synchronisation: torch's fused non-finite check of the
gradients (by the caller) sets ``found_inf``; the update writes nothing where it is set or where
an MGG weight is not finite (every program reads the ~100 weights anyway and checks them itself,
so all agree without a copy of the weights per step); then :func:`advance_steps` sets
``found_inf`` for a non-finite weight too and adds ``1 - found_inf`` to the step counts of the
stepped parameters (and, once per step, ``found_inf`` to the skipped-step counter). The update
reads the step counts before they advance, so no program reads a count another one writes.
"""

from __future__ import annotations

import array
import math
import operator
from collections.abc import Sequence
from itertools import repeat

import torch
import triton
import triton.language as tl
from torch import Tensor

from .memory_layer import check_mgg_shape, memory_layer_block, rounded_to, weights_finite

PARAM_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
LAYOUT_COLUMNS = 4  # slot (parameter index), start in the tensor, flat start, count
SLOTS = 256  # step counts advanced per iteration of advance_steps' single program


@triton.jit
def _one_minus_pow(ln_beta, e):
    """``1 - beta**e`` from ``ln(beta)`` in fp32, without cancellation for ``beta**e`` near 1."""
    x = e * ln_beta
    series = -x * (
        1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6 * (1.0 + x / 7)))))
    )
    return tl.where(x > -0.25, series, 1.0 - tl.exp(x))


@triton.jit
def _mgg_step_kernel(
    layout, ptrs, n_params, steps, found_inf, m_ptr, v_ptr, W_ptr, b_ptr,
    lr, beta1, one_minus_beta1, ln_beta1, beta2, one_minus_beta2, ln_beta2, eps,
    q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
    NH: tl.constexpr, F: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = layout + tl.program_id(0).to(tl.int64) * 4
    slot = tl.load(row)
    lane = tl.arange(0, BLOCK)
    offs = tl.load(row + 1) + lane
    coords = tl.load(row + 2) + lane
    stepped = (tl.load(ptrs + 2 * n_params + slot) != 0) & (tl.load(found_inf) == 0)
    stepped = stepped & weights_finite(q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token, NH, F)
    mask = lane < tl.where(stepped, tl.load(row + 3), 0)  # else nothing is read or written
    p_ptr = tl.load(ptrs + slot).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(ptrs + n_params + slot).to(tl.pointer_type(P_DTYPE))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + coords, mask=mask, other=0.0)
    v = tl.load(v_ptr + coords, mask=mask, other=0.0)
    t = tl.load(steps + slot) + 1.0  # this step's count: advance_steps() stores it afterwards
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
    # the update is applied in the wider of fp32 and the parameter's dtype, rounded once
    if tl.float64 == P_DTYPE:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        tl.store(p_ptr + offs, p - out.to(tl.float64) * lr, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(p_ptr + offs, rounded_to(p - lr * out, P_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _advance_steps_kernel(
    ptrs, steps, found_inf, skipped, n_rows,
    q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
    NH: tl.constexpr, F: tl.constexpr, COUNT: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    """One program: ``found_inf`` becomes 1 where an MGG weight is not finite (as the update saw
    it), then ``steps[i] += 1 - found_inf`` where parameter ``i`` is stepped (``ptrs[2, i]``);
    with ``COUNT``, ``skipped += found_inf``."""
    finite = weights_finite(q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token, NH, F)
    found = tl.where(finite, tl.load(found_inf), 1.0)
    tl.store(found_inf, found)
    offs = tl.arange(0, SLOTS)
    start = n_rows * 0
    while start < n_rows:  # not range(): it keeps n_rows unspecialised under the interpreter too
        rows = start + offs
        active = (rows < n_rows) & (tl.load(ptrs + 2 * n_rows + rows, mask=rows < n_rows, other=0) != 0)
        tl.store(steps + rows, tl.load(steps + rows, mask=active, other=0.0) + (1.0 - found), mask=active)
        start += SLOTS
    if COUNT:
        tl.store(skipped, tl.load(skipped) + found)


def chunk_layout(numels: Sequence[int], offsets: Sequence[int], block: int, device: torch.device) -> Tensor:
    """The chunk table ``[chunks, 4]`` (int64) of parameters with these sizes and flat-state
    offsets: per chunk its parameter index, start in the tensor, start in the flat state and
    count (1..block)."""
    rows = [
        (i, start, offset + start, min(block, n - start))
        for i, (n, offset) in enumerate(zip(numels, offsets, strict=True))
        for start in range(0, n, block)
    ]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, LAYOUT_COLUMNS).to(device)


def _ln(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf


def _device_table(columns: array.array, device: torch.device, keep_alive: list[Tensor]) -> Tensor:
    """The address table ``[3, P]`` (int64: parameter addresses, gradient addresses, stepped
    flags; ``columns`` holds them one after the other) on ``device``. A CUDA table comes from
    pinned memory without a host synchronisation (a pageable copy would wait for the queued GPU
    work); during CUDA-graph capture ``keep_alive`` holds both for the graph's lifetime."""
    table = torch.frombuffer(columns, dtype=torch.int64).view(3, -1)  # shares the array's memory
    if device.type != "cuda":
        return table
    pinned = table.pin_memory()
    out = pinned.to(device, non_blocking=True)
    if torch.cuda.is_current_stream_capturing():
        keep_alive += (pinned, out)
    return out


_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_dtype = operator.attrgetter("dtype")


def mgg_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    memory_W: Tensor,
    memory_b: Tensor,
    steps: Tensor,
    layout: Tensor,
    weights: Sequence[Tensor],
    *,
    num_heads: int,
    head_dim: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    found_inf: Tensor,
    skipped: Tensor | None = None,
    block: int,
    num_warps: int,
    keep_alive: list[Tensor] | None = None,
) -> None:
    """One fused MGG optimizer step of a group whose state is packed in flat buffers.

    ``params`` are the packed parameters in order, ``grads`` aligned with them (``None``: that
    parameter, its state and its step count stay as they are). ``exp_avg``/``exp_avg_sq``
    ``[N]`` and ``memory_b`` ``[N, nh, f]`` are float32, ``memory_W`` ``[N, nh, f, f]`` float32 or
    bfloat16, ``steps`` ``[P]`` float32; ``layout`` is :func:`chunk_layout` of the parameters'
    sizes for ``block``; ``weights`` the MGG's float32 tensors in ``MGGWeights`` order.
    ``found_inf`` (float32 ``[1]``) set to nonzero by the caller's non-finite check, or a
    non-finite value in ``weights``: nothing is written and no step count advances (``found_inf``
    is 1 afterwards). ``skipped`` (float32, optional) gains ``found_inf``.
    The caller validates (dtypes, shapes, devices); launches on the current CUDA device. Tensors
    of a CUDA-graph capture go to ``keep_alive``, which must outlive the graph.
    """
    check_mgg_shape(num_heads, head_dim)
    device = exp_avg.device
    keep_alive = [] if keep_alive is None else keep_alive
    copies: list[tuple[Tensor, Tensor]] = []  # (non-contiguous parameter, its contiguous working copy)
    if (
        not any(map(operator.is_, grads, repeat(None)))
        and all(map(_is_contiguous, params))
        and all(map(_is_contiguous, grads))
    ):
        work_params, work_grads = params, grads  # the common case, in a few C-level passes
        stepped = [1] * len(params)
    else:
        work_params, work_grads, stepped = [], [], []
        for p, g in zip(params, grads, strict=True):
            if g is not None and not g.is_contiguous():
                g = g.contiguous()  # held in work_grads until launched
            if g is not None and not p.is_contiguous():
                copies.append((p, p.contiguous()))
                p = copies[-1][1]
            work_params.append(p)
            work_grads.append(p if g is None else g)  # any valid address; not read
            stepped.append(int(g is not None))
        if not any(stepped):
            return
    columns = array.array("q", [*map(_data_ptr, work_params), *map(_data_ptr, work_grads), *stepped])
    table = _device_table(columns, device, keep_alive)
    scalars = (lr, beta1, 1.0 - beta1, _ln(beta1), beta2, 1.0 - beta2, _ln(beta2), eps)
    state = (len(params), steps, found_inf, exp_avg, exp_avg_sq, memory_W, memory_b)
    if all(stepped):
        dtypes = set(map(_dtype, work_params))
    else:
        dtypes = {p.dtype for p, s in zip(work_params, stepped, strict=True) if s}
    for dtype in dtypes:
        launch_table = table
        if len(dtypes) > 1:  # this launch steps the parameters of one dtype only
            mine = [int(s and p.dtype == dtype) for p, s in zip(work_params, stepped, strict=True)]
            launch_table = _device_table(
                columns[: 2 * len(params)] + array.array("q", mine), device, keep_alive
            )
        _mgg_step_kernel[(layout.shape[0],)](
            layout, launch_table, *state, *scalars, *weights,
            NH=num_heads, F=head_dim, P_DTYPE=PARAM_DTYPES[dtype], BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    for p, w in copies:
        p.copy_(w)
    advance_steps(table, steps, found_inf, skipped, weights, num_heads=num_heads, head_dim=head_dim)


def advance_steps(
    table: Tensor,
    steps: Tensor,
    found_inf: Tensor,
    skipped: Tensor | None,
    weights: Sequence[Tensor],
    *,
    num_heads: int,
    head_dim: int,
) -> None:
    """``found_inf`` set to 1 if an MGG weight is not finite, then ``steps[i] += 1 - found_inf``
    for the stepped rows of the address table; ``skipped += found_inf`` when given. One launch,
    one program."""
    count = skipped is not None
    _advance_steps_kernel[(1,)](
        table, steps, found_inf, skipped if count else found_inf, table.shape[1], *weights,
        NH=num_heads, F=head_dim, COUNT=count, SLOTS=SLOTS,
    )  # fmt: skip
