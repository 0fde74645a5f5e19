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
ROW_WIDTH = 16  # a coordinate's memory is read and written in vectors of max(f, ROW_WIDTH) floats
UNROLL = True  # full blocks with f <= 16: unrolled over the coordinates, transposed in registers
PREFETCH_AHEAD = 64  # coordinates: each block prefetches the W and b rows of the block this far ahead

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
    coordinates, whose body is already vector code along a row of ``W`` (it would otherwise try
    to vectorise across coordinates with gathers and scatters)."""
    builder.asm(ir.FunctionType(ir.VoidType(), []), "", "", [], side_effect=True)


# The scratch of a block (float32, on the stack): rows of LANES values, G M V OUT, then the
# [F, LANES] tiles K Q Z QW B EG (a head's k, q; z = kW + b, qW, b as read per coordinate; eta_grad)
_ROW_G, _ROW_M, _ROW_V, _ROW_OUT, _ROW_TILES = range(5)
_TILE_K, _TILE_Q, _TILE_Z, _TILE_QW, _TILE_B, _TILE_EG = range(6)


def _scratch_size(f: int, lanes: int) -> int:
    return lanes * (_ROW_TILES + 6 * f)


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


class _Block:
    """Code generation for one block: ``v`` emits the lane-parallel math (a lane per coordinate),
    ``wide`` one coordinate's math along ``rows`` consecutive rows of its memory at once (two
    rows of 8 make one 16-wide vector)."""

    def __init__(self, builder, scr, nh: int, f: int, lanes: int):
        self.b, self.scr, self.nh, self.f, self.lanes = builder, scr, nh, f, lanes
        self.rows = max(1, ROW_WIDTH // f)
        self.v, self.row, self.wide = _Vec(builder, lanes), _Vec(builder, f), _Vec(builder, f * self.rows)

    def offset(self, tile: int, j: int) -> int:
        """Scratch offset of row ``j`` of ``tile``."""
        return (_ROW_TILES + tile * self.f + j) * self.lanes

    def lane(self, tile: int, j: int, c) -> ir.Value:
        """Pointer to coordinate ``c``'s element ``j`` of ``tile``."""
        return self.b.gep(self.scr, [self.b.add(c, ir.Constant(_I64, self.offset(tile, j)))])

    def splats(self, tile: int, i: int, c) -> ir.Value:
        """Coordinate ``c``'s elements ``i .. i + rows`` of ``tile``, each repeated ``f`` times."""
        return _concat(
            self.b, [self.row.splat(self.b.load(self.lane(tile, i + r, c))) for r in range(self.rows)]
        )

    def for_coords(self, n0, cnt, h):
        """Loop over the block's coordinates ``c < cnt``: yields ``(c, base)`` with ``base`` the
        index of coordinate ``n0 + c``'s head ``h`` in the ``[N, nh]`` rows of the memory."""
        b = self.b
        with cgutils.for_range(b, cnt) as loop:
            _no_loop_vectorize(b)
            base = b.add(b.mul(b.add(n0, loop.index), ir.Constant(_I64, self.nh)), ir.Constant(_I64, h))
            yield loop.index, base

    def memory_read(self, Wp, bm, n0, cnt, h, bf16: bool) -> None:
        """Per coordinate, along the rows of its W: z = k W + b and q W into the Z/QW/B tiles
        (with several rows per vector, each part sums every rows-th row, the parts are added)."""
        b, row, wide, f, rows = self.b, self.row, self.wide, self.f, self.rows
        for c, base in self.for_coords(n0, cnt, h):
            wb = b.mul(base, ir.Constant(_I64, f * f))
            z = qw = None
            for i in range(0, f, rows):
                w_i = wide.load(Wp, b.add(wb, ir.Constant(_I64, i * f)), bf16)
                kz = wide.mul(self.splats(_TILE_K, i, c), w_i)
                qz = wide.mul(self.splats(_TILE_Q, i, c), w_i)
                z = kz if z is None else wide.add(z, kz)
                qw = qz if qw is None else wide.add(qw, qz)
            if rows > 1:
                z = row.total([_part(b, z, r, f) for r in range(rows)])
                qw = row.total([_part(b, qw, r, f) for r in range(rows)])
            bias = row.load(bm, b.mul(base, ir.Constant(_I64, f)))
            z = row.add(z, bias)
            for j in range(f):
                jj = ir.Constant(_I32, j)
                for tile, val in ((_TILE_Z, z), (_TILE_QW, qw), (_TILE_B, bias)):
                    b.store(b.extract_element(val, jj), self.lane(tile, j, c))

    def prefetch(self, Wp, bm, n0, bf16: bool) -> None:
        """Prefetch (for writing) the ``W``/``b`` rows of the coordinates ``PREFETCH_AHEAD`` on:
        the hardware prefetcher alone leaves one thread latency-bound on these streams (measured
        at 1M coordinates: 37 -> 25 ms on one thread, 19 -> 15.5 ms on two). A prefetch past the
        end of a buffer is harmless (a hint: it cannot fault)."""
        b, i8p = self.b, ir.PointerType(ir.IntType(8))
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
        prefetch = cgutils.get_or_insert_function(b.module, fnty, "llvm.prefetch.p0")
        ahead = b.add(n0, ir.Constant(_I64, PREFETCH_AHEAD))
        per_coord = self.nh * self.f
        for ptr, elems, size in ((Wp, per_coord * self.f, 2 if bf16 else 4), (bm, per_coord, 4)):
            start = b.bitcast(b.gep(ptr, [b.mul(ahead, ir.Constant(_I64, elems))]), i8p)
            for line in range(0, self.lanes * elems * size, 64):
                args = [b.gep(start, [ir.Constant(_I64, line)]), *(ir.Constant(_I32, x) for x in (1, 3, 1))]
                b.call(prefetch, args)  # write, keep in all cache levels, data

    def coord_base(self, n0, c: int, h: int):
        b = self.b
        return b.add(b.mul(b.add(n0, ir.Constant(_I64, c)), ir.Constant(_I64, self.nh)), ir.Constant(_I64, h))

    def memory_read_full(self, Wp, bm, n0, h, bf16: bool) -> None:
        """:meth:`memory_read` of a full block, unrolled over its coordinates, the results
        transposed in registers and stored as whole tile rows (no element-wise stores)."""
        b, row, wide, f, rows = self.b, self.row, self.wide, self.f, self.rows
        zs, qws, biases = [], [], []
        for c in range(self.lanes):
            base = self.coord_base(n0, c, h)
            cc = ir.Constant(_I64, c)
            wb = b.mul(base, ir.Constant(_I64, f * f))
            z = qw = None
            for i in range(0, f, rows):
                w_i = wide.load(Wp, b.add(wb, ir.Constant(_I64, i * f)), bf16)
                kz = wide.mul(self.splats(_TILE_K, i, cc), w_i)
                qz = wide.mul(self.splats(_TILE_Q, i, cc), w_i)
                z = kz if z is None else wide.add(z, kz)
                qw = qz if qw is None else wide.add(qw, qz)
            if rows > 1:
                z = row.total([_part(b, z, r, f) for r in range(rows)])
                qw = row.total([_part(b, qw, r, f) for r in range(rows)])
            bias = row.load(bm, b.mul(base, ir.Constant(_I64, f)))
            zs.append(row.add(z, bias))
            qws.append(qw)
            biases.append(bias)
        for tile, vecs in ((_TILE_Z, zs), (_TILE_QW, qws), (_TILE_B, biases)):
            for j, vec in enumerate(_transpose(b, vecs)):
                self.v.store(vec, self.scr, self.offset(tile, j))

    def memory_write_full(self, Wp, bm, n0, h, bf16: bool, eta_grad) -> None:
        """:meth:`memory_write` of a full block, unrolled, ``eta_grad`` (the lane vectors)
        transposed to per-coordinate vectors in registers."""
        b, row, wide, f, rows = self.b, self.row, self.wide, self.f, self.rows
        for c, eg in enumerate(_transpose(b, eta_grad)):
            base = self.coord_base(n0, c, h)
            cc = ir.Constant(_I64, c)
            eg_rows = _concat(b, [eg] * rows)
            wb = b.mul(base, ir.Constant(_I64, f * f))
            for i in range(0, f, rows):
                off = b.add(wb, ir.Constant(_I64, i * f))
                k_i = self.splats(_TILE_K, i, cc)
                wide.store(wide.sub(wide.load(Wp, off, bf16), wide.mul(k_i, eg_rows)), Wp, off, bf16)
            bo = b.mul(base, ir.Constant(_I64, f))
            row.store(row.sub(row.load(bm, bo), eg), bm, bo)

    def memory_write(self, Wp, bm, n0, cnt, h, bf16: bool) -> None:
        """Per coordinate: W -= k eta_grad^T, b -= eta_grad (eta_grad from the EG tile)."""
        b, row, wide, f, rows = self.b, self.row, self.wide, self.f, self.rows
        for c, base in self.for_coords(n0, cnt, h):
            eg = ir.Constant(row.t, None)
            for j in range(f):
                eg = b.insert_element(eg, b.load(self.lane(_TILE_EG, j, c)), ir.Constant(_I32, j))
            eg_rows = _concat(b, [eg] * rows)
            wb = b.mul(base, ir.Constant(_I64, f * f))
            for i in range(0, f, rows):
                off = b.add(wb, ir.Constant(_I64, i * f))
                k_i = self.splats(_TILE_K, i, c)
                wide.store(wide.sub(wide.load(Wp, off, bf16), wide.mul(k_i, eg_rows)), Wp, off, bf16)
            bo = b.mul(base, ir.Constant(_I64, f))
            row.store(row.sub(row.load(bm, bo), eg), bm, bo)


@intrinsic
def _mgg_block(
    typingctx,
    scr,
    wts,
    W,
    bm,
    n0,
    cnt,
    bc1,
    bc2,
    beta1,
    om1,
    beta2,
    om2,
    eps,
    ln_eps,
    base_lr,
    nh_l,
    f_l,
    b_l,
):
    """The whole per-coordinate math of one block of ``LANES`` coordinates (those ``n0 .. n0+cnt``
    count; the lanes past ``cnt`` compute on stale scratch values and are not stored): moments and
    features from the scratch's G/M/V rows (the new M/V written back), each head's memory step
    (its rows of ``W``/``b`` read and written in place), the post-norm, o_proj and tanh into OUT.
    The operations follow :func:`mgg_fast.reference.memory_layer` term by term (same order of
    additions where it has one), in float32."""
    lits = (nh_l, f_l, b_l)
    if not all(isinstance(x, types.IntegerLiteral) for x in lits):
        return None
    NH, F, B = (x.literal_value for x in lits)
    H = NH * F
    bf16 = W.dtype == types.uint16
    # offsets of the MGGWeights tensors in the flat weight vector
    o_q, o_k, o_v, o_o, o_pw, o_pb = 0, 2 * H, 4 * H, 6 * H, 7 * H, 8 * H
    o_lw, o_lb, o_lrw, o_lrb, o_tok = 9 * H, 10 * H, 11 * H, 11 * H + 2 * NH, 11 * H + 3 * NH
    sig = types.none(
        scr, wts, W, bm, n0, cnt, bc1, bc2, beta1, om1, beta2, om2, eps, ln_eps, base_lr, nh_l, f_l, b_l
    )

    def codegen(context, builder, sig, args):
        scr, wts, Wp, bm, n0, cnt, bc1, bc2, beta1, om1, beta2, om2, eps, ln_eps, base_lr = args[:15]
        blk = _Block(builder, scr, NH, F, B)
        unroll = UNROLL and F * F <= 256 and B == _WORK  # full blocks unrolled, transposed in registers
        blk.prefetch(Wp, bm, n0, bf16)
        v = blk.v
        eps_ln = v.splat(ln_eps)

        def w(i):  # MGG weight i, the same in every lane
            return v.splat(v.scalar(wts, i))

        def layer_norm(xs, n):  # (x - mean) and the std over the list xs, biased, eps LN_EPS
            mean = v.div(v.total(xs), v.const(n))
            centered = [v.sub(x, mean) for x in xs]
            return centered, v.sqrt(
                v.add(v.div(v.total([v.mul(d, d) for d in centered]), v.const(n)), eps_ln)
            )

        # moments, in place as the reference: m * beta1 + (1 - beta1) g, v * beta2 + (1 - beta2) g g
        g = v.load(scr, _ROW_G * B)
        m = v.add(v.mul(v.load(scr, _ROW_M * B), v.splat(beta1)), v.mul(v.splat(om1), g))
        sq = v.add(v.mul(v.load(scr, _ROW_V * B), v.splat(beta2)), v.mul(v.mul(v.splat(om2), g), g))
        v.store(m, scr, _ROW_M * B)
        v.store(sq, scr, _ROW_V * B)
        denom = v.add(v.sqrt(v.div(sq, v.splat(bc2))), v.splat(eps))
        x0, x1 = v.div(v.div(m, v.splat(bc1)), denom), v.div(g, denom)  # the features [m~, g~]

        tok = builder.fadd(ir.Constant(_FLOAT, 1.0), v.scalar(wts, o_tok))
        zero = ir.Constant(_FLOAT, 0.0)
        token_eta = v.splat(builder.select(builder.fcmp_ordered(">", tok, zero), tok, zero))
        f_ = v.const(F)
        heads = []  # the post-norm's input, feature by feature
        for h in range(NH):
            hf = h * F
            q, k, vals = [], [], []
            for i in range(F):
                r = 2 * (hf + i)
                q.append(v.add(v.mul(x0, w(o_q + r)), v.mul(x1, w(o_q + r + 1))))
                k.append(v.add(v.mul(x0, w(o_k + r)), v.mul(x1, w(o_k + r + 1))))
                vals.append(v.add(v.mul(x0, w(o_v + r)), v.mul(x1, w(o_v + r + 1))))
                v.store(k[i], scr, blk.offset(_TILE_K, i))
                v.store(q[i], scr, blk.offset(_TILE_Q, i))
            lr_in = v.add(v.add(v.mul(x0, w(o_lrw + 2 * h)), v.mul(x1, w(o_lrw + 2 * h + 1))), w(o_lrb + h))
            eta = v.mul(token_eta, v.div(v.mul(v.splat(base_lr), v.sigmoid(lr_in)), f_))

            if unroll:
                full = builder.icmp_signed("==", cnt, ir.Constant(cnt.type, B))
                with builder.if_else(full) as (then, otherwise):
                    with then:
                        blk.memory_read_full(Wp, bm, n0, h, bf16)
                    with otherwise:
                        blk.memory_read(Wp, bm, n0, cnt, h, bf16)
            else:
                blk.memory_read(Wp, bm, n0, cnt, h, bf16)
            z = [v.load(scr, blk.offset(_TILE_Z, j)) for j in range(F)]
            qw = [v.load(scr, blk.offset(_TILE_QW, j)) for j in range(F)]
            bias = [v.load(scr, blk.offset(_TILE_B, j)) for j in range(F)]
            gam = [w(o_lw + hf + j) for j in range(F)]
            bet = [w(o_lb + hf + j) for j in range(F)]

            # inner loss 0.5 ||LN(z) - (v - k)||^2: its gradient wrt z with the layer norm fused
            centered, std = layer_norm(z, F)
            z_hat = [v.div(d, std) for d in centered]
            e = [
                v.mul(v.sub(v.add(bet[j], v.mul(gam[j], z_hat[j])), v.sub(vals[j], k[j])), gam[j])
                for j in range(F)
            ]
            e_sum, e_dot = v.total(e), v.total([v.mul(e[j], z_hat[j]) for j in range(F)])
            std_f = v.mul(std, f_)
            grad_z = [
                v.div(v.sub(v.sub(v.mul(e[j], f_), e_sum), v.mul(z_hat[j], e_dot)), std_f) for j in range(F)
            ]
            eta_grad = [v.mul(eta, gz) for gz in grad_z]
            for j in range(F):
                v.store(eta_grad[j], scr, blk.offset(_TILE_EG, j))
            if unroll:
                with builder.if_else(full) as (then, otherwise):
                    with then:
                        blk.memory_write_full(Wp, bm, n0, h, bf16, eta_grad)
                    with otherwise:
                        blk.memory_write(Wp, bm, n0, cnt, h, bf16)
            else:
                blk.memory_write(Wp, bm, n0, cnt, h, bf16)

            # dual form: z_bar = q W - (q.k) eta_grad + (b - eta_grad), its layer norm, + q
            qk = v.total([v.mul(q[j], k[j]) for j in range(F)])
            z_bar = [
                v.add(v.sub(qw[j], v.mul(qk, eta_grad[j])), v.sub(bias[j], eta_grad[j])) for j in range(F)
            ]
            centered, std = layer_norm(z_bar, F)
            heads += [v.add(v.add(bet[j], v.mul(gam[j], v.div(centered[j], std))), q[j]) for j in range(F)]

        # post-norm over the H features (affine), o_proj, tanh
        centered, std = layer_norm(heads, H)
        rstd = v.div(v.const(1.0), std)
        out = v.total(
            [
                v.mul(v.add(v.mul(v.mul(centered[j], rstd), w(o_pw + j)), w(o_pb + j)), w(o_o + j))
                for j in range(H)
            ]
        )
        v.store(v.tanh(out), scr, _ROW_OUT * B)
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
    M, V, OUT = _ROW_M * B, _ROW_V * B, _ROW_OUT * B
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
