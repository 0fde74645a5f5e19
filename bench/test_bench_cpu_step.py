"""CPU benchmark of the fused CPU MGG step (``mgg_fast.kernels.cpu_step``).

Group ``cpu-step-38400``: ViT-B/16 norm scale (50 tensors of 768), torch's ``Adam(foreach=True)``,
the reference optimizer step, a plain validating ``MGGOptimizer.step()`` on the CPU backend
(its default threads), and the kernel alone (called directly on packed buffers) with 1 and 2
threads. Groups ``cpu-step-1M`` / ``cpu-step-8M`` (marked ``slow``; 8M needs ~2.5 GB for the
state and 5 GB for the copy): the kernel against a torch copy that moves the step's traffic,
604 bytes per coordinate (302 read + 302 written; the step reads and writes W, b, m, v and the
parameter and reads the gradient: 2 * (256 + 32 + 4 + 4 + 4) + 4 bytes, float32, one head of 8).
This VM's copy bandwidth varies from run to run (38-78 GB/s at 8M on 2026-12-07): compare the
kernel with the copy of the same run.

Run with ``pytest bench/test_bench_cpu_step.py --benchmark-only`` (add ``-m 'not slow'`` for the
small group only). ``MGG_BENCH_BUSY_CORE=1`` keeps one core busy with another process during
the module (the steadiness check: compare with a run without it). Timings mean something only
on an otherwise idle machine: check ``uptime`` first.
"""

import os
import subprocess
import sys

import pytest
import torch
from mgg_fast.kernels.cpu_step import cpu_mgg_step_, cpu_step_available

from mgg_fast import MGG, MGGOptimizer
from mgg_fast.optim.packed_state import PackedState

NUM_TENSORS, DIM = 50, 768
BYTES_PER_COORD = 604

pytestmark = pytest.mark.skipif(not cpu_step_available(), reason="the CPU step is unavailable")


@pytest.fixture(scope="module", autouse=True)
def _busy_core():
    """With MGG_BENCH_BUSY_CORE=1, another process spins on one core for the whole module."""
    if os.environ.get("MGG_BENCH_BUSY_CORE") != "1":
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _tensors(count: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(dim, generator=gen).requires_grad_(True) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(dim, generator=gen)
    return params


def _kernel_step(count: int, dim: int, threads: int):
    """A step of the kernel on ``count`` tensors of ``dim``, state packed as the optimizer packs it."""
    mgg = MGG(hidden_size=8)
    params = _tensors(count, dim)
    grads = [p.grad for p in params]
    params = [p.detach() for p in params]
    pack = PackedState.pack(params, [None] * count, mgg.W1, mgg.b1[:, 0, :], torch.float32, torch.float32)
    weights, found_inf = mgg.weights(), torch.zeros(1)

    def step():
        cpu_mgg_step_(
            params, grads, pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b, pack.steps, weights,
            num_heads=1, head_dim=8, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, found_inf=found_inf,
            threads=threads,
        )  # fmt: skip

    step()  # compiles (or loads the cached kernel)
    return step, params


@pytest.mark.benchmark(group="cpu-step-38400")
def test_adam_foreach_step(benchmark):
    params = _tensors(NUM_TENSORS, DIM)
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    benchmark.extra_info.update(coords=NUM_TENSORS * DIM, label="torch Adam(foreach)")
    benchmark(opt.step)


@pytest.mark.benchmark(group="cpu-step-38400")
def test_optimizer_step_cpu_backend(benchmark):
    """What a user's ``opt.step()`` costs: validation, the non-finite check and the kernel."""
    params = _tensors(NUM_TENSORS, DIM)
    opt = MGGOptimizer(params, MGG(hidden_size=8), lr=1e-3, backend="cpu")
    opt.step()  # first step: state allocation (and the kernel compiled or loaded)
    benchmark.extra_info.update(coords=NUM_TENSORS * DIM, label="MGG opt.step(), CPU backend")
    benchmark(opt.step)


@pytest.mark.benchmark(group="cpu-step-38400")
def test_reference_step(benchmark):
    torch.manual_seed(0)
    params = _tensors(NUM_TENSORS, DIM)
    opt = MGGOptimizer(params, MGG(hidden_size=8), lr=1e-3, backend="reference")
    opt.step()  # first step: state allocation
    benchmark.extra_info.update(coords=NUM_TENSORS * DIM, label="MGG opt.step(), reference")
    benchmark(opt.step)


@pytest.mark.benchmark(group="cpu-step-38400")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_step(benchmark, threads):
    step, params = _kernel_step(NUM_TENSORS, DIM, threads)
    benchmark.extra_info.update(coords=NUM_TENSORS * DIM, label=f"CPU kernel alone, {threads} thread(s)")
    benchmark(step)
    assert all(torch.isfinite(p).all() for p in params)


def _copy_case(benchmark, coords: int) -> None:
    src = torch.ones(coords * BYTES_PER_COORD // 2, dtype=torch.uint8)
    dst = torch.empty_like(src)
    benchmark.extra_info.update(
        coords=coords, bytes_moved=coords * BYTES_PER_COORD, label="torch copy, 604 B/coord"
    )
    benchmark.pedantic(dst.copy_, args=(src,), rounds=5, warmup_rounds=1)


def _big_kernel_case(benchmark, coords: int, threads: int) -> None:
    step, _ = _kernel_step(8, coords // 8, threads)
    benchmark.extra_info.update(
        coords=coords, bytes_moved=coords * BYTES_PER_COORD, label=f"CPU kernel, {threads} thread(s)"
    )
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.slow
@pytest.mark.benchmark(group="cpu-step-1M")
def test_copy_1m(benchmark):
    _copy_case(benchmark, 1 << 20)


@pytest.mark.slow
@pytest.mark.benchmark(group="cpu-step-1M")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_1m(benchmark, threads):
    _big_kernel_case(benchmark, 1 << 20, threads)


@pytest.mark.slow
@pytest.mark.benchmark(group="cpu-step-8M")
def test_copy_8m(benchmark):
    _copy_case(benchmark, 8 << 20)


@pytest.mark.slow
@pytest.mark.benchmark(group="cpu-step-8M")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_8m(benchmark, threads):
    _big_kernel_case(benchmark, 8 << 20, threads)
