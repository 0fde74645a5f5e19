"""The functional MGG optimizer step: one signature, dispatched to a backend.

As ``torch.optim.adam.adam()`` dispatches to ``_single_tensor_adam`` / ``_fused_adam`` with the
same lists, :func:`mgg_step` takes a packed group (its parameters, their gradients and the
flat state of :class:`~mgg_fast.optim.packed_state.PackedState`) and runs it on

* ``"reference"``: :func:`mgg_fast.core.reference.optimizer_step` in eager PyTorch (the ground
  truth, any device and dtype; the one that meta-training differentiates through);
* ``"triton"``: the fused kernels of :mod:`mgg_fast.kernels` (CUDA, or the interpreter);
* ``"cpu"``: the fused CPU step of :mod:`mgg_fast.kernels.cpu_step` (numba; one pass over each
  coordinate's state, threads that take work in turn so a busy core slows only its share).

The caller (the optimizer) has validated everything and taken the whole-step non-finite
decision; the fused backend also reads ``found_inf`` itself, so it needs no host sync.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from mgg_fast.core.mgg import MGG
from mgg_fast.core.reference import apply_update, optimizer_step
from mgg_fast.optim.packed_state import PackedState

BACKENDS = ("auto", "triton", "cpu", "reference")


@functools.cache
def _kernels() -> ModuleType:
    """``mgg_fast.kernels``, imported on first use (it imports Triton)."""
    import mgg_fast.kernels

    return mgg_fast.kernels


def triton_usable(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA, or any device under the interpreter)."""
    from mgg_fast.kernels.launch_policy import interpreter_requested

    return device.type == "cuda" or interpreter_requested()


def _kernel_handles(mgg: MGG, kernel: ModuleType) -> bool:
    """Whether a fused kernel module (its ``SUPPORTED_HEAD_DIMS`` and ``MAX_HIDDEN``) handles
    this MGG: float32 weights, a supported head dim, a hidden size within its bound."""
    sizes_ok = mgg.head_dim in kernel.SUPPORTED_HEAD_DIMS and mgg.hidden_size <= kernel.MAX_HIDDEN
    return mgg.W1.dtype == torch.float32 and sizes_ok


def _require_float32(mgg: MGG, step: str) -> None:
    """The fused steps keep float32 state: a TypeError naming ``step`` for another MGG dtype."""
    if mgg.W1.dtype != torch.float32:
        raise TypeError(
            f"{step} keeps float32 state, the MGG is {mgg.W1.dtype}; use backend='reference' for float64"
        )


def fused_supported(mgg: MGG) -> bool:
    """Whether the fused kernels handle this MGG (float32, head dim 8/16/32, hidden size <= 64);
    ``backend="auto"`` falls back to the reference otherwise."""
    from mgg_fast.kernels import launch_policy

    return _kernel_handles(mgg, launch_policy)


def cpu_supported(mgg: MGG) -> bool:
    """Whether the fused CPU step handles this MGG (float32, head dim 8/16/32, hidden size <= 64)
    and runs here (numba installed, its kernel compiled and checked); ``backend="auto"`` falls
    back to the reference otherwise."""
    from mgg_fast.kernels import cpu_step

    return _kernel_handles(mgg, cpu_step) and cpu_step.cpu_step_available()


def resolve_backend(backend: str, mgg: MGG, device: torch.device) -> str:
    """The backend that steps parameters on ``device``: ``"auto"`` is the fused one of the device
    (Triton on CUDA, the CPU step on the CPU) when it handles the MGG, else the reference; an
    explicit fused backend that cannot run here is an error naming why."""
    if backend == "reference":
        return "reference"
    if backend == "cpu":
        from mgg_fast.kernels.cpu_step import check_cpu_shape, cpu_step_unavailable_reason

        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' steps CPU tensors; parameters are on {device}")
        _require_float32(mgg, "the fused CPU step")
        check_cpu_shape(mgg.num_heads, mgg.head_dim)
        reason = cpu_step_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend='cpu' cannot run here: {reason}; use backend='reference'")
        return "cpu"
    if backend == "triton":
        if not triton_usable(device):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); parameters are on {device}"
            )
        _require_float32(mgg, "the fused MGG step")
        from mgg_fast.kernels.memory_layer import check_mgg_shape

        check_mgg_shape(mgg.num_heads, mgg.head_dim)
        return "triton"
    if device.type == "cuda":
        return "triton" if fused_supported(mgg) else "reference"
    return "cpu" if device.type == "cpu" and cpu_supported(mgg) else "reference"


def mgg_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    pack: PackedState,
    mgg: MGG,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    backend: str,
    found_inf: Tensor,
    skipped: Tensor | None = None,
    keep_alive: list[Tensor] | None = None,
    threads: int | None = None,
) -> None:
    """One MGG optimizer step of a packed group, in place.

    ``params`` are the packed parameters (their local shards) in order, ``grads`` aligned with
    them (``None``: that parameter, its state and step count stay as they are). ``backend`` is
    ``"reference"``, ``"triton"`` or ``"cpu"`` (see :func:`resolve_backend`).
    ``found_inf``/``skipped`` and ``keep_alive`` serve the fused backends (see
    :func:`mgg_fast.kernels.mgg_step_`); ``threads`` the CPU step (``None``: its default, see
    :func:`mgg_fast.kernels.cpu_step.default_threads`). The reference is only called once the
    host has found the step finite."""
    if backend == "cpu":
        from mgg_fast.kernels.cpu_step import cpu_mgg_step_

        cpu_mgg_step_(
            params, grads, pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b,
            pack.steps, mgg.weights(), num_heads=mgg.num_heads, head_dim=mgg.head_dim,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, found_inf=found_inf, skipped=skipped,
            threads=threads,
        )  # fmt: skip
    elif backend == "triton":
        _triton_mgg_step(params, grads, pack, mgg, lr, beta1, beta2, eps, found_inf, skipped, keep_alive)
    elif backend == "reference":
        _reference_mgg_step(params, grads, pack, mgg, lr, beta1, beta2, eps)
    else:
        raise ValueError(f"unknown backend {backend!r}; use 'reference', 'triton' or 'cpu'")


def _triton_mgg_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    pack: PackedState,
    mgg: MGG,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    found_inf: Tensor,
    skipped: Tensor | None,
    keep_alive: list[Tensor] | None,
) -> None:
    kernels = _kernels()
    from mgg_fast.kernels.memory_layer import weight_args

    device = pack.exp_avg.device
    block, num_warps = kernels.launch_config(mgg.num_heads, mgg.head_dim)
    layout = pack.layouts.get(block)
    if layout is None:
        layout = pack.layouts[block] = kernels.chunk_layout(pack.numels, pack.offsets, block, device)
    kernels.mgg_step_(
        params, grads, pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b,
        pack.steps, layout, weight_args(mgg.weights(), device),
        num_heads=mgg.num_heads, head_dim=mgg.head_dim,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        found_inf=found_inf, skipped=skipped, block=block, num_warps=num_warps,
        keep_alive=keep_alive,
    )  # fmt: skip


def _reference_mgg_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    pack: PackedState,
    mgg: MGG,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """The step in plain PyTorch (:func:`mgg_fast.core.reference.optimizer_step`)."""
    active = [i for i, g in enumerate(grads) if g is not None]
    numels = [pack.numels[i] for i in active]
    dtype = pack.exp_avg.dtype
    g = torch.cat([grads[i].reshape(-1) for i in active]).to(dtype)
    buffers = (pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b)
    if len(active) == len(pack.params):
        coords, steps = None, pack.steps
        m, v, W, b = buffers
    else:
        offsets = pack.offsets
        coords = torch.cat(
            [torch.arange(offsets[i], offsets[i] + pack.numels[i], device=g.device) for i in active]
        )
        steps = pack.steps[active]
        m, v, W, b = (buf[coords] for buf in buffers)
    steps += 1  # (advances pack.steps itself when every parameter is stepped)
    if coords is not None:
        pack.steps[active] = steps
    if len(numels) == 1 or bool((steps == steps[0]).all()):
        step = steps[0]
    else:
        step = steps.repeat_interleave(torch.tensor(numels, device=g.device), output_size=g.numel())
    out = optimizer_step(g, m, v, W, b, step, mgg.weights(), beta1=beta1, beta2=beta2, eps=eps, inplace=True)
    if coords is not None:
        for buf, val in zip(buffers, out[1:], strict=True):
            buf.index_copy_(0, coords, val)
    apply_update([params[i] for i in active], out.update, lr)
