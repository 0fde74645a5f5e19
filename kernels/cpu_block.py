"""Code generation of one block of the fused CPU MGG step (:mod:`mgg_fast.kernels.cpu_step`): the
whole per-coordinate math of ``LANES`` coordinates as one numba intrinsic, :func:`_mgg_block`,
built from :mod:`mgg_fast.kernels.cpu_vector_ir`. The lanes are the coordinates of the block
(structure of arrays); a coordinate's memory ``W [f, f]`` is read and written row by row as
vectors of ``f`` (two rows at once for f = 8), and for a full block with f <= 16 the 16
coordinates are unrolled and their rows transposed in registers. The operations follow
:func:`mgg_fast.reference.memory_layer` term by term, in float32, without fast-math.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu_vector_ir import _FLOAT, _I32, _I64, _WORK, _concat, _no_loop_vectorize, _part, _transpose, _Vec

ROW_WIDTH = 16  # a coordinate's memory is read and written in vectors of max(f, ROW_WIDTH) floats
UNROLL = True  # full blocks with f <= 16: unrolled over the coordinates, transposed in registers
PREFETCH_AHEAD = 64  # coordinates: each block prefetches the W and b rows of the block this far ahead

# The scratch of a block (float32, on the stack): rows of LANES values, G M V OUT, then the
# [F, LANES] tiles K Q Z QW B EG (a head's k, q; z = kW + b, qW, b as read per coordinate; eta_grad)
_ROW_G, _ROW_M, _ROW_V, _ROW_OUT, _ROW_TILES = range(5)
_TILE_K, _TILE_Q, _TILE_Z, _TILE_QW, _TILE_B, _TILE_EG = range(6)


def _scratch_size(f: int, lanes: int) -> int:
    return lanes * (_ROW_TILES + 6 * f)


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
        the hardware prefetcher alone leaves one thread latency-bound on these streams
        (bench/RESULTS.md). A prefetch past the end of a buffer is harmless (a hint: it cannot
        fault)."""
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
