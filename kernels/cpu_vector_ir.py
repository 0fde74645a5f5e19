"""LLVM IR building blocks of the fused CPU MGG step (:mod:`mgg_fast.kernels.cpu_step`): numba
intrinsics for bit casts, raw pointers, atomics and stack scratch; :class:`_Vec`, which emits
float32 vector arithmetic (SIMD by construction, whatever LLVM's auto-vectoriser would decide);
and an in-register transpose (a shuffle network) between per-coordinate and per-feature vectors.
Only numba and llvmlite; nothing here is compiled until a kernel uses it.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

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
    coordinates, whose body is already vector code along a row of ``W`` (it would otherwise try
    to vectorise across coordinates with gathers and scatters)."""
    builder.asm(ir.FunctionType(ir.VoidType(), []), "", "", [], side_effect=True)


def _concat(builder, parts):
    """The vectors ``parts`` (a power of two of them, of one type) end to end."""
    while len(parts) > 1:
        n = parts[0].type.count
        mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
        parts = [builder.shuffle_vector(x, y, mask) for x, y in zip(parts[::2], parts[1::2], strict=True)]
    return parts[0]


def _part(builder, vec, r: int, n: int):
    """Elements ``r * n .. (r + 1) * n`` of ``vec``."""
    return builder.shuffle_vector(
        vec, vec, ir.Constant(ir.VectorType(_I32, n), list(range(r * n, (r + 1) * n)))
    )


_WORK = 16  # lanes of the vectors a transpose works on


@functools.cache
def _transpose_plan(n_in: int, len_in: int):
    """A shuffle network transposing ``n_in`` vectors of ``len_in`` (a row-major matrix) into
    ``len_in`` vectors of ``n_in``, on vectors of ``_WORK`` lanes: butterfly stages, each swapping
    one bit of the vector index with one bit of the lane index (every output vector a two-source
    shuffle), then one lane permutation per vector. Returns ``(stages, final)``: per stage the
    ``(out, a, b, mask)`` of each output vector; ``final`` the ``(out, src, mask)`` permutations.
    Planned by following every element (``n_in``, ``len_in``: powers of two, product >= 16)."""
    lanes = _WORK
    nv = n_in * len_in // lanes
    lane_bits, vec_bits = lanes.bit_length() - 1, nv.bit_length() - 1
    # state[v][x]: where element (a, b) at vector v, lane x must go, as a flat output index b*n_in + a
    state = [[0] * lanes for _ in range(nv)]
    for a in range(n_in):
        for b in range(len_in):
            flat = a * len_in + b
            state[flat // lanes][flat % lanes] = b * n_in + a

    def position_of(bit):  # the flat-index bit of the current layout that carries output bit `bit`
        for k in range(lane_bits + vec_bits):
            if all(
                state[f // lanes][f % lanes] ^ state[(f ^ (1 << k)) // lanes][(f ^ (1 << k)) % lanes]
                == 1 << bit
                for f in range(nv * lanes)
            ):
                return k
        raise AssertionError("not a bit permutation")

    stages = []
    for p in range(vec_bits):
        q = position_of(lane_bits + p)
        if q == lane_bits + p:
            continue
        if q >= lane_bits:
            raise AssertionError("a relabelling of vectors is not needed for the shapes used")
        stage, new = [], [None] * nv
        for v in range(nv):
            if (v >> p) & 1:
                continue
            v1 = v | (1 << p)
            for s, out in ((0, v), (1, v1)):
                mask, vals = [], []
                for x in range(lanes):
                    t = (x >> q) & 1
                    lane = (x & ~(1 << q)) | (s << q)
                    mask.append(t * lanes + lane)
                    vals.append(state[v1 if t else v][lane])
                new[out] = vals
                stage.append((out, v, v1, mask))
        state = new
        stages.append(stage)
    final = []
    for v in range(nv):
        out = state[v][0] // lanes
        final.append((out, v, [state[v].index(out * lanes + x) for x in range(lanes)]))
    return stages, final


def _transpose(builder, vecs):
    """``vecs``: ``n`` vectors of ``m`` floats (a row-major n x m matrix); returns its transpose,
    ``m`` vectors of ``n``, by the shuffle network of :func:`_transpose_plan`."""
    n, m = len(vecs), vecs[0].type.count
    if m < _WORK:  # join consecutive inputs into work vectors
        k = _WORK // m
        work = [_concat(builder, vecs[i : i + k]) for i in range(0, n, k)]
    else:  # split inputs into work vectors
        work = [_part(builder, x, r, _WORK) for x in vecs for r in range(m // _WORK)]
    stages, final = _transpose_plan(n, m)
    i32 = ir.VectorType(_I32, _WORK)
    for stage in stages:
        new = [None] * len(work)
        for out, a, b, mask in stage:
            new[out] = builder.shuffle_vector(work[a], work[b], ir.Constant(i32, mask))
        work = new
    done = [None] * len(work)
    for out, src, mask in final:
        done[out] = builder.shuffle_vector(work[src], work[src], ir.Constant(i32, mask))
    if n < _WORK:  # split work vectors into outputs of n
        return [_part(builder, x, r, n) for x in done for r in range(_WORK // n)]
    return [_concat(builder, done[i : i + n // _WORK]) for i in range(0, len(done), n // _WORK)]
