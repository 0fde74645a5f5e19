"""The fused CPU step (``mgg_fast.kernels.cpu_step``) against the parity vectors and the reference.

Each test steps the same parameters twice: with the reference optimizer (``backend="reference"``)
and with :func:`cpu_mgg_step_` on a pack made as the optimizer makes one
(:class:`mgg_fast.optim.packed_state.PackedState`), then compares parameters, state and step counts.
The first run compiles one kernel per MGG size and memory dtype (seconds each; cached on disk).
The larger differential fuzz is marked ``slow``.
"""

import copy
import random

import pytest
import torch
from helpers import F32, mgg_from_parity, random_mgg
from mgg_fast.kernels.cpu_step import (
    CHUNK,
    cpu_mgg_step_,
    cpu_step_available,
    cpu_step_unavailable_reason,
    default_threads,
)
from torch.testing import assert_close

from mgg_fast import MGGOptimizer
from mgg_fast.optim.packed_state import PackedState

pytestmark = pytest.mark.skipif(not cpu_step_available(), reason=f"{cpu_step_unavailable_reason()}")

SHAPES = [(0,), (), (1,), (3, 5), (130,), (2, 4)]  # 130 spans blocks of 16 and is not a multiple
STATE_KEYS = ("exp_avg", "exp_avg_sq", "memory_W", "memory_b", "step")
PARAM_TOL = {  # one rounding of an fp32 result to the parameter's dtype may differ
    torch.float32: F32,
    torch.float64: F32,
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def make_grads(params, seed, scale=2.0, none=()):
    gen = torch.Generator().manual_seed(seed)
    return [
        None if i in none else (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        for i, p in enumerate(params)
    ]


def same_layout(p):
    """A copy of ``p`` with its strides (``clone`` makes a non-dense tensor contiguous)."""
    if p.is_contiguous() or p.dim() == 0:
        return p.clone()
    out = torch.empty_strided((p.numel() * 2,), (1,), dtype=p.dtype).as_strided(p.shape, p.stride())
    return out.copy_(p)


class Twin:
    """The same parameters under the reference optimizer and under the CPU kernel on a pack."""

    def __init__(self, mgg, params, *, lr=0.05, betas=(0.9, 0.99), eps=1e-8, memory_W_dtype=None):
        self.ref_params = [torch.nn.Parameter(same_layout(p)) for p in params]
        self.params = [same_layout(p) for p in params]
        self.opt = MGGOptimizer(
            self.ref_params, copy.deepcopy(mgg), lr=lr, betas=betas, eps=eps, backend="reference",
            memory_W_dtype=memory_W_dtype,
        )  # fmt: skip
        mem = memory_W_dtype or torch.float32
        self.pack = PackedState.pack(
            self.params, [None] * len(params), mgg.W1, mgg.b1[:, 0, :], torch.float32, mem
        )
        self.initial = [{k: v.clone() for k, v in view.items()} for view in self.pack.views]
        self.weights = mgg.weights()
        self.kw = {
            "num_heads": mgg.num_heads, "head_dim": mgg.head_dim,
            "lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps,
        }  # fmt: skip
        self.skipped = torch.zeros(())

    def buffers(self):
        pk = self.pack
        return (pk.exp_avg, pk.exp_avg_sq, pk.memory_W, pk.memory_b, pk.steps)

    def kernel_step(self, grads, found_inf=0.0, threads=1, weights=None):
        found = torch.tensor([found_inf])
        cpu_mgg_step_(
            self.params, grads, *self.buffers(), self.weights if weights is None else weights,
            **self.kw, found_inf=found, skipped=self.skipped, threads=threads,
        )  # fmt: skip
        return found

    def step(self, grads, threads=1):
        for p, g in zip(self.ref_params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        self.opt.step()
        self.kernel_step(grads, threads=threads)

    def check(self, param_tol=F32):
        for i, (p, q) in enumerate(zip(self.params, self.ref_params, strict=True)):
            assert p.dtype == q.dtype and p.stride() == q.stride(), f"parameter {i} changed dtype or layout"
            assert_close(p, q.detach(), **param_tol, msg=lambda m, i=i: f"parameter {i}: {m}")
            view, st = self.pack.views[i], self.opt.state.get(q)
            if not st:  # never stepped: its state is as packed, its count 0
                for key in STATE_KEYS:
                    assert torch.equal(view[key], self.initial[i][key]), f"parameter {i} {key}"
                continue
            for key in STATE_KEYS:
                if key == "memory_W" and view[key].dtype == torch.bfloat16:
                    assert_bf16_memory_close(view[key], st[key])
                    continue
                assert view[key].dtype == st[key].dtype
                assert_close(view[key], st[key], **F32, msg=lambda m, i=i, k=key: f"parameter {i} {k}: {m}")

    def snapshot(self):
        return [p.clone() for p in self.params], [b.clone() for b in self.buffers()]

    def assert_unchanged(self, snap):
        old_params, old_buffers = snap
        for p, old in zip(self.params, old_params, strict=True):
            assert torch.equal(p, old)
        for b, old in zip(self.buffers(), old_buffers, strict=True):
            assert torch.equal(b, old)


def assert_bf16_memory_close(W, ref_W):
    """memory_W stored as bf16: both round to nearest-even, so only elements whose fp32 values
    straddle a rounding boundary may differ, by one ulp (carried into later steps)."""
    assert W.dtype == ref_W.dtype == torch.bfloat16
    largest_ulp = 2**-7 * ref_W.float().abs().max().item() if ref_W.numel() else 0.0
    assert_close(W.float(), ref_W.float(), rtol=2**-7, atol=largest_ulp)
    assert torch.ne(W, ref_W).sum().item() <= 0.01 * W.numel() + 1  # truncating would change ~half


@pytest.mark.parametrize("case", ["hetero", "official_homog"])
def test_parity_vectors(step_vectors, case):
    d = step_vectors
    c = d["cases"][case]
    mgg = mgg_from_parity(d, torch.float32)
    params = [p.float().clone() for p in c["params_init"]]
    pack = PackedState.pack(
        params, [None] * len(params), mgg.W1, mgg.b1[:, 0, :], torch.float32, torch.float32
    )
    kw = {"num_heads": 1, "head_dim": 8, "lr": d["adapt_lr"], "beta1": d["beta1"], "beta2": d["beta2"]}
    for t in range(d["T"]):
        grads = [g.float() for g in c["grads"][t]]
        cpu_mgg_step_(
            params, grads, pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b, pack.steps,
            mgg.weights(), **kw, eps=d["eps"], found_inf=torch.zeros(1),
        )  # fmt: skip
        for i, p in enumerate(params):
            assert_close(p.double(), c["params_f64"][t][i], **F32)
            assert_close(pack.views[i]["exp_avg"].double(), c["m_f64"][t][i], **F32)
            assert_close(pack.views[i]["exp_avg_sq"].double(), c["v_f64"][t][i], **F32)
        assert pack.steps.tolist() == [t + 1.0] * len(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_reference_param_dtypes(dtype):
    twin = Twin(random_mgg(seed=1), make_params(SHAPES, dtype))
    for step in range(3):
        twin.step(make_grads(twin.params, step))
        twin.check(PARAM_TOL[dtype])


@pytest.mark.parametrize(("hidden", "heads"), [(8, 1), (32, 2)])
def test_bf16_memory(hidden, heads):
    twin = Twin(random_mgg(hidden, heads, seed=4), make_params(SHAPES), memory_W_dtype=torch.bfloat16)
    for step in range(3):
        twin.step(make_grads(twin.params, step, none=(3,) if step == 1 else ()))
        twin.check({"rtol": 1e-4, "atol": 1e-5})
    assert twin.pack.steps[3].item() == 2.0


@pytest.mark.parametrize(("hidden", "heads"), [(16, 2), (24, 3), (32, 1), (64, 2), (64, 4), (64, 8)])
def test_mgg_sizes(hidden, heads):
    twin = Twin(
        random_mgg(hidden, heads, seed=hidden + heads), make_params([(5, 7), (60,), ()]), betas=(0.8, 0.999)
    )
    for step in range(2):
        twin.step(make_grads(twin.params, 10 + step, scale=5.0))
        twin.check()


def test_mixed_param_dtypes_in_one_group():
    params = [p.to(dt) for p, dt in zip(make_params([(6,), (9,), (40,), (3,)]), PARAM_TOL, strict=True)]
    twin = Twin(random_mgg(seed=2), params)
    for step in range(2):
        twin.step(make_grads(twin.params, step))
        twin.check(PARAM_TOL[torch.bfloat16])


def test_params_without_grad_are_untouched_and_keep_their_step():
    twin = Twin(random_mgg(seed=3), make_params(SHAPES))
    twin.step(make_grads(twin.params, 0, none=(4,)))
    twin.check()
    kept = twin.params[3].clone(), twin.pack.views[3]["memory_W"].clone()
    twin.step(make_grads(twin.params, 1, none=(3, 4)))
    twin.check()
    assert torch.equal(twin.params[3], kept[0]) and torch.equal(twin.pack.views[3]["memory_W"], kept[1])
    assert twin.pack.steps.tolist() == [2.0, 2.0, 2.0, 1.0, 0.0, 2.0]
    twin.step(make_grads(twin.params, 2))  # per-parameter counts and bias corrections now differ
    twin.check()
    assert twin.pack.steps.tolist() == [3.0, 3.0, 3.0, 2.0, 1.0, 3.0]


def test_non_contiguous_params_and_grads():
    base = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    twin = Twin(random_mgg(seed=4), [base.t(), torch.randn(20), torch.randn(4, 6)[:, ::2]])
    assert not twin.params[0].is_contiguous() and not twin.params[2].is_contiguous()
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(6, 9, generator=gen).t(), torch.randn(40, generator=gen)[::2], torch.randn(4, 3)]
        twin.step(grads)
        twin.check()
    assert twin.params[0].stride() == (1, 9), "the parameter keeps its layout"


def test_found_inf_writes_nothing_and_counts_the_skip():
    twin = Twin(random_mgg(seed=7), make_params([(10,), (3, 3), (40,)]))
    twin.step(make_grads(twin.params, 0))
    snap = twin.snapshot()
    grads = make_grads(twin.params, 1)
    found = twin.kernel_step(grads, found_inf=1.0)
    twin.assert_unchanged(snap)
    assert found.item() == 1.0 and twin.skipped.item() == 1.0
    # a non-finite MGG weight: the kernel sets found_inf itself
    weights = [w.detach().clone() for w in twin.weights]
    weights[3][0, 2] = float("nan")
    found = twin.kernel_step(grads, weights=weights)
    twin.assert_unchanged(snap)
    assert found.item() == 1.0 and twin.skipped.item() == 2.0
    # clear: the step is taken and the counter stays
    found = twin.kernel_step(grads)
    assert found.item() == 0.0 and twin.skipped.item() == 2.0
    assert twin.pack.steps.tolist() == [2.0, 2.0, 2.0]
    assert not torch.equal(twin.params[0], snap[0][0])


def test_skip_counter_optional():
    twin = Twin(random_mgg(seed=8), make_params([(5,)]))
    cpu_mgg_step_(
        twin.params, make_grads(twin.params, 0), *twin.buffers(), twin.weights, **twin.kw,
        found_inf=torch.ones(1),
    )  # fmt: skip
    assert twin.pack.steps.tolist() == [0.0]


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_identical_results(threads):
    """Several chunks over tensors of uneven sizes: any thread count gives bit-identical results
    (every coordinate is computed the same way whichever thread takes its chunk)."""
    shapes = [(3 * CHUNK + 100,), (CHUNK - 1,), (7,), (2 * CHUNK,)]
    twins = [Twin(random_mgg(seed=9), make_params(shapes, torch.bfloat16)) for _ in range(2)]
    for step in range(2):
        grads = make_grads(twins[0].params, step)
        twins[0].kernel_step(grads, threads=1)
        twins[1].kernel_step(grads, threads=threads)
    for a, b in zip(twins[0].snapshot(), twins[1].snapshot(), strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize(("betas", "start_step"), [((0.0, 0.0), 0), ((0.9, 0.999), 0), ((0.9, 0.99), 999)])
def test_bias_corrections_across_betas_and_steps(betas, start_step):
    twin = Twin(random_mgg(seed=12), make_params([(50,), (3, 4)]), betas=betas)
    twin.step(make_grads(twin.params, 0))
    for q in twin.ref_params:
        twin.opt.state[q]["step"].fill_(start_step + 1)
    twin.pack.steps.fill_(start_step + 1)
    for step in range(1, 3):
        twin.step(make_grads(twin.params, step))
        twin.check()


def test_invalid_calls_raise_and_change_nothing():
    """Sizes the kernel is not built for, and anything that would make it read or write through
    an address it should not, raise before anything changes."""
    twin = Twin(random_mgg(seed=13), make_params([(4,), (3,)]))
    grads = make_grads(twin.params, 0)
    m, v, W, b, steps = twin.buffers()
    z = torch.zeros(1)

    def call(params=twin.params, grads=grads, buffers=(m, v, W, b, steps), **kw):
        cpu_mgg_step_(params, grads, *buffers, twin.weights, **{**twin.kw, "found_inf": z, **kw})

    for heads, dim in [(1, 12), (3, 32), (9, 8), (0, 8)]:
        with pytest.raises(ValueError, match="head dim"):
            call(num_heads=heads, head_dim=dim)
    with pytest.raises(TypeError, match="exp_avg"):
        call(buffers=(m.double(), v, W, b, steps))
    with pytest.raises(TypeError, match="memory_W"):
        call(buffers=(m, v, W.half(), b, steps))
    with pytest.raises(ValueError, match="state sizes"):
        call(buffers=(m[:-1], v[:-1], W[:-1], b[:-1], steps))
    with pytest.raises(ValueError, match="state sizes"):
        call(params=twin.params[:1], grads=grads[:1])
    with pytest.raises(TypeError, match="dtype and shape"):
        call(grads=[grads[0].double(), grads[1]])
    with pytest.raises(TypeError, match="dtype and shape"):
        call(grads=[grads[0][:2], grads[1]])
    with pytest.raises(TypeError, match="parameters must be"):
        call(params=[twin.params[0].int(), twin.params[1]], grads=[grads[0].int(), grads[1]])
    with pytest.raises(ValueError, match="CPU parameters"):
        call(params=[twin.params[0].to("meta"), twin.params[1]], grads=[grads[0].to("meta"), grads[1]])
    with pytest.raises(TypeError, match="found_inf"):
        call(found_inf=torch.zeros(2))
    with pytest.raises(TypeError, match="weights"):
        cpu_mgg_step_(
            twin.params, grads, m, v, W, b, steps, [w.double() for w in twin.weights], **twin.kw, found_inf=z
        )
    with pytest.raises(ValueError, match="threads"):
        call(threads=0)
    assert steps.tolist() == [0.0, 0.0] and torch.equal(m, torch.zeros(7)), (
        "a call that raises changes nothing"
    )


def test_default_threads(monkeypatch):
    import mgg_fast.kernels.cpu_step as cpu_step

    monkeypatch.setattr(cpu_step, "_usable_cpus", lambda: 4)
    assert default_threads(0) == default_threads(1000) == default_threads(16 * CHUNK - 1) == 1
    assert default_threads(50 * 768) == 4  # 38,400 coordinates: 37 chunks
    assert default_threads(16 * CHUNK) == 2
    assert default_threads(8 << 20) == 4
    monkeypatch.setattr(cpu_step, "_usable_cpus", lambda: 64)
    assert default_threads(8 << 20) == cpu_step.MAX_DEFAULT_THREADS


def test_dtype_conversions_match_torch():
    """The kernel's bit arithmetic for bf16/fp16 parameters: widening is exact for every bit
    pattern, and narrowing rounds to nearest-even as torch does (ties, subnormals, overflow)."""
    import numpy as np
    from mgg_fast.kernels import cpu_step_jit as jit
    from numba import njit

    @njit
    def narrow(x, out16, outbf):
        for i in range(x.shape[0]):
            out16[i] = jit._f32_to_f16(x[i])
            outbf[i] = jit._f32_to_bf16(x[i])

    @njit
    def widen(bits, out16, outbf):
        for i in range(bits.shape[0]):
            out16[i] = jit._f16_to_f32(bits[i])
            outbf[i] = jit._bf16_to_f32(bits[i])

    bits = np.arange(1 << 16, dtype=np.uint16)
    w16, wbf = np.empty(bits.shape, np.float32), np.empty(bits.shape, np.float32)
    widen(bits, w16, wbf)
    t_bits = torch.from_numpy(bits.view(np.int16))
    for got, dtype in ((w16, torch.float16), (wbf, torch.bfloat16)):
        want = t_bits.view(dtype).float()
        assert torch.equal(torch.from_numpy(got).isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(torch.from_numpy(got)[ok].view(torch.int32), want[ok].view(torch.int32))
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(100_000, generator=gen) * 10.0 ** torch.randint(-9, 6, (100_000,), generator=gen),
            torch.from_numpy(w16),
            torch.from_numpy(wbf),  # exact values
            (torch.from_numpy(w16[:-1]) + torch.from_numpy(w16[1:])) / 2,  # halfway: ties to even
            torch.tensor([65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 0.0, -0.0]),
            torch.tensor([float("inf"), -float("inf"), 3.4e38]),
        ]
    ).float()
    x = x[~x.isnan()]
    n16, nbf = np.empty(x.shape, np.uint16), np.empty(x.shape, np.uint16)
    narrow(x.numpy(), n16, nbf)
    assert torch.equal(torch.from_numpy(n16.view(np.int16)), x.half().view(torch.int16))
    assert torch.equal(torch.from_numpy(nbf.view(np.int16)), x.bfloat16().view(torch.int16))


_ISA_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from helpers import random_mgg
from mgg_fast.kernels.cpu_step import cpu_mgg_step_
from mgg_fast.optim.packed_state import PackedState
digests = []
for heads, f, memory, dtype in [(1, 8, torch.float32, torch.float32), (2, 16, torch.bfloat16, torch.float16)]:
    mgg = random_mgg(heads * f, heads, seed=f)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dtype) for n in (1000, 37)]
    pack = PackedState.pack(params, [None, None], mgg.W1, mgg.b1[:, 0, :], torch.float32, memory)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        cpu_mgg_step_(
            params, grads, pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b, pack.steps,
            mgg.weights(), num_heads=heads, head_dim=f, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8,
            found_inf=torch.zeros(1), threads=int(sys.argv[1]),
        )
    h = hashlib.sha256()
    for t in [*params, pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b]:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    digests.append(h.hexdigest())
print(" ".join(digests))
"""


@pytest.mark.slow
def test_same_bits_on_other_x86_levels(tmp_path):
    """No fast-math, no FMA contraction, no libm: the kernel compiled for AVX2 (Haswell) and for
    baseline x86-64 gives the same bits as for this machine, on 1 and 2 threads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "isa.py"
    script.write_text(_ISA_SCRIPT.format(tests=str(Path(__file__).parents[1])))
    results = set()
    for cpu, threads in [(None, 1), ("haswell", 2), ("x86-64", 1)]:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / f"cache-{cpu}")}
        if cpu is not None:
            env["NUMBA_CPU_NAME"] = cpu
        run = subprocess.run(
            [sys.executable, str(script), str(threads)], env=env, capture_output=True, text=True, check=True
        )
        results.add(run.stdout.strip())
    assert len(results) == 1, results


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_fuzz_against_reference(seed):
    """Random MGG sizes, memory dtypes, parameter dtypes/shapes/layouts, missing gradients,
    gradient scales and thread counts; the reference is re-synchronised to the kernel after each
    step, so every step is compared from identical inputs."""
    rng = random.Random(seed)
    f = (8, 16, 32)[seed % 3]
    heads = rng.choice([h for h in (1, 2, 3, 4, 8) if h * f <= 64])
    memory = (None, torch.bfloat16)[(seed // 3) % 2]
    dtypes = [(torch.float32, torch.bfloat16, torch.float16, torch.float64)[(seed + i) % 4] for i in range(4)]
    params = []
    for dtype in dtypes[: rng.randint(1, 4)]:
        shape = rng.choice(
            [(0,), (), (1,), (rng.randint(2, 3000),), (rng.randint(1, 12), rng.randint(2, 40))]
        )
        p = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randint(0, 10**6))).to(dtype)
        params.append(p.t() if p.dim() == 2 and rng.random() < 0.3 else p)
    betas = (rng.choice([0.0, 0.5, 0.9]), rng.choice([0.9, 0.99, 0.999]))
    twin = Twin(
        random_mgg(heads * f, heads, seed=seed),
        params,
        lr=rng.choice([1e-3, 0.05, 0.5]),
        betas=betas,
        memory_W_dtype=memory,
    )
    for step in range(3):
        gen = torch.Generator().manual_seed(1000 * seed + step)
        lo, hi = (-3, 3) if torch.float16 in [p.dtype for p in params] else (-15, 12)
        grads = [
            None
            if rng.random() < 0.15
            else (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 10.0 ** rng.uniform(lo, hi)).to(
                p.dtype
            )
            for p in params
        ]
        twin.step(grads, threads=rng.choice([1, 2, 3]))
        tol = (
            PARAM_TOL[torch.bfloat16]
            if any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
            else F32
        )
        twin.check(tol)
        with torch.no_grad():  # re-synchronise the reference to the kernel
            for i, (p, q) in enumerate(zip(twin.params, twin.ref_params, strict=True)):
                q.copy_(p)
                st = twin.opt.state.get(q)
                if st:
                    for key in STATE_KEYS:
                        st[key].copy_(twin.pack.views[i][key])
