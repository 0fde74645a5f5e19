"""The numba internals of :mod:`mgg_fast.kernels.cpu_step` (the fused CPU MGG step): imported by
it on first use, so that a missing or broken numba leaves the package importable and the
optimizer free to fall back to the reference step.

The per-coordinate math is emitted as LLVM vector IR (:class:`_Vec`, :func:`_mgg_block`) rather
than left to LLVM's auto-vectoriser, whose unrolling heuristics vectorised the same loops well
for f = 8 and badly (gathers/scatters, scalar code) for f = 16/32: lanes are the ``LANES``
coordinates of a block (structure of arrays), and a coordinate's memory ``W [f, f]`` is walked
row by row as vectors of ``f``. Outer loops (chunks, blocks, the parameters' dtypes) are plain
numba. No fast-math: no contraction to FMA, no reassociation, so the results are the same on
every x86 ISA level (and every thread count).
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu_step import reference

LANES = 16  # coordinates per block: the lanes of the vector code (one AVX-512 register of fp32)

_F32 = np.float32
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_FLOAT = ir.FloatType()

# ---- intrinsics: bits, pointers, atomics, scratch -------------------------------------------


@intrinsic
def _bits_f32(typingctx, x):
    """The float32 whose bits are the low 32 bits of integer ``x``."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, _I32)
        elif x.bitwidth < 32:
            v = builder.zext(v, _I32)
        return builder.bitcast(v, _FLOAT)

    return types.float32(x), codegen


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of float32 ``x`` as a non-negative int64."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], _I32), ir.IntType(64))

    return types.int64(x), codegen


def _pointer_intrinsic(dtype):
    @intrinsic
    def as_pointer(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None
        ptr_type = types.CPointer(dtype)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr_type))

        return ptr_type(addr), codegen

    return as_pointer


_f32_ptr = _pointer_intrinsic(types.float32)
_f64_ptr = _pointer_intrinsic(types.float64)
_u16_ptr = _pointer_intrinsic(types.uint16)


@intrinsic
def _memory_ptr(typingctx, addr, bf16):
    """``memory_W``'s address as a pointer to its storage type: uint16 (bf16 bits) where the
    compile-time ``bf16`` is 1, else float32."""
    if not (isinstance(addr, types.Integer) and isinstance(bf16, types.IntegerLiteral)):
        return None
    ptr_type = types.CPointer(types.uint16 if bf16.literal_value else types.float32)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(addr, bf16), codegen


@intrinsic
def _data_ptr(typingctx, arr):
    """The data pointer of an array, typed by its dtype."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


@intrinsic
def _stack_f32(typingctx, n):
    """A zeroed float32 scratch buffer of compile-time size ``n`` on the stack."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    ptr_type = types.CPointer(types.float32)
    size = n.literal_value

    def codegen(context, builder, sig, args):
        slot = cgutils.alloca_once(builder, ir.ArrayType(_FLOAT, size))
        builder.store(ir.Constant(ir.ArrayType(_FLOAT, size), None), slot)
        return builder.bitcast(slot, context.get_value_type(ptr_type))

    return ptr_type(n), codegen


@intrinsic
def _fetch_add(typingctx, arr, index, value):
    """Atomically ``arr[index] += value`` (int64 array); returns the old value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        val = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, val, "seq_cst")

    return types.int64(arr, index, value), codegen


@intrinsic
def _compare_swap(typingctx, arr, index, expected, new):
    """Atomically ``arr[index] = new`` if it holds ``expected``; returns the old value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        exp = context.cast(builder, args[2], sig.args[2], types.int64)
        new_ = context.cast(builder, args[3], sig.args[3], types.int64)
        return builder.extract_value(builder.cmpxchg(ptr, exp, new_, "seq_cst", "seq_cst"), 0)

    return types.int64(arr, index, expected, new), codegen


# ---- vector IR emitter -----------------------------------------------------------------------


class _Vec:
    """Emits float32 vector IR of ``n`` lanes: the lane-parallel math of a block of coordinates
    (or of one coordinate along a row of its memory), so that it is SIMD by construction."""

    def __init__(self, builder: ir.IRBuilder, n: int):
        self.b = builder
        self.n = n
        self.t = ir.VectorType(_FLOAT, n)
        self.it = ir.VectorType(_I32, n)

    def const(self, x) -> ir.Constant:
        return ir.Constant(self.t, [float(np.float32(x))] * self.n)

    def iconst(self, x: int) -> ir.Constant:
        return ir.Constant(self.it, [x] * self.n)

    def splat(self, scalar) -> ir.Value:
        b = self.b
        vec = b.insert_element(
            ir.Constant(ir.VectorType(scalar.type, self.n), None), scalar, ir.Constant(_I32, 0)
        )
        return b.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, self.n), [0] * self.n))

    def scalar(self, ptr, index: int | ir.Value) -> ir.Value:
        idx = ir.Constant(ir.IntType(64), index) if isinstance(index, int) else index
        return self.b.load(self.b.gep(ptr, [idx]))

    def load(self, ptr, index, bf16: bool = False) -> ir.Value:
        """``n`` consecutive values at ``ptr[index]`` as fp32 (bf16 bits: widened)."""
        b = self.b
        idx = ir.Constant(ir.IntType(64), index) if isinstance(index, int) else index
        p = b.gep(ptr, [idx])
        if not bf16:
            return b.load(b.bitcast(p, ir.PointerType(self.t)), align=4)
        bits = b.load(b.bitcast(p, ir.PointerType(ir.VectorType(ir.IntType(16), self.n))), align=2)
        return b.bitcast(b.shl(b.zext(bits, self.it), self.iconst(16)), self.t)

    def store(self, value, ptr, index, bf16: bool = False) -> None:
        """Store at ``ptr[index]`` (bf16: rounded to nearest-even as torch rounds, NaN -> 0x7FC0)."""
        b = self.b
        idx = ir.Constant(ir.IntType(64), index) if isinstance(index, int) else index
        p = b.gep(ptr, [idx])
        if not bf16:
            b.store(value, b.bitcast(p, ir.PointerType(self.t)), align=4)
            return
        bits = b.bitcast(value, self.it)
        odd = b.and_(b.lshr(bits, self.iconst(16)), self.iconst(1))
        rounded = b.lshr(b.add(b.add(bits, self.iconst(0x7FFF)), odd), self.iconst(16))
        rounded = b.select(b.fcmp_unordered("uno", value, value), self.iconst(0x7FC0), rounded)
        narrow = b.trunc(rounded, ir.VectorType(ir.IntType(16), self.n))
        b.store(narrow, b.bitcast(p, ir.PointerType(ir.VectorType(ir.IntType(16), self.n))), align=2)

    def add(self, x, y):
        return self.b.fadd(x, y)

    def sub(self, x, y):
        return self.b.fsub(x, y)

    def mul(self, x, y):
        return self.b.fmul(x, y)

    def div(self, x, y):
        return self.b.fdiv(x, y)

    def _intrinsic(self, name, *args):
        fnty = ir.FunctionType(self.t, [self.t] * len(args))
        fn = cgutils.get_or_insert_function(self.b.module, fnty, f"llvm.{name}.v{self.n}f32")
        return self.b.call(fn, list(args))

    def sqrt(self, x):
        return self._intrinsic("sqrt", x)

    def abs(self, x):
        return self._intrinsic("fabs", x)

    def clamp(self, x, lo, hi):
        b = self.b
        lo_, hi_ = self.const(lo), self.const(hi)
        x = b.select(b.fcmp_ordered("<", x, lo_), lo_, x)
        return b.select(b.fcmp_ordered(">", x, hi_), hi_, x)

    def exp(self, x):
        """e**x for x in about [-87, 88] (clamped there), within ~2 ulp: Cody-Waite reduction by
        ln 2 and a degree-7 Taylor polynomial; the power of two goes in by the exponent bits."""
        b = self.b
        x = self.clamp(x, -87.0, 88.0)
        magic = self.const(12582912.0)  # 1.5 * 2**23: (t + M) - M rounds t to an integer
        n = self.sub(self.add(self.mul(x, self.const(1.4426950408889634)), magic), magic)
        r = self.sub(
            self.sub(x, self.mul(n, self.const(0.693359375))), self.mul(n, self.const(-2.12194440e-4))
        )
        p = self.const(1.0 / 5040.0)
        for coef in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
            p = self.add(self.mul(p, r), self.const(coef))
        scale = b.bitcast(b.shl(b.add(b.fptosi(n, self.it), self.iconst(127)), self.iconst(23)), self.t)
        return self.mul(p, scale)

    def sigmoid(self, x):
        return self.div(self.const(1.0), self.add(self.const(1.0), self.exp(self.b.fneg(x))))

    def tanh(self, x):
        """tanh: an odd series where |x| < 0.125 (no cancellation), else (1 - e)/(1 + e) with
        e = exp(-2|x|) and the sign of x."""
        b = self.b
        a = self.abs(x)
        e = self.exp(self.mul(self.const(-2.0), a))
        t = self.div(self.sub(self.const(1.0), e), self.add(self.const(1.0), e))
        t = b.select(b.fcmp_ordered("<", x, self.const(0.0)), b.fneg(t), t)
        x2 = self.mul(x, x)
        s = self.const(62.0 / 2835.0)
        for coef in (-17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0):
            s = self.add(self.mul(s, x2), self.const(coef))
        s = self.add(x, self.mul(self.mul(x, x2), s))
        return b.select(b.fcmp_ordered("<", a, self.const(0.125)), s, t)

    def total(self, values):
        """Sum in order (the first term first, as a running sum from zero gives)."""
        acc = values[0]
        for v in values[1:]:
            acc = self.add(acc, v)
        return acc


def _no_loop_vectorize(builder):
    """An empty side-effecting inline asm: keeps LLVM's loop vectoriser off the enclosing loop over
    coordinates, whose body is already vector code along a row of ``W``."""
    builder.asm(ir.FunctionType(ir.VoidType(), []), "", "", [], side_effect=True)


# scratch layout (float32, in units of LANES): G, M, V, OUT, then [F, B] tiles K, Q, Z, QW, BB, EG
_S_G, _S_M, _S_V, _S_OUT, _S_TILES = 0, 1, 2, 3, 4
_T_K, _T_Q, _T_Z, _T_QW, _T_B, _T_EG = range(6)


def _scratch_size(f: int, lanes: int) -> int:
    return lanes * (_S_TILES + 6 * f)


@intrinsic
def _mgg_block(
    typingctx, scr, wts, W, bm, n0, cnt, bc1, bc2, beta1, om1, beta2, om2, eps, ln_eps, base_lr, nh_l, f_l, b_l
):
    """The whole per-coordinate math of one block of B coordinates (those ``n0 .. n0+cnt``):
    moments and features from the scratch's G/M/V (new M/V written back), every head's memory
    step (its W/b rows read and written in place), the post-norm, o_proj and tanh into OUT."""
    lits = (nh_l, f_l, b_l)
    if not all(isinstance(x, types.IntegerLiteral) for x in lits):
        return None
    NH, F, B = (x.literal_value for x in lits)
    H, FF = NH * F, F * F
    bf16 = W.dtype == types.uint16
    o_q, o_k, o_v, o_o, o_pw, o_pb = 0, 2 * H, 4 * H, 6 * H, 7 * H, 8 * H
    o_lw, o_lb, o_lrw, o_lrb, o_tok = 9 * H, 10 * H, 11 * H, 11 * H + 2 * NH, 11 * H + 3 * NH
    sig = types.none(
        scr, wts, W, bm, n0, cnt, bc1, bc2, beta1, om1, beta2, om2, eps, ln_eps, base_lr, nh_l, f_l, b_l
    )

    def codegen(context, builder, sig, args):
        scr, wts, Wp, bm, n0, cnt, bc1, bc2, beta1, om1, beta2, om2, eps, ln_eps, base_lr = args[:15]
        v = _Vec(builder, B)
        eps_ln = v.splat(ln_eps)
        row = _Vec(builder, F)
        i64 = ir.IntType(64)

        def tile(t, j):  # offset of row j of [F, B] tile t in the scratch
            return (_S_TILES + t * F + j) * B

        def w(i):  # MGG weight i, splat over the lanes
            return v.splat(v.scalar(wts, i))

        # moments (in place, as the reference: m * beta1 + (1 - beta1) g; v * beta2 + (1 - beta2) g g)
        g = v.load(scr, _S_G * B)
        m = v.add(v.mul(v.load(scr, _S_M * B), v.splat(beta1)), v.mul(v.splat(om1), g))
        vv = v.add(v.mul(v.load(scr, _S_V * B), v.splat(beta2)), v.mul(v.mul(v.splat(om2), g), g))
        v.store(m, scr, _S_M * B)
        v.store(vv, scr, _S_V * B)
        denom = v.add(v.sqrt(v.div(vv, v.splat(bc2))), v.splat(eps))
        x0 = v.div(v.div(m, v.splat(bc1)), denom)
        x1 = v.div(g, denom)

        tok = builder.fadd(ir.Constant(_FLOAT, 1.0), v.scalar(wts, o_tok))
        tok = builder.select(
            builder.fcmp_ordered(">", tok, ir.Constant(_FLOAT, 0.0)), tok, ir.Constant(_FLOAT, 0.0)
        )
        tok_eta = v.splat(tok)
        inv_f = v.const(float(F))
        heads = []
        for h in range(NH):
            hf = h * F
            q, k, vals = [], [], []
            for i in range(F):
                r = 2 * (hf + i)
                q.append(v.add(v.mul(x0, w(o_q + r)), v.mul(x1, w(o_q + r + 1))))
                k.append(v.add(v.mul(x0, w(o_k + r)), v.mul(x1, w(o_k + r + 1))))
                vals.append(v.add(v.mul(x0, w(o_v + r)), v.mul(x1, w(o_v + r + 1))))
                v.store(k[i], scr, tile(_T_K, i))
                v.store(q[i], scr, tile(_T_Q, i))
            gate = v.sigmoid(
                v.add(v.add(v.mul(x0, w(o_lrw + 2 * h)), v.mul(x1, w(o_lrw + 2 * h + 1))), w(o_lrb + h))
            )
            eta = v.mul(tok_eta, v.div(v.mul(v.splat(base_lr), gate), inv_f))

            # memory read, one coordinate at a time along the rows of its W: z = k W + b, q W
            with cgutils.for_range(builder, cnt) as loop:
                c = loop.index
                _no_loop_vectorize(builder)
                base = builder.add(builder.mul(builder.add(n0, c), ir.Constant(i64, NH)), ir.Constant(i64, h))
                wb = builder.mul(base, ir.Constant(i64, FF))
                accz = accq = None
                for i in range(F):
                    wrow = row.load(Wp, builder.add(wb, ir.Constant(i64, i * F)), bf16)
                    ki = row.splat(row.scalar(scr, builder.add(c, ir.Constant(i64, tile(_T_K, i)))))
                    qi = row.splat(row.scalar(scr, builder.add(c, ir.Constant(i64, tile(_T_Q, i)))))
                    tz, tq = row.mul(ki, wrow), row.mul(qi, wrow)
                    accz = tz if accz is None else row.add(accz, tz)
                    accq = tq if accq is None else row.add(accq, tq)
                brow = row.load(bm, builder.mul(base, ir.Constant(i64, F)))
                z = row.add(accz, brow)
                for j in range(F):
                    jj = ir.Constant(_I32, j)
                    for t, val in ((_T_Z, z), (_T_QW, accq), (_T_B, brow)):
                        dst = builder.gep(scr, [builder.add(c, ir.Constant(i64, tile(t, j)))])
                        builder.store(builder.extract_element(val, jj), dst)

            z = [v.load(scr, tile(_T_Z, j)) for j in range(F)]
            qw = [v.load(scr, tile(_T_QW, j)) for j in range(F)]
            bb = [v.load(scr, tile(_T_B, j)) for j in range(F)]
            gam = [w(o_lw + hf + j) for j in range(F)]
            bet = [w(o_lb + hf + j) for j in range(F)]
            # inner loss 0.5 ||LN(z) - (v - k)||^2: its gradient wrt z with the layer norm fused
            mu = v.div(v.total(z), inv_f)
            cen = [v.sub(zj, mu) for zj in z]
            sd = v.sqrt(v.add(v.div(v.total([v.mul(d, d) for d in cen]), inv_f), eps_ln))
            zh = [v.div(d, sd) for d in cen]
            e = [
                v.mul(v.sub(v.add(bet[j], v.mul(gam[j], zh[j])), v.sub(vals[j], k[j])), gam[j])
                for j in range(F)
            ]
            e_sum = v.total(e)
            e_dot = v.total([v.mul(e[j], zh[j]) for j in range(F)])
            sdf = v.mul(sd, inv_f)
            eg = [
                v.mul(eta, v.div(v.sub(v.sub(v.mul(e[j], inv_f), e_sum), v.mul(zh[j], e_dot)), sdf))
                for j in range(F)
            ]
            for j in range(F):
                v.store(eg[j], scr, tile(_T_EG, j))
            # dual form: z_bar = q W - (q.k) eta_grad + b - eta_grad, then its layer norm
            qk = v.total([v.mul(q[j], k[j]) for j in range(F)])
            zb = [v.add(v.sub(qw[j], v.mul(qk, eg[j])), v.sub(bb[j], eg[j])) for j in range(F)]
            mu = v.div(v.total(zb), inv_f)
            cen = [v.sub(x, mu) for x in zb]
            sd = v.sqrt(v.add(v.div(v.total([v.mul(d, d) for d in cen]), inv_f), eps_ln))
            heads += [v.add(v.add(bet[j], v.mul(gam[j], v.div(cen[j], sd))), q[j]) for j in range(F)]

            # memory write, one coordinate at a time: W -= k eta_grad^T, b -= eta_grad
            with cgutils.for_range(builder, cnt) as loop:
                c = loop.index
                _no_loop_vectorize(builder)
                base = builder.add(builder.mul(builder.add(n0, c), ir.Constant(i64, NH)), ir.Constant(i64, h))
                wb = builder.mul(base, ir.Constant(i64, FF))
                egv = ir.Constant(row.t, None)
                for j in range(F):
                    val = row.scalar(scr, builder.add(c, ir.Constant(i64, tile(_T_EG, j))))
                    egv = builder.insert_element(egv, val, ir.Constant(_I32, j))
                for i in range(F):
                    off = builder.add(wb, ir.Constant(i64, i * F))
                    ki = row.splat(row.scalar(scr, builder.add(c, ir.Constant(i64, tile(_T_K, i)))))
                    row.store(row.sub(row.load(Wp, off, bf16), row.mul(ki, egv)), Wp, off, bf16)
                bo = builder.mul(base, ir.Constant(i64, F))
                row.store(row.sub(row.load(bm, bo), egv), bm, bo)

        # post-norm over the H features, o_proj, tanh
        inv_h = v.const(float(H))
        mu = v.div(v.total(heads), inv_h)
        cen = [v.sub(x, mu) for x in heads]
        rs = v.div(
            v.const(1.0), v.sqrt(v.add(v.div(v.total([v.mul(d, d) for d in cen]), inv_h), eps_ln))
        )
        r = v.total(
            [v.mul(v.add(v.mul(v.mul(cen[j], rs), w(o_pw + j)), w(o_pb + j)), w(o_o + j)) for j in range(H)]
        )
        v.store(v.tanh(r), scr, _S_OUT * B)
        return context.get_dummy_value()

    return sig, codegen


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


def _build(num_heads, head_dim, bf16_memory):
    """The step kernel of an MGG of ``num_heads`` heads of dim ``head_dim`` (sizes are compile-time
    constants of the generated vector code), as a plain Python function for ``njit``."""
    NH, F, B = num_heads, head_dim, LANES
    SCR = _scratch_size(F, B)
    M, V, OUT = _S_M * B, _S_V * B, _S_OUT * B
    MEM16 = int(bf16_memory)  # memory_W stored as bf16 bits
    LN_EPS, BASE_LR = _F32(reference.LN_EPS), _F32(reference.TTT_BASE_LR)  # closure cells: in the cache key

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


# ---- compilation, helper threads, launcher ---------------------------------------------------


def _jit(fn):
    """``njit`` with an on-disk cache where numba finds a writable place for it (next to this
    module, else NUMBA_CACHE_DIR or the user's cache directory); without one, compiled anew in
    each process."""
    try:
        return njit(nogil=True, cache=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True, error_model="numpy")(fn)


@functools.cache
def _kernel(num_heads: int, head_dim: int, bf16_memory: bool):
    return _jit(_build(num_heads, head_dim, bf16_memory))


_prepare_jit = _jit(_prepare)
