"""The fused MGG optimizer step beside the reference step and torch's ``Adam(fused=True)``.

Same tensors for every optimizer: 50 parameter tensors (ViT-B/16 has 50 norm tensors of 768)
of 768, 20,000 or 160,000 coordinates, i.e. N = 38,400, 1 M and 8 M. Each case's
``extra_info`` holds per-step numbers (``*_us``), coordinates/s and the bandwidth achieved
against the fused step's minimum traffic of 604 bytes/coordinate (fp32, H=8, nh=1), plus memory
on the GPU. ``bench/gpu_check.sh`` turns the JSON into a summary against the DESIGN.md targets.

GPU time is measured with CUDA events around back-to-back steps queued behind a
``torch.cuda._sleep`` (so host launch overhead is hidden and only device time counts); the
wall-clock numbers are host time per step of a loop of steps. Without CUDA the fused cases skip
(the Triton interpreter checks correctness, not speed) and the CPU cases run at N = 38,400 only.

Run: ``pytest bench/test_bench_fused.py --benchmark-only``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import triton
from mgg_fast.kernels import (
    StepGuard,
    forced_single_launch,
    fused_group_step,
    fused_group_update,
    prepare_group,
)
from mgg_fast.kernels.memory_layer import forced_config, launch_config
from mgg_fast.kernels.step_prologue import forced_pdl

from mgg_fast import MGG, MGGOptimizer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_TENSORS = 50
SIZES = {"38k": 768, "1M": 20_000, "8M": 160_000}  # per tensor; x 50 tensors
CPU_SIZES = ("38k",)
NO_GPU = "the fused Triton step needs a CUDA GPU (TRITON_INTERPRET checks correctness, not speed)"
SWEEP_BLOCKS = {8: (8, 16, 32, 64), 16: (2, 4, 8, 16), 32: (2, 4, 8)}  # per head dim f
SWEEP_WARPS = (1, 2, 4, 8)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _tensors(size: str, seed: int = 0) -> list[torch.Tensor]:
    dim = SIZES[size]
    gen = torch.Generator(DEVICE).manual_seed(seed)
    params = [torch.randn(dim, generator=gen, device=DEVICE).requires_grad_(True) for _ in range(NUM_TENSORS)]
    for p in params:
        p.grad = torch.randn(dim, generator=gen, device=DEVICE)
    return params


def _mgg(head_dim: int = 8) -> MGG:
    torch.manual_seed(0)
    return MGG(hidden_size=head_dim).to(DEVICE)


def bytes_per_coord(head_dim: int, memory_W_bytes: int = 4, heads: int = 1) -> int:
    """Least traffic of one step per coordinate, fp32 but for the memory matrices: 604 B for one
    head of 8 (348 B with the matrices in bf16)."""
    return 7 * 4 + 2 * heads * (memory_W_bytes * head_dim * head_dim + 4 * head_dim)


BYTES_PER_COORD = bytes_per_coord(8)  # 604: what the copy yardstick moves per coordinate
BF16_MEMORY_BYTES_PER_COORD = bytes_per_coord(8, memory_W_bytes=2)  # 348


def gpu_us(fn: Callable[[], object], steps: int, queue_ahead: bool = True) -> float:
    """Device time per call of ``fn`` (CUDA events around ``steps`` back-to-back calls).

    With ``queue_ahead`` the calls are queued behind a GPU sleep longer than the host needs to
    queue them, so that host overhead does not show (only for callers that never synchronise with
    the host); if the GPU still caught up with the host the result is NaN rather than a host
    time. One untimed call first (compiles, builds tables).
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    if queue_ahead:
        host_s = wall_us(fn, 3) * 1e-6
        torch.cuda._sleep(int(max(40e6, 3e9 * host_s * steps)))  # >= 1.5x the queueing time at 2 GHz
    start.record()
    for _ in range(steps):
        fn()
    caught_up = queue_ahead and start.query()  # the sleep ended before every call was queued
    end.record()
    end.synchronize()
    return math.nan if caught_up else start.elapsed_time(end) * 1e3 / steps


def wall_us(fn: Callable[[], object], steps: int) -> float:
    """Host wall-clock per call of a loop of ``steps`` calls (one synchronisation at the end)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - t0) * 1e6 / steps


def _record(benchmark, coords: int, head_dim: int = 8, traffic: int | None = None, **numbers: float) -> None:
    """Store the case's numbers in ``extra_info``, with coordinates/s and GB/s against the 604
    bytes/coordinate of one fp32 head of ``head_dim`` (or against ``traffic`` bytes)."""
    info = benchmark.extra_info
    info["coords"] = coords
    info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    info["torch"] = torch.__version__
    for key, value in numbers.items():
        info[key] = value
    main = numbers.get("kernel_gpu_us", numbers.get("gpu_us", numbers.get("wall_us")))
    if main:
        info["coords_per_s"] = coords / (main * 1e-6)
        if traffic is None:
            info["gb_per_s_at_604B"] = coords * bytes_per_coord(head_dim) / (main * 1e-6) / 1e9
        else:
            info[f"gb_per_s_at_{traffic}B"] = coords * traffic / (main * 1e-6) / 1e9


def _memory(make_opt: Callable[[], torch.optim.Optimizer], params: list[torch.Tensor]) -> dict[str, int]:
    """Bytes the optimizer keeps after its first step, and the transient peak of a later step."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt = make_opt()
    opt.step()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt.step()
    torch.cuda.synchronize()
    out = {"optimizer_bytes": kept, "transient_bytes": torch.cuda.max_memory_allocated() - base}
    if isinstance(opt, MGGOptimizer):
        flat = opt._flat_state(0)
        out["state_bytes"] = sum(
            t.numel() * t.element_size()
            for t in (flat.exp_avg, flat.exp_avg_sq, flat.memory_W, flat.memory_b, flat.steps)
        )
    del opt
    return out


@contextlib.contextmanager
def _launch_hook() -> Iterator[None]:
    """A no-op Triton launch hook inside the block (relaunches then take the public path)."""
    hook = lambda metadata: None
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        yield
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)


def _rounds(size: str) -> int:
    return {"38k": 50, "1M": 20, "8M": 10}[size] if CUDA else 5


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", ["fused", "reference", "adam_fused"])
def test_step(benchmark, backend, size):
    if backend == "fused" and not CUDA:
        pytest.skip(NO_GPU)
    if not CUDA and size not in CPU_SIZES:
        pytest.skip(f"CPU runs only {CPU_SIZES} (keeps the CPU benchmark short)")
    benchmark.group = f"step-{size}"
    params = _tensors(size)
    coords = NUM_TENSORS * SIZES[size]
    if backend == "adam_fused":
        make = lambda: torch.optim.Adam(params, lr=1e-3, fused=True)
    else:
        mode = "triton" if backend == "fused" else "reference"
        make = lambda: MGGOptimizer(params, _mgg(), lr=1e-3, backend=mode)
    numbers = _memory(make, params) if CUDA else {}
    opt = make()
    opt.step()
    steps = {"38k": 100, "1M": 50, "8M": 20}[size] if backend != "reference" else 5
    numbers["wall_us"] = wall_us(opt.step, steps if CUDA else 3)
    if CUDA:  # the reference synchronises (steps.tolist()): no queue-ahead, host time included
        numbers["gpu_us"] = gpu_us(opt.step, steps, queue_ahead=backend != "reference")
    if backend == "fused":
        flat, grads, mgg = opt._flat_state(0), [p.grad for p in params], opt.mgg
        hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
        kernels = lambda: fused_group_step(flat, grads, mgg, **hyper, capturable=True)
        numbers["kernel_gpu_us"] = gpu_us(kernels, steps)  # prologue + update
        with forced_pdl(False):
            numbers["kernel_gpu_us_no_pdl"] = gpu_us(kernels, steps)
        numbers["update_gpu_us"] = gpu_us(_update_launcher(flat, grads, mgg, hyper), steps)
        guard, group = StepGuard(DEVICE), prepare_group(flat, grads, mgg, capturable=True)
        numbers["prologue_gpu_us"] = gpu_us(lambda: guard.check([group]), steps)
        last = opt._repeats[0] if opt._repeats else None  # the repeat path's kernels, no checks
        if last is not None and last.compiled:
            launches = lambda: [launch() for _, launch in last.compiled]
            numbers["relaunch_wall_us"] = wall_us(launches, steps)
            with _launch_hook():  # the same relaunches the public way, as a profiler gets them
                numbers["relaunch_public_wall_us"] = wall_us(launches, steps)
        cap = MGGOptimizer(params, _mgg(), lr=1e-3, backend="triton", capturable=True)
        cap.step()
        numbers["capturable_step_gpu_us"] = gpu_us(cap.step, steps)
        numbers["capturable_step_wall_us"] = wall_us(cap.step, steps)
    _record(benchmark, coords, **numbers)
    benchmark.pedantic(lambda: (opt.step(), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", list(SIZES))
def test_fused_step_bf16_memory(benchmark, size):
    """The fused step with ``memory_W_dtype=torch.bfloat16`` (opt-in): 348 instead of 604
    bytes/coordinate; compare with ``test_step[fused-*]`` of the same run."""
    benchmark.group = f"step-{size}"
    benchmark.extra_info["memory_W_dtype"] = "bfloat16"
    params = _tensors(size)
    make = lambda: MGGOptimizer(params, _mgg(), lr=1e-3, backend="triton", memory_W_dtype=torch.bfloat16)
    numbers = _memory(make, params)
    opt = make()
    opt.step()
    steps = {"38k": 100, "1M": 50, "8M": 20}[size]
    numbers["wall_us"] = wall_us(opt.step, steps)
    flat, grads, mgg = opt._flat_state(0), [p.grad for p in params], opt.mgg
    kernels = lambda: fused_group_step(flat, grads, mgg, **_HYPER, capturable=True)
    numbers["kernel_gpu_us"] = gpu_us(kernels, steps)
    _record(benchmark, NUM_TENSORS * SIZES[size], traffic=BF16_MEMORY_BYTES_PER_COORD, **numbers)
    benchmark.pedantic(lambda: (opt.step(), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", list(SIZES))
def test_fused_step_cuda_graph(benchmark, size):
    """``opt.step()`` with capturable=True captured once, then replayed."""
    benchmark.group = f"graph-{size}"
    params = _tensors(size)
    graph = _captured_step(params)
    steps = {"38k": 500, "1M": 100, "8M": 20}[size]
    numbers = {"gpu_us": gpu_us(graph.replay, steps), "wall_us": wall_us(graph.replay, steps)}
    with forced_pdl(False):
        no_pdl = _captured_step(_tensors(size, seed=1))
    numbers["gpu_us_no_pdl"] = gpu_us(no_pdl.replay, steps)
    opt = graph.optimizer  # the update kernel alone in a graph: what the prologue adds to a replay
    update = _update_launcher(opt._flat_state(0), [p.grad for p in params], opt.mgg, _HYPER)
    update()
    update_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(update_graph):
        update()
    numbers["update_only_gpu_us"] = gpu_us(update_graph.replay, steps)
    _record(benchmark, NUM_TENSORS * SIZES[size], **numbers)
    benchmark.pedantic(lambda: (graph.replay(), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", list(SIZES))
def test_single_launch_step(benchmark, size):
    """The opt-in single-launch step (``forced_single_launch``): ``opt.step()`` and a CUDA-graph
    replay of it, beside ``test_step[fused-*]`` and ``test_fused_step_cuda_graph[*]`` (the
    two-kernel step) of the same run. ``bench/gpu_check.sh`` runs it on its own, time-boxed."""
    benchmark.group = f"single-{size}"
    params = _tensors(size)
    steps = {"38k": 500, "1M": 100, "8M": 20}[size]
    with forced_single_launch(True):
        opt = MGGOptimizer(params, _mgg(), lr=1e-3, backend="triton")
        opt.step()
        numbers = {"gpu_us": gpu_us(opt.step, steps), "wall_us": wall_us(opt.step, steps)}
        graph = _captured_step(_tensors(size, seed=1))
        numbers["graph_gpu_us"] = gpu_us(graph.replay, steps)
        numbers["graph_wall_us"] = wall_us(graph.replay, steps)
        _record(benchmark, NUM_TENSORS * SIZES[size], **numbers)
        benchmark.pedantic(lambda: (opt.step(), _sync()), rounds=_rounds(size), warmup_rounds=1)


_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}


def _captured_step(params: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one capturable ``opt.step()`` on ``params`` (after two warm-up steps)."""
    opt = MGGOptimizer(params, _mgg(), lr=1e-3, backend="triton", capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.optimizer = opt  # keep the optimizer (and the tables the graph reads) alive
    return graph


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", list(SIZES))
def test_copy_bandwidth(benchmark, size):
    """Device-to-device copy moving the same 604 bytes/coordinate: the bandwidth yardstick."""
    benchmark.group = f"copy-{size}"
    coords = NUM_TENSORS * SIZES[size]
    src = torch.empty(coords * BYTES_PER_COORD // 2, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    steps = {"38k": 500, "1M": 100, "8M": 20}[size]
    us = gpu_us(lambda: dst.copy_(src), steps)
    _record(benchmark, coords, gpu_us=us)
    benchmark.pedantic(lambda: (dst.copy_(src), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize(
    ("size", "head_dim", "memory_W_dtype"),
    [
        *(
            pytest.param(size, f, None, id=f"{size}-{f}")
            for size, f in (("38k", 8), ("8M", 8), ("1M", 16), ("1M", 32))
        ),
        pytest.param("8M", 8, torch.bfloat16, id="8M-8-bf16memory"),
    ],
)
def test_fused_config_sweep(benchmark, size, head_dim, memory_W_dtype):
    """Kernel time of every (BLOCK, num_warps) of the sweep (one head of ``head_dim``), to retune
    ``launch_config`` (the bf16-memory case: whether half the memory bytes want another one)."""
    benchmark.group = f"sweep-{size}-f{head_dim}"
    params = _tensors(size)
    opt = MGGOptimizer(params, _mgg(head_dim), lr=1e-3, backend="triton", memory_W_dtype=memory_W_dtype)
    opt.step()
    flat, grads, mgg = opt._flat_state(0), [p.grad for p in params], opt.mgg
    found = torch.zeros(1, device=DEVICE)
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    steps = {"38k": 100, "1M": 20, "8M": 10}[size]
    results = {}
    for block, warps in ((b, w) for b in SWEEP_BLOCKS[head_dim] for w in SWEEP_WARPS):
        with forced_config(block, warps):
            run = _update_launcher(flat, grads, mgg, hyper, found)
            run()  # compiles
            results[f"{block}x{warps}"] = gpu_us(run, steps)
    best = min(results, key=results.get)
    benchmark.extra_info["sweep_gpu_us"] = results
    benchmark.extra_info["best"] = best
    _record(benchmark, NUM_TENSORS * SIZES[size], head_dim, kernel_gpu_us=results[best])
    block, warps = (int(x) for x in best.split("x"))
    with forced_config(block, warps):
        group = prepare_group(flat, grads, mgg, capturable=False)
        run = lambda: fused_group_update(group, mgg, **hyper, found_inf=found)
        benchmark.pedantic(lambda: (run(), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", ["38k", "8M"])
@pytest.mark.parametrize(
    ("hidden", "heads"), [(16, 2), (32, 4), (64, 8)], ids=["heads-2x8", "heads-4x8", "heads-8x8"]
)
def test_fused_step_heads(benchmark, size, hidden, heads):
    """The fused step (prologue + update) of multi-head MGGs with the launch table's config, beside
    one head of 8 in the same run: what the head-count heuristic of ``launch_config`` gives."""
    benchmark.group = f"heads-{size}"
    params = _tensors(size)
    torch.manual_seed(0)
    opt = MGGOptimizer(params, MGG(hidden, heads).to(DEVICE), lr=1e-3, backend="triton")
    opt.step()
    flat, grads, mgg = opt._flat_state(0), [p.grad for p in params], opt.mgg
    steps = {"38k": 100, "8M": 10}[size]
    kernels = lambda: fused_group_step(flat, grads, mgg, **_HYPER, capturable=True)
    numbers = {"kernel_gpu_us": gpu_us(kernels, steps), "config": launch_config(heads, hidden // heads)}
    traffic = bytes_per_coord(hidden // heads, heads=heads)
    _record(benchmark, NUM_TENSORS * SIZES[size], traffic=traffic, **numbers)
    benchmark.pedantic(lambda: (kernels(), _sync()), rounds=_rounds(size), warmup_rounds=1)


def _update_launcher(flat, grads, mgg, hyper, found=None) -> Callable[[], None]:
    """The update kernel alone on these gradients (launch config as of now), no prologue."""
    group = prepare_group(flat, grads, mgg, capturable=False)
    found = torch.zeros(1, device=DEVICE) if found is None else found
    return lambda: fused_group_update(group, mgg, **hyper, found_inf=found)


def test_host_floor(benchmark):
    """What any ``torch.optim`` step costs on this host before doing anything, beside the parts of
    the MGG step's host time: an empty ``Optimizer.step()`` (torch's hook and profiler wrapper),
    reading the 50 gradients, ``MGGOptimizer``'s address check of the repeat path, and a whole
    repeat-path ``opt.step()`` with its kernel launches replaced by no-ops (its Python alone; runs
    on the CPU too)."""
    benchmark.group = "host-38k"
    params = _tensors("38k")

    class Empty(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            return None

    empty = Empty(params)
    opt = MGGOptimizer(params, _mgg(), lr=1e-3, backend="reference")
    numbers = {
        "empty_optimizer_step_wall_us": wall_us(empty.step, 2000),
        "read_grads_wall_us": wall_us(lambda: [p.grad for p in params], 2000),
        "address_check_wall_us": wall_us(opt._signature, 2000),
    }
    _stand_in_repeat(opt)
    before = [p.detach().clone() for p in params]
    numbers["repeat_step_python_wall_us"] = wall_us(opt.step, 2000)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True)), "no-op launches only"
    _record(benchmark, NUM_TENSORS * SIZES["38k"], **numbers)
    benchmark.pedantic(empty.step, rounds=200, warmup_rounds=1)


def _stand_in_repeat(opt: MGGOptimizer) -> None:
    """Make ``opt``'s next steps take the repeat path with no-op launches in place of the two
    compiled kernels (same argument counts), so that its Python can be timed on any host."""
    from mgg_fast.kernels.mgg_step import _mgg_step_kernel
    from mgg_fast.kernels.relaunch import Relaunch
    from mgg_fast.kernels.step_prologue import _step_prologue_kernel

    from mgg_fast.optimizer import _FusedStepRecord

    weights = list(opt.mgg.weights())
    no_op = lambda *args: None
    prologue, update = (
        Relaunch(no_op, (0,) * len(k.arg_names), ()) for k in (_step_prologue_kernel, _mgg_step_kernel)
    )
    opt._repeats = [
        _FusedStepRecord(
            signature=opt._signature(),
            settings=opt._settings(),
            weights=weights,
            weight_ptrs=[w.data_ptr() for w in weights],
            prologue=None,
            groups=[(0, None)],
            compiled=[(None, prologue), (0, update)],
            hypers=[opt._hyper_values(0)],
        )
    ]
