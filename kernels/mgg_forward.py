"""Fused MGG forward: features ``[N, 2]`` and memory in, tanh'ed output and new memory out.

Naive reference: :func:`mgg_fast.core.reference.memory_layer` (through ``MGG.forward``). No
autograd: this is the inference path (and the way to check the kernel on the parity forward
vectors). One program per ``BLOCK`` coordinates, every head in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mgg_fast.core.reference import MGGWeights

from .launch_policy import launch_config
from .memory_layer import check_mgg_shape, memory_layer_block, weight_args


@triton.jit
def _mgg_forward_kernel(
    x_ptr,
    out_ptr,
    W_in,
    b_in,
    W_out,
    b_out,
    n,
    q_w,
    k_w,
    v_w,
    o_w,
    pn_w,
    pn_b,
    ln_w,
    ln_b,
    lr_w,
    lr_b,
    token,
    NH: tl.constexpr,
    F: tl.constexpr,
    TILED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    coords = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = coords < n
    x0 = tl.load(x_ptr + 2 * coords, mask=mask, other=0.0)
    x1 = tl.load(x_ptr + 2 * coords + 1, mask=mask, other=0.0)
    out = memory_layer_block(
        x0, x1, coords, mask, W_in, b_in, W_out, b_out,
        q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token,
        NH, F, TILED, BLOCK,
    )  # fmt: skip
    tl.store(out_ptr + coords, out, mask=mask)


def fused_mgg_forward(
    features: Tensor, W: Tensor | None, b: Tensor | None, weights: MGGWeights, W1: Tensor, b1: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One fused MGG call without autograd: ``(out [N], W' [N,nh,f,f], b' [N,nh,f])``.

    ``features`` is ``[N, 2]`` (or ``[N, 1, 2]``); ``W``/``b`` the carried memory (``b`` may be
    ``[N, nh, 1, f]``), or both ``None`` for a first call, which tiles the learned ``W1 [nh,f,f]``
    / ``b1 [nh,1,f]``; ``weights`` are the MGG's other learned tensors (``MGG.weights()``).
    Inputs are not modified. Float32 only (``TypeError`` otherwise); unsupported head sizes
    raise ``ValueError``.
    """
    nh, f = weights.ttt_norm_weight.shape
    check_mgg_shape(nh, f)
    x = features.reshape(-1, 2) if features.dim() == 3 else features
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"features must be [N, 2] or [N, 1, 2], got {list(features.shape)}")
    args = weight_args(weights, x.device)
    if x.dtype != torch.float32:
        raise TypeError(f"fused_mgg_forward computes in float32, got {x.dtype} features")
    n = x.shape[0]
    x = x.detach().contiguous()
    tiled = W is None
    if tiled != (b is None):
        raise ValueError("pass both W and b, or neither (first call)")
    if tiled:
        W_in, b_in = W1.detach().contiguous(), b1.detach().contiguous()
    else:
        b = b.reshape(n, nh, f) if b.dim() == 4 else b
        if tuple(W.shape) != (n, nh, f, f) or tuple(b.shape) != (n, nh, f):
            raise ValueError(
                f"state shapes {list(W.shape)}, {list(b.shape)} do not match N={n}, nh={nh}, f={f}"
            )
        if W.dtype != torch.float32 or b.dtype != torch.float32:
            raise TypeError(f"fused_mgg_forward needs float32 state, got {W.dtype}/{b.dtype}")
        W_in, b_in = W.detach().contiguous(), b.detach().contiguous()
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    W_out = torch.empty((n, nh, f, f), device=x.device, dtype=torch.float32)
    b_out = torch.empty((n, nh, f), device=x.device, dtype=torch.float32)
    if n:
        block, num_warps = launch_config(nh, f, min_warps=2)
        _mgg_forward_kernel[(triton.cdiv(n, block),)](
            x, out, W_in, b_in, W_out, b_out, n, *args,
            NH=nh, F=f, TILED=tiled, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return out, W_out, b_out
