"""The fused MGG optimizer step beside the reference step and torch's ``Adam(fused=True)``.

Same tensors for every optimizer: 50 parameter tensors (ViT-B/16 has 50 norm tensors of 768)
of 768, 20,000 or 160,000 coordinates, i.e. N = 38,400, 1 M and 8 M. Each case's
``extra_info`` holds per-step numbers (``*_us``), coordinates/s and the bandwidth achieved
against the fused step's least traffic of 604 bytes/coordinate (fp32, H=8, nh=1), the memory
the optimizer keeps and the transient peak of a step, the device and the versions.
``bench/gpu_check.sh`` turns the JSON into a summary against the DESIGN.md targets.

Numbers: ``wall_us`` is host time per step of a loop of plain ``opt.step()`` calls (one
synchronisation at the end). ``gpu_us`` is device time per step from CUDA events: back-to-back
calls queued behind a ``torch.cuda._sleep`` so that host time does not show; for the fused step,
which waits for the device when it uploads its address table (``host_sync``), the step's work
is captured once in a CUDA graph and the replays are timed. ``kernel_gpu_us`` is ``mgg_step_``
alone (update and step advance, no validation, no non-finite check), also from a graph.
Without CUDA the fused cases skip (the Triton interpreter checks correctness, not speed) and the
reference and Adam steps run at N = 38,400 only.

Run: ``pytest bench/test_bench_fused.py --benchmark-only``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import torch
import triton
from mgg_fast.kernels import chunk_layout, launch_config, mgg_step_
from mgg_fast.kernels.memory_layer import weight_args

from mgg_fast import MGG, MGGOptimizer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_TENSORS = 50
SIZES = {"38k": 768, "1M": 20_000, "8M": 160_000}  # per tensor; x 50 tensors
STEPS = {"38k": 200, "1M": 50, "8M": 20}  # timed calls per number
CPU_SIZES = ("38k",)
NO_GPU = "the fused Triton step needs a CUDA GPU (TRITON_INTERPRET checks correctness, not speed)"
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}  # MGGOptimizer's defaults, lr 1e-3
LABELS = {  # each backend's name in the report tables (bench/conftest.py)
    "fused": "MGG fused",
    "fused_bf16_memory": "MGG fused, bf16 memory",
    "reference": "MGG reference",
    "adam_fused": "torch Adam(fused=True)",
}
SWEEP_BLOCKS = {8: (8, 16, 32, 64), 16: (2, 4, 8, 16), 32: (2, 4, 8)}  # per head dim f
SWEEP_WARPS = (1, 2, 4, 8)


def bytes_per_coord(head_dim: int, memory_W_bytes: int = 4, heads: int = 1) -> int:
    """Least traffic of one step per coordinate, fp32 but for the memory matrices: 604 B for one
    head of 8 (348 B with the matrices in bf16)."""
    return 7 * 4 + 2 * heads * (memory_W_bytes * head_dim * head_dim + 4 * head_dim)


BYTES_PER_COORD = bytes_per_coord(8)  # 604: what the copy yardstick moves per coordinate
BF16_MEMORY_BYTES_PER_COORD = bytes_per_coord(8, memory_W_bytes=2)  # 348


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _tensors(size: str) -> list[torch.Tensor]:
    dim = SIZES[size]
    gen = torch.Generator(DEVICE).manual_seed(0)
    params = [torch.randn(dim, generator=gen, device=DEVICE).requires_grad_(True) for _ in range(NUM_TENSORS)]
    for p in params:
        p.grad = torch.randn(dim, generator=gen, device=DEVICE)
    return params


def _mgg(hidden: int = 8, heads: int = 1) -> MGG:
    torch.manual_seed(0)
    return MGG(hidden, heads).to(DEVICE)


def _optimizer(backend: str, params: list[torch.Tensor], mgg: MGG | None = None) -> torch.optim.Optimizer:
    """A fresh optimizer of a benchmark backend on ``params``."""
    if backend == "adam_fused":
        return torch.optim.Adam(params, lr=HYPER["lr"], fused=True)
    mgg = _mgg() if mgg is None else mgg
    if backend == "reference":
        return MGGOptimizer(params, mgg, lr=HYPER["lr"], backend="reference")
    memory_W_dtype = torch.bfloat16 if backend == "fused_bf16_memory" else None
    return MGGOptimizer(params, mgg, lr=HYPER["lr"], backend="triton", memory_W_dtype=memory_W_dtype)


def wall_us(fn: Callable[[], object], steps: int) -> float:
    """Host wall-clock per call of a loop of ``steps`` calls (one synchronisation at the end)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - t0) * 1e6 / steps


def gpu_us(fn: Callable[[], object], steps: int, queue_ahead: bool = True) -> float:
    """Device time per call of ``fn`` (CUDA events around ``steps`` back-to-back calls).

    With ``queue_ahead`` the calls are queued behind a GPU sleep longer than the host needs to
    queue them, so that host time does not show (only for an ``fn`` that never waits for the
    device); if the GPU still caught up with the host the result is NaN rather than a host time.
    One untimed call first (compiles).
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


def _graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after two warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_gpu_us(fn: Callable[[], object], steps: int) -> float:
    """Device time per call of ``fn``'s work: replays of a CUDA graph of it (queued ahead)."""
    return gpu_us(_graph(fn).replay, steps)


def host_sync(fn: Callable[[], object]) -> bool:
    """Whether a call of ``fn`` waits for work already queued on the GPU (called behind a ~50 ms
    GPU sleep; only for an ``fn`` whose own host time is well below 25 ms)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e8))
    t0 = time.perf_counter()
    fn()
    waited = time.perf_counter() - t0
    torch.cuda.synchronize()
    return waited > 0.025


def _kernel_step(opt: MGGOptimizer, config: tuple[int, int] | None = None) -> Callable[[], None]:
    """``mgg_step_`` alone on ``opt``'s packed first group (after a step), with ``config`` =
    ``(BLOCK, num_warps)`` or the launch table's, and the chunk layout for that BLOCK (kept in the
    pack's per-BLOCK cache, as the optimizer keeps its own: building one is a Python loop over
    every chunk, a million of them at 8 M coordinates and BLOCK 8)."""
    mgg, pack = opt.mgg, opt._packs[0]
    block, num_warps = config or launch_config(mgg.num_heads, mgg.head_dim)
    layout = pack.layouts.get(block)
    if layout is None:
        layout = pack.layouts[block] = chunk_layout(pack.numels, pack.offsets, block, DEVICE)
    weights = weight_args(mgg.weights(), DEVICE)
    grads = [p.grad for p in pack.params]
    found_inf = torch.zeros(1, device=DEVICE)
    keep_alive: list[torch.Tensor] = []  # the address tables a captured call reads
    state = (pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b, pack.steps, layout, weights)
    return lambda: mgg_step_(
        pack.params, grads, *state, num_heads=mgg.num_heads, head_dim=mgg.head_dim, **HYPER,
        found_inf=found_inf, block=block, num_warps=num_warps, keep_alive=keep_alive,
    )  # fmt: skip


def _memory(make_opt: Callable[[], torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes the optimizer keeps after its first step, the transient peak of a later step, and
    (MGG) the bytes of its packed state."""
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
        pack = opt._packs[0]
        buffers = (pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b, pack.steps)
        out["state_bytes"] = sum(t.numel() * t.element_size() for t in buffers)
    return out


def _record(benchmark, coords: int, traffic: int = BYTES_PER_COORD, **numbers: object) -> None:
    """Store the case's numbers in ``extra_info`` with the device and versions, and coordinates/s
    and GB/s of its main time (``gpu_us``, else ``kernel_gpu_us``, else ``wall_us``) at 604
    bytes/coordinate (and at ``traffic`` bytes where the case moves another amount)."""
    info = benchmark.extra_info
    info["coords"] = coords
    info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    info["torch"] = torch.__version__
    info["triton"] = triton.__version__
    info.update(numbers)
    main = next((numbers[k] for k in ("gpu_us", "kernel_gpu_us", "wall_us") if k in numbers), None)
    if main:
        info["coords_per_s"] = coords / (main * 1e-6)
        info["gb_per_s_at_604B"] = coords * BYTES_PER_COORD / (main * 1e-6) / 1e9
        if traffic != BYTES_PER_COORD:
            info[f"gb_per_s_at_{traffic}B"] = coords * traffic / (main * 1e-6) / 1e9


def _rounds(size: str) -> int:
    return {"38k": 50, "1M": 20, "8M": 10}[size] if CUDA else 5


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", ["fused", "fused_bf16_memory", "reference", "adam_fused"])
def test_step(benchmark, backend, size):
    """A plain ``opt.step()`` of each optimizer on the same tensors. ``fused_bf16_memory`` is the
    opt-in ``memory_W_dtype=torch.bfloat16`` (348 instead of 604 bytes/coordinate)."""
    fused = backend.startswith("fused")
    if fused and not CUDA:
        pytest.skip(NO_GPU)
    if not CUDA and size not in CPU_SIZES:
        pytest.skip(f"CPU runs only {CPU_SIZES} (keeps the CPU benchmark short)")
    benchmark.group = f"step-{size}"
    benchmark.extra_info["label"] = LABELS[backend]
    params = _tensors(size)
    numbers = _memory(lambda: _optimizer(backend, params)) if CUDA else {}
    opt = _optimizer(backend, params)
    opt.step()
    steps = STEPS[size] if CUDA and backend != "reference" else 5
    numbers["wall_us"] = wall_us(opt.step, steps)
    if fused:
        numbers["host_sync"] = host_sync(opt.step)
        numbers["gpu_us"] = graph_gpu_us(opt.step, steps)
        numbers["kernel_gpu_us"] = graph_gpu_us(_kernel_step(opt), steps)
    elif CUDA:  # the reference synchronises (found_inf.item()): no queue-ahead, host time included
        numbers["gpu_us"] = gpu_us(opt.step, steps, queue_ahead=backend == "adam_fused")
    traffic = BF16_MEMORY_BYTES_PER_COORD if backend == "fused_bf16_memory" else BYTES_PER_COORD
    _record(benchmark, NUM_TENSORS * SIZES[size], traffic, **numbers)
    benchmark.pedantic(lambda: (opt.step(), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", list(SIZES))
def test_fused_step_cuda_graph(benchmark, size):
    """``opt.step()`` of a ``capturable=True`` optimizer captured once, then replayed: the
    low-latency path (device time and host wall clock per replay)."""
    benchmark.group = f"graph-{size}"
    opt = MGGOptimizer(_tensors(size), _mgg(), lr=HYPER["lr"], backend="triton", capturable=True)
    opt.step()
    graph = _graph(opt.step)
    steps = STEPS[size]
    numbers = {"gpu_us": gpu_us(graph.replay, steps), "wall_us": wall_us(graph.replay, steps)}
    _record(benchmark, NUM_TENSORS * SIZES[size], **numbers)
    benchmark.pedantic(lambda: (graph.replay(), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", list(SIZES))
def test_copy_bandwidth(benchmark, size):
    """Device-to-device copy moving the same 604 bytes/coordinate: the bandwidth yardstick."""
    benchmark.group = f"copy-{size}"
    coords = NUM_TENSORS * SIZES[size]
    src = torch.empty(coords * BYTES_PER_COORD // 2, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    _record(benchmark, coords, gpu_us=gpu_us(lambda: dst.copy_(src), STEPS[size]))
    benchmark.pedantic(lambda: (dst.copy_(src), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize(
    ("size", "head_dim", "backend"),
    [
        *(
            pytest.param(size, f, "fused", id=f"{size}-{f}")
            for size, f in (("38k", 8), ("8M", 8), ("1M", 16), ("1M", 32))
        ),
        pytest.param("8M", 8, "fused_bf16_memory", id="8M-8-bf16memory"),
    ],
)
def test_fused_config_sweep(benchmark, size, head_dim, backend):
    """``mgg_step_`` time of every (BLOCK, num_warps) of the sweep (one head of ``head_dim``), to
    retune ``launch_config`` (the bf16-memory case: whether half the memory bytes want another)."""
    benchmark.group = f"sweep-{size}-f{head_dim}"
    opt = _optimizer(backend, _tensors(size), _mgg(head_dim))
    opt.step()
    results = {
        f"{block}x{warps}": graph_gpu_us(_kernel_step(opt, (block, warps)), STEPS[size])
        for block in SWEEP_BLOCKS[head_dim]
        for warps in SWEEP_WARPS
    }
    best = min(results, key=results.get)
    benchmark.extra_info["sweep_gpu_us"] = results
    benchmark.extra_info["best"] = best
    benchmark.extra_info["launch_config"] = "{}x{}".format(*launch_config(1, head_dim))
    traffic = bytes_per_coord(head_dim, memory_W_bytes=2 if backend == "fused_bf16_memory" else 4)
    _record(benchmark, NUM_TENSORS * SIZES[size], traffic, kernel_gpu_us=results[best])
    run = _kernel_step(opt, tuple(int(x) for x in best.split("x")))
    benchmark.pedantic(lambda: (run(), _sync()), rounds=_rounds(size), warmup_rounds=1)


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("size", ["38k", "8M"])
@pytest.mark.parametrize(
    ("hidden", "heads"), [(16, 2), (32, 4), (64, 8)], ids=["heads-2x8", "heads-4x8", "heads-8x8"]
)
def test_fused_step_heads(benchmark, size, hidden, heads):
    """The fused step of multi-head MGGs with the launch table's config, beside one head of 8 in
    ``test_step[fused-*]`` of the same run: what the head-count heuristic of ``launch_config``
    gives."""
    benchmark.group = f"heads-{size}"
    opt = _optimizer("fused", _tensors(size), _mgg(hidden, heads))
    opt.step()
    steps = STEPS[size]
    numbers = {
        "gpu_us": graph_gpu_us(opt.step, steps),
        "kernel_gpu_us": graph_gpu_us(_kernel_step(opt), steps),
        "config": launch_config(heads, hidden // heads),
    }
    traffic = bytes_per_coord(hidden // heads, heads=heads)
    _record(benchmark, NUM_TENSORS * SIZES[size], traffic, **numbers)
    benchmark.pedantic(lambda: (opt.step(), _sync()), rounds=_rounds(size), warmup_rounds=1)
