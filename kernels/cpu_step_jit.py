"""The numba entry points of the fused CPU MGG step (:mod:`mgg_fast.kernels.cpu_step`, which
imports this module on first use, so that a missing or broken numba leaves the package
importable and the optimizer free to fall back to the reference step): the preparation
(:func:`_prepare`), the kernel of an MGG size (:func:`_kernel`: chunks, blocks and the
parameters' dtypes in numba, each block's math from :mod:`mgg_fast.kernels.cpu_block`) and the
bit arithmetic of bfloat16/float16 parameters.

numba's on-disk cache is invalidated by a change of the file that defines a compiled function
(this one) and keyed on the values a kernel closes over; the code generators live in other
files, so a digest of their source is one of those values (:data:`_CODEGEN_DIGEST`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from numba import njit

from . import cpu_block, cpu_vector_ir
from .cpu_block import _ROW_M, _ROW_OUT, _ROW_V, _mgg_block, _scratch_size
from .cpu_vector_ir import (
    _bits_f32,
    _compare_swap,
    _data_ptr,
    _f32_bits,
    _f32_ptr,
    _f64_ptr,
    _fetch_add,
    _memory_ptr,
    _stack_f32,
    _u16_ptr,
)

LANES = 16  # coordinates per block: the lanes of the vector code (one AVX-512 register of fp32)
_F32 = np.float32
_CODEGEN_DIGEST = hashlib.sha256(
    b"".join(Path(m.__file__).read_bytes() for m in (cpu_vector_ir, cpu_block))
).hexdigest()

# ---- scalar helpers for the parameters' dtypes -----------------------------------------------

_TWO_M24 = _F32(2.0**-24)
_TWO_P24 = _F32(2.0**24)
_ROUND_MAGIC = _F32(12582912.0)


@njit(inline="always", error_model="numpy")
def _bf16_to_f32(h):
    return _bits_f32(np.int64(h) << 16)


@njit(inline="always", error_model="numpy")
def _f32_to_bf16(x):
    u = _f32_bits(x)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.uint16(0x7FC0 if x != x else r)


@njit(inline="always", error_model="numpy")
def _f16_to_f32(h):
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    normal = _bits_f32(sign | ((e + 112) << 23) | (mant << 13))
    special = _bits_f32(sign | 0x7F800000 | (mant << 13))
    sub = _F32(mant) * _TWO_M24
    if sign:
        sub = -sub
    return special if e == 31 else (sub if e == 0 else normal)


@njit(inline="always", error_model="numpy")
def _f32_to_f16(x):
    u = _f32_bits(x)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    normal = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    y = _bits_f32(a) * _TWO_P24
    sub = np.int64((y + _ROUND_MAGIC) - _ROUND_MAGIC)
    nan = 0x7E00 if a > 0x7F800000 else 0x7C00
    r = nan if a >= 0x477FF000 else (sub if a < 0x38800000 else normal)
    return np.uint16(sign | r)


@njit(inline="always", error_model="numpy")
def _load_grad(addr, code, start, cnt, dst):
    if code == 0:
        a = _f32_ptr(addr)
        for c in range(cnt):
            dst[c] = a[start + c]
    elif code == 1:
        a64 = _f64_ptr(addr)
        for c in range(cnt):
            dst[c] = _F32(a64[start + c])
    elif code == 2:
        a16 = _u16_ptr(addr)
        for c in range(cnt):
            dst[c] = _bf16_to_f32(a16[start + c])
    else:
        h16 = _u16_ptr(addr)
        for c in range(cnt):
            dst[c] = _f16_to_f32(h16[start + c])


@njit(inline="always", error_model="numpy")
def _apply_update(addr, code, start, cnt, out, o, lr32, lr64):
    if code == 0:
        a = _f32_ptr(addr)
        for c in range(cnt):
            a[start + c] = a[start + c] - lr32 * out[o + c]
    elif code == 1:
        a64 = _f64_ptr(addr)
        for c in range(cnt):
            a64[start + c] = a64[start + c] - lr64 * np.float64(out[o + c])
    elif code == 2:
        a16 = _u16_ptr(addr)
        for c in range(cnt):
            a16[start + c] = _f32_to_bf16(_bf16_to_f32(a16[start + c]) - lr32 * out[o + c])
    else:
        h16 = _u16_ptr(addr)
        for c in range(cnt):
            h16[start + c] = _f32_to_f16(_f16_to_f32(h16[start + c]) - lr32 * out[o + c])


def _prepare(table, bcs, steps, found_inf, skipped, wts, beta1, beta2, chunk):
    """Before the update: ``found_inf`` becomes 1 if an MGG weight is not finite, ``skipped``
    (when it has an element) gains ``found_inf``; with ``found_inf`` clear, the flat offset and
    first chunk of every parameter (rows 4, 5 of ``table``), the bias corrections of its step
    (``bcs``; the published exponent t + 1, in float64 rounded to float32 as the reference) and
    the step counts of the stepped parameters advanced. Returns the number of chunks (-1: skip)."""
    bad = found_inf[0] != 0
    for i in range(wts.shape[0]):
        if not np.isfinite(wts[i]):
            bad = True
    if bad and found_inf[0] == 0:
        found_inf[0] = 1.0
    for i in range(skipped.shape[0]):
        skipped[i] += found_inf[0]
    if bad:
        return -1
    nparams = table.shape[1] - 1  # the last column is a sentinel
    offset = 0
    chunks = 0
    for s in range(nparams):
        numel = table[3, s]
        table[4, s] = offset
        table[5, s] = chunks
        offset += numel
        if table[2, s] >= 0:
            chunks += (numel + chunk - 1) // chunk
            t = np.float64(steps[s] + np.float32(1.0))
            bcs[0, s] = np.float32(1.0 - beta1 ** (t + 1.0))
            bcs[1, s] = np.float32(1.0 - beta2 ** (t + 1.0))
            steps[s] += np.float32(1.0)
    table[5, nparams] = chunks
    return chunks


def _build(num_heads, head_dim, bf16_memory, ln_eps, base_lr):
    """The step kernel of an MGG of ``num_heads`` heads of dim ``head_dim`` (``memory_W`` as bf16
    bits or float32; the reference's ``LN_EPS`` and ``TTT_BASE_LR``), as a plain Python function
    for ``njit``. Everything it closes over is a compile-time constant and part of the cache key."""
    NH, F, B = num_heads, head_dim, LANES
    SCR = _scratch_size(F, B)
    M, V, OUT = _ROW_M * B, _ROW_V * B, _ROW_OUT * B
    MEM16 = int(bf16_memory)  # memory_W stored as bf16 bits
    LN_EPS, BASE_LR = _F32(ln_eps), _F32(base_lr)
    CODEGEN = _CODEGEN_DIGEST

    def run(
        ctrl,
        claim,
        table,
        bcs,
        nchunks,
        chunk,
        weights,
        m_addr,
        v_addr,
        W_addr,
        b_addr,
        lr32,
        lr64,
        beta1,
        om1,
        beta2,
        om2,
        eps,
    ):
        """Take chunks off ``ctrl[0]`` until none is left. A helper thread passes its slot in
        ``ctrl`` as ``claim`` and works only if it claims the slot before the caller closes it;
        the caller (``claim < 0``) closes every helper's slot when it runs out of chunks and
        returns the mask of the helpers that had started (it must wait for those)."""
        _ = CODEGEN
        if claim > 0 and _compare_swap(ctrl, claim, 0, 1) != 0:
            return 0
        wts = _data_ptr(weights)
        mp = _f32_ptr(m_addr)
        vp = _f32_ptr(v_addr)
        W = _memory_ptr(W_addr, MEM16)
        bm = _f32_ptr(b_addr)
        scr = _stack_f32(SCR)
        nparams = table.shape[1]
        while True:
            ci = _fetch_add(ctrl, 0, 1)
            if ci >= nchunks:
                break
            lo, hi = 0, nparams
            while lo < hi:  # the parameter of chunk ci: the last one whose first chunk is <= ci
                mid = (lo + hi) // 2
                if table[5, mid] <= ci:
                    lo = mid + 1
                else:
                    hi = mid
            s = lo - 1
            paddr, gaddr, code, numel, off = table[0, s], table[1, s], table[2, s], table[3, s], table[4, s]
            start = (ci - table[5, s]) * chunk
            count = min(chunk, numel - start)
            bc1, bc2 = bcs[0, s], bcs[1, s]
            for blk in range(0, count, B):
                cnt = min(B, count - blk)
                po = start + blk
                n0 = off + po
                _load_grad(gaddr, code, po, cnt, scr)
                for c in range(cnt):
                    scr[M + c] = mp[n0 + c]
                    scr[V + c] = vp[n0 + c]
                _mgg_block(
                    scr, wts, W, bm, n0, cnt, bc1, bc2, beta1, om1, beta2, om2, eps, LN_EPS, BASE_LR, NH, F, B
                )
                for c in range(cnt):
                    mp[n0 + c] = scr[M + c]
                    vp[n0 + c] = scr[V + c]
                _apply_update(paddr, code, po, cnt, scr, OUT, lr32, lr64)
        mask = 0
        if claim < 0:
            for slot in range(1, ctrl.shape[0]):
                if _compare_swap(ctrl, slot, 0, 2) == 1:
                    mask |= 1 << (slot - 1)
        return mask

    return run


# ---- compilation -----------------------------------------------------------------------------


def _jit(fn):
    """``njit`` with an on-disk cache where numba finds a writable place for it (next to this
    module, else NUMBA_CACHE_DIR or the user's cache directory); without one, compiled anew in
    each process."""
    try:
        return njit(nogil=True, cache=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True, error_model="numpy")(fn)


@functools.cache
def _kernel(num_heads: int, head_dim: int, bf16_memory: bool, ln_eps: float, base_lr: float):
    """The compiled step kernel (loaded from numba's cache or compiled on its first call)."""
    return _jit(_build(num_heads, head_dim, bf16_memory, ln_eps, base_lr))


_prepare_jit = _jit(_prepare)
