"""The gradient-memory-layer math of one MGG call as a ``@triton.jit`` helper, shared by the fused
optimizer step (``mgg_step.py``) and the fused forward (``mgg_forward.py``).

Naive reference: :func:`mgg_fast.core.reference.memory_layer`. The helper works on a block of
``BLOCK`` coordinates held in registers: features ``x0, x1 [BLOCK]``, per head a memory tile
``W [BLOCK, F, F]`` and ``b [BLOCK, F]`` (broadcast-multiply-and-sum, no ``tl.dot``: F = 8 is
below its minimum). Nothing per coordinate goes to memory except the new ``W``/``b``.

The post-norm over ``H = NH * F`` is accumulated head by head (Chan's parallel mean/variance
merge, the o_proj sum shifted by the first head's mean), so a single head is computed exactly
two-pass and several heads stay numerically stable without holding all of ``u`` at once.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from mgg_fast.core.reference import LN_EPS, TTT_BASE_LR, MGGWeights

from .launch_policy import INTERPRET, MAX_HIDDEN, SUPPORTED_HEAD_DIMS

_LN_EPS = tl.constexpr(LN_EPS)
_TTT_BASE_LR = tl.constexpr(TTT_BASE_LR)


def check_mgg_shape(num_heads: int, head_dim: int) -> None:
    """Raise ``ValueError`` for MGG sizes the kernels do not compile for."""
    if head_dim not in SUPPORTED_HEAD_DIMS or num_heads * head_dim > MAX_HIDDEN:
        raise ValueError(
            f"the fused MGG kernels support head dim f in {SUPPORTED_HEAD_DIMS} and hidden size "
            f"nh*f <= {MAX_HIDDEN}; got nh={num_heads}, f={head_dim}. Use backend='reference'."
        )


def weight_args(w: MGGWeights, device: torch.device) -> list[torch.Tensor]:
    """The learned tensors as :func:`memory_layer_block` takes them: ``MGGWeights`` order, fp32.

    Passed as they are (Triton reads their addresses; no copy, no host synchronisation).
    """
    if w.q_proj.device != device:
        raise ValueError(f"the MGG is on {w.q_proj.device} but the data is on {device}")
    if set(map(_dtype, w)) != {torch.float32}:
        raise TypeError(
            f"the fused MGG kernels compute with float32 weights, got {sorted(map(str, set(map(_dtype, w))))}"
            "; use backend='reference'"
        )
    if all(map(torch.Tensor.is_contiguous, w)):
        return list(w)
    return [t.contiguous() for t in w]


_dtype = operator.attrgetter("dtype")


@triton.jit
def _all_finite(ptr, N: tl.constexpr):
    """Whether the ``N`` fp32 values at ``ptr`` are all finite (``x * 0`` is NaN for NaN/Inf)."""
    offs = tl.arange(0, N)
    return tl.sum(tl.load(ptr + offs) * 0.0, axis=0) == 0.0


@triton.jit
def weights_finite(
    q_w, k_w, v_w, o_w, pn_w, pn_b, ln_w, ln_b, lr_w, lr_b, token, NH: tl.constexpr, F: tl.constexpr
):
    """Whether every learned weight a memory step reads (``MGGWeights``) is finite: a scalar the
    same in every program, read head by head (each piece a power of two long)."""
    ok = _all_finite(token, 1)
    for h in tl.static_range(NH):
        ok = ok & _all_finite(q_w + h * 2 * F, 2 * F) & _all_finite(k_w + h * 2 * F, 2 * F)
        ok = ok & _all_finite(v_w + h * 2 * F, 2 * F) & _all_finite(o_w + h * F, F)
        ok = ok & _all_finite(pn_w + h * F, F) & _all_finite(pn_b + h * F, F)
        ok = ok & _all_finite(ln_w + h * F, F) & _all_finite(ln_b + h * F, F)
        ok = ok & _all_finite(lr_w + h * 2, 2) & _all_finite(lr_b + h, 1)
    return ok


# The interpreter's fp32->bf16 cast truncates; the GPU's rounds to nearest-even, as torch does.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def rounded_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` to nearest-even, as torch rounds (under the interpreter by
    bit arithmetic for bf16, after which its cast is exact)."""
    if _ROUND_BF16_BY_HAND and tl.bfloat16 == DTYPE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = tl.where(x == x, ((bits >> 16) << 16).to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(DTYPE)


@triton.jit
def _layer_norm_hat(z, F: tl.constexpr):
    """Rows of ``z [BLOCK, F]`` normalised (biased variance, eps LN_EPS), and their std."""
    mean = tl.sum(z, axis=1) / F
    centered = z - mean[:, None]
    std = tl.sqrt(tl.sum(centered * centered, axis=1) / F + _LN_EPS)
    return centered / std[:, None], std


@triton.jit
def _tanh(r):
    e = tl.exp(-2.0 * tl.abs(r))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(r < 0, -t, t)


@triton.jit
def memory_layer_block(
    x0,
    x1,
    coords,
    mask,
    W_in,
    b_in,
    W_out,
    b_out,
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
    """One memory step for ``BLOCK`` coordinates; returns the tanh'ed output ``[BLOCK]``.

    ``coords [BLOCK]`` (int64) index the state rows ``W [N, NH, F, F]``/``b [N, NH, F]``; with
    ``TILED`` the incoming memory is the learned ``W1 [NH, F, F]``/``b1 [NH, 1, F]`` for every
    coordinate. The new memory is stored (where ``mask``) to ``W_out``/``b_out`` (which may alias
    ``W_in``/``b_in``: each element is read before it is written by the same program). ``W``
    may be fp32 or bf16 (computed in fp32, rounded to nearest-even on store).
    """
    fi = tl.arange(0, F)
    fj = fi
    eta_scale = tl.maximum(1.0 + tl.load(token), 0.0) * (_TTT_BASE_LR / F)
    tile_off = fi[None, :, None] * F + fj[None, None, :]  # [1, F, F]
    row_W = coords[:, None, None] * (NH * F * F)
    row_b = coords[:, None] * (NH * F)
    for h in tl.static_range(NH):
        feat = h * F + fi
        q = (
            x0[:, None] * tl.load(q_w + feat * 2)[None, :]
            + x1[:, None] * tl.load(q_w + feat * 2 + 1)[None, :]
        )
        k = (
            x0[:, None] * tl.load(k_w + feat * 2)[None, :]
            + x1[:, None] * tl.load(k_w + feat * 2 + 1)[None, :]
        )
        v = (
            x0[:, None] * tl.load(v_w + feat * 2)[None, :]
            + x1[:, None] * tl.load(v_w + feat * 2 + 1)[None, :]
        )
        gate = tl.sigmoid(x0 * tl.load(lr_w + 2 * h) + x1 * tl.load(lr_w + 2 * h + 1) + tl.load(lr_b + h))
        eta = eta_scale * gate  # [BLOCK]
        gamma = tl.load(ln_w + feat)[None, :]
        beta = tl.load(ln_b + feat)[None, :]

        if TILED:
            W = tl.broadcast_to(tl.load(W_in + h * F * F + tile_off), (BLOCK, F, F))
            b = tl.broadcast_to(tl.load(b_in + feat)[None, :], (BLOCK, F))
        else:
            W = tl.load(W_in + row_W + h * F * F + tile_off, mask=mask[:, None, None], other=0.0)
            W = W.to(tl.float32)  # memory_W may be stored as bf16
            b = tl.load(b_in + row_b + feat[None, :], mask=mask[:, None], other=0.0)

        # Inner loss 0.5*||LN(kW + b) - (v - k)||^2: its gradient wrt Z with the LN fused in.
        z = tl.sum(k[:, :, None] * W, axis=1) + b
        z_hat, std = _layer_norm_hat(z, F)
        e = (gamma * z_hat + beta - (v - k)) * gamma
        grad_z = (F * e - tl.sum(e, axis=1)[:, None] - z_hat * tl.sum(e * z_hat, axis=1)[:, None]) / (
            F * std[:, None]
        )

        # Dual form: q W' + b' = q W - eta (q.k) G + b', then the rank-1 memory update.
        qW = tl.sum(q[:, :, None] * W, axis=1)
        eta_grad = eta[:, None] * grad_z
        W_new = W - k[:, :, None] * eta_grad[:, None, :]
        b_new = b - eta_grad
        W_store = rounded_to(W_new, W_out.dtype.element_ty)
        tl.store(W_out + row_W + h * F * F + tile_off, W_store, mask=mask[:, None, None])
        tl.store(b_out + row_b + feat[None, :], b_new, mask=mask[:, None])
        z_bar = qW - tl.sum(q * k, axis=1)[:, None] * eta_grad + b_new
        z_bar_hat, _ = _layer_norm_hat(z_bar, F)
        u = q + gamma * z_bar_hat + beta  # this head's slice of the post-norm input

        # Post-norm + o_proj, merged head by head: mean/M2 (Chan), sum_j o_j w_j (u_j - shift).
        o = tl.load(o_w + feat)
        og = o * tl.load(pn_w + feat)
        ob_h = tl.sum(o * tl.load(pn_b + feat), axis=0)
        og_h = tl.sum(og, axis=0)
        mean_h = tl.sum(u, axis=1) / F
        d = u - mean_h[:, None]
        m2_h = tl.sum(d * d, axis=1)
        proj_h = tl.sum(d * og[None, :], axis=1)
        if h == 0:
            shift = mean_h
            mean = mean_h
            m2 = m2_h
            proj = proj_h
            og_sum = og_h
            ob_sum = ob_h
        else:
            delta = mean_h - mean
            mean = mean + delta * (F / ((h + 1) * F))
            m2 = m2 + m2_h + delta * delta * (h * F * F / ((h + 1) * F))
            proj = proj + proj_h + (mean_h - shift) * og_h
            og_sum = og_sum + og_h
            ob_sum = ob_sum + ob_h
    s = tl.sqrt(m2 / (NH * F) + _LN_EPS)
    r = (proj - (mean - shift) * og_sum) / s + ob_sum
    return _tanh(r)
