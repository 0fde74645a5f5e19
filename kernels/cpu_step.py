"""Fused MGG optimizer step on the CPU: moments, bias correction, features, one memory-layer step
and the parameter update in one pass over each coordinate's state.

Naive reference: :func:`mgg_fast.reference.optimizer_step` + :func:`mgg_fast.reference.apply_update`;
the CUDA twin is :func:`mgg_fast.kernels.mgg_step.mgg_step_` (same arguments without its launch
table and sizes, same state layout, same non-finite policy). Entry points: :func:`cpu_mgg_step_`,
:func:`cpu_step_available` / :func:`cpu_step_unavailable_reason`, :func:`default_threads`.

**What a call does.** Per stepped coordinate, one pass: read the gradient, the parameter, ``m``,
``v``, ``W [nh, f, f]`` and ``b [nh, f]``; compute the moments (float32, in the reference's order
of operations), the bias corrections of the parameter's step count (float64 rounded to float32,
the published exponent ``t + 1``), the features, every head's ``q, k, v``, the inner-loss gradient
with its layer norm fused, the rank-1 memory update, the dual-form output, the post-norm, o_proj
and tanh; write ``W, b, m, v`` and ``p -= lr * out`` (computed in float32, in float64 for a
float64 parameter, rounded once to the parameter's dtype). ``memory_W`` stored as bf16 is widened
exactly and rounded to nearest-even on store (NaN to 0x7FC0), as torch rounds. Nothing per
coordinate is allocated: the group's parameters and gradients stay separate tensors, reached
through a table of their addresses (one int64 column per parameter, built per call); only a
non-contiguous parameter or gradient gets a contiguous working copy (as the Triton launcher).

**Parameter dtypes.** float32, float64, bfloat16 and float16, mixed freely in a group. numba has no
16-bit float type, so bf16/fp16 parameters and gradients are read as their uint16 bits and
converted in the kernel by integer arithmetic: widening is exact, narrowing rounds to
nearest-even like torch (subnormals, overflow to inf, NaN), checked bit for bit against torch
over every 16-bit pattern in ``tests/test_kernels_cpu.py``. No conversion pass in torch, no copy.

**Tool: numba** (LLVM through llvmlite; a wheel on PyPI for Linux/macOS/Windows and Python
3.10-3.14, no compiler needed on the user's machine). The per-coordinate math is generated as
LLVM vector IR (:mod:`mgg_fast.kernels.cpu_block` on :mod:`mgg_fast.kernels.cpu_vector_ir`; the
numba entry points are in :mod:`mgg_fast.kernels.cpu_step_jit`) rather than left to LLVM's
auto-vectoriser, which vectorised plain numba loops well for f = 8 and badly for f = 16/32
(gathers/scatters or scalar code, by its unrolling heuristics): the lanes are the 16 coordinates
of a block (structure of arrays within the block: one AVX-512 register of fp32, two AVX2 ones),
and each coordinate's ``W`` is read and written row by row as vectors of ``f``. No fast-math (no
FMA contraction, no reassociation), and exp/sigmoid/tanh are a polynomial of ours (within ~2 ulp)
rather than libm calls, so the results are bit-identical across x86 ISA levels and thread counts
(tested: AVX-512, AVX2 and baseline x86-64, on 1 and 2 threads). torch's inductor C++ backend was
the alternative: it needs a C++ compiler on the user's machine and a fallback without one, and
its code for the reference step was slower than the eager reference (bench/RESULTS.md).

**Threads.** The coordinates are cut into chunks of ``CHUNK`` (never straddling two tensors) that
the threads take off an atomic counter, so a thread on a busy core simply takes fewer. The calling
thread works too and never waits for a helper that has not started: a helper must claim its slot
(compare-and-swap) before it works, and the caller closes the unclaimed slots when the chunks run
out, so a helper the OS has not scheduled yet costs nothing. Helpers are plain daemon threads (the
kernel releases the GIL), not numba's parallel layer: no OpenMP/TBB runtime, no spinning workers
competing with torch's intra-op pool, fork-safe. ``threads=None`` is :func:`default_threads`.

**Non-finite policy** (as the Triton kernel): ``found_inf`` set by the caller's check, or a
non-finite MGG weight (checked on every call): nothing is written, no step count advances,
``found_inf`` becomes 1 and ``skipped`` gains it.

**Supported:** head dim f in {8, 16, 32}, ``nh * f <= 64`` (as the Triton kernels); float32
state, ``memory_W`` float32 or bfloat16; CPU tensors.

**Compile time.** The first call for an MGG size and memory dtype compiles its kernel (seconds;
bench/RESULTS.md has the figures). numba caches the machine code on disk (``cache=True``: in
``__pycache__`` next to this module, or in ``NUMBA_CACHE_DIR`` or the user's cache directory
when the install is read-only; with no writable place at all it compiles in every process, which
was checked with a read-only install), so a later process only loads it.

Speed against torch Adam and the machine's copy bandwidth, idle and with a core busy, and of
other MGG sizes: ``pytest bench/test_bench_cpu_step.py --benchmark-only``; the measured figures
are in bench/RESULTS.md.
"""

from __future__ import annotations

import array
import functools
import importlib
import operator
import os
import queue
import threading
from collections.abc import Sequence
from itertools import compress, repeat

import numpy as np
import torch
from torch import Tensor

from mgg_fast.core import reference  # the math and its constants (the package's only import here)

SUPPORTED_HEAD_DIMS = (8, 16, 32)
MAX_HIDDEN = 64  # nh * f
CHUNK = 1024  # coordinates per work item that the threads take in turn (never straddles tensors)
PARALLEL_MIN_COORDS = 16 * CHUNK  # default_threads: one thread below this many stepped coordinates
COORDS_PER_THREAD = 8 * CHUNK  # default_threads: at most one thread per this many coordinates
MAX_DEFAULT_THREADS = 8
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
NOT_STEPPED = -1
# rows of the per-call parameter table: parameter address, gradient address, dtype code (-1: not
# stepped), numel, flat offset, first chunk (the last two filled in by the kernel's preparation)
_TABLE_ROWS = 6


@functools.cache
def _jit_module():
    """:mod:`mgg_fast.kernels.cpu_step_jit` (imports numba), or ``RuntimeError`` saying why not."""
    try:
        return importlib.import_module(".cpu_step_jit", __package__)
    except Exception as exc:
        raise RuntimeError(f"the CPU MGG step needs numba, which failed to import: {exc!r}") from exc


@functools.cache
def cpu_step_unavailable_reason() -> str | None:
    """Why :func:`cpu_mgg_step_` cannot run here (``None``: it can). The first call imports numba,
    compiles the kernel of the default MGG (one head of 8; seconds, then cached on disk) and
    checks one small step against :func:`mgg_fast.reference.optimizer_step`."""
    try:
        _self_test()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def cpu_step_available() -> bool:
    """Whether the fused CPU step works here (see :func:`cpu_step_unavailable_reason` for why not)."""
    return cpu_step_unavailable_reason() is None


def _self_test() -> None:
    """One step of a 5-coordinate float32 parameter with a random MGG (1 head of 8), against
    the reference, with loose tolerances: a smoke test of the compiled code, not the test suite."""
    gen = torch.Generator().manual_seed(0)
    h, nh = 8, 1
    shapes = [(h, 2), (h, 2), (h, 2), (1, h), (h,), (h,), (nh, h), (nh, h), (nh, 1, 2), (nh, 1), (1,)]
    weights = reference.MGGWeights(*(0.3 * torch.randn(s, generator=gen) for s in shapes))
    n = 5
    grad = torch.randn(n, generator=gen)
    param = torch.randn(n, generator=gen)
    W = (0.2 * torch.randn(n, nh, h, h, generator=gen)).contiguous()
    b = 0.2 * torch.randn(n, nh, h, generator=gen)
    ref = reference.optimizer_step(
        grad,
        torch.zeros(n),
        torch.zeros(n),
        W.clone(),
        b.clone(),
        1.0,
        weights,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
    )
    expected = param.clone()
    reference.apply_update([expected], ref.update, 0.1)
    m, v, steps = torch.zeros(n), torch.zeros(n), torch.zeros(1)
    cpu_mgg_step_(
        [param], [grad], m, v, W, b, steps, weights, num_heads=nh, head_dim=h,
        lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, found_inf=torch.zeros(1), threads=1,
    )  # fmt: skip
    for got, want in (
        (param, expected),
        (m, ref.exp_avg),
        (v, ref.exp_avg_sq),
        (W, ref.memory_W),
        (b, ref.memory_b),
    ):
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
            raise RuntimeError("the compiled CPU step does not match the reference on a small case")
    if steps.item() != 1.0:
        raise RuntimeError("the compiled CPU step did not advance the step count")


def check_cpu_shape(num_heads: int, head_dim: int) -> None:
    """Raise ``ValueError`` for MGG sizes this kernel is not built for."""
    if head_dim not in SUPPORTED_HEAD_DIMS or num_heads < 1 or num_heads * head_dim > MAX_HIDDEN:
        raise ValueError(
            f"the CPU MGG step supports head dim f in {SUPPORTED_HEAD_DIMS} and hidden size "
            f"nh*f <= {MAX_HIDDEN}; got nh={num_heads}, f={head_dim}. Use backend='reference'."
        )


class _Helpers:
    """Daemon helper threads, started on first use, each fed by its own queue. A job that a helper
    reaches after the step has ended finds its slot closed and returns at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: list[queue.SimpleQueue] = []

    def get(self, n: int) -> list[queue.SimpleQueue]:
        with self.lock:
            while len(self.queues) < n:
                q: queue.SimpleQueue = queue.SimpleQueue()
                name = f"mgg-cpu-step-{len(self.queues) + 1}"
                threading.Thread(target=_helper_loop, args=(q,), name=name, daemon=True).start()
                self.queues.append(q)
            return self.queues[:n]

    def forget(self) -> None:  # in a forked child: the threads did not come along
        self.lock = threading.Lock()
        self.queues = []


def _helper_loop(q: queue.SimpleQueue) -> None:
    while True:
        q.get()()


class _Job:
    __slots__ = ("args", "done", "error", "kernel")

    def __init__(self, kernel, args) -> None:
        self.kernel, self.args = kernel, args
        self.done = threading.Event()
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            self.kernel(*self.args)
        except BaseException as exc:  # handed to the caller
            self.error = exc
        finally:
            self.done.set()


_HELPERS = _Helpers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELPERS.forget)

_DTYPE_CODE = DTYPE_CODES.__getitem__
_data_ptr_of = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous
_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_is_cpu = operator.attrgetter("is_cpu")
_NO_SKIP_COUNTER = np.zeros(0, np.float32)


def default_threads(num_coords: int) -> int:
    """Threads for a step of ``num_coords`` stepped coordinates when ``threads`` is not given: one
    below ``PARALLEL_MIN_COORDS`` (a helper's wake-up would cost more than it saves), else one per
    ``COORDS_PER_THREAD`` coordinates, at most the CPUs this process may run on and at most
    ``MAX_DEFAULT_THREADS``. Measured on 2 cores at 38,400 coordinates: 2 threads beat 1 idle
    and with another process spinning on one core (see the module docstring)."""
    if num_coords < PARALLEL_MIN_COORDS:
        return 1
    return max(1, min(MAX_DEFAULT_THREADS, _usable_cpus(), num_coords // COORDS_PER_THREAD))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_mgg_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    memory_W: Tensor,
    memory_b: Tensor,
    steps: Tensor,
    weights: Sequence[Tensor],
    *,
    num_heads: int,
    head_dim: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    found_inf: Tensor,
    skipped: Tensor | None = None,
    threads: int | None = None,
) -> None:
    """One fused MGG optimizer step, on the CPU, of a group whose state is packed in flat buffers.

    The arguments mean what they mean for :func:`mgg_fast.kernels.mgg_step.mgg_step_` (without
    its ``layout``/``block``/``num_warps``): ``params`` the packed parameters in order (float32,
    bfloat16, float16 or float64; any strides), ``grads`` aligned with them (each of its
    parameter's dtype and shape; ``None``: that parameter, its state and its step count stay as
    they are), ``exp_avg``/``exp_avg_sq`` ``[N]`` and ``memory_b`` ``[N, nh, f]`` float32,
    ``memory_W`` ``[N, nh, f, f]`` float32 or bfloat16, ``steps`` ``[P]`` float32 (advanced by one
    for the stepped parameters), ``weights`` the MGG's float32 tensors in ``MGGWeights`` order.
    ``found_inf`` (float32, one element) set by the caller's non-finite check, or a non-finite
    MGG weight: nothing is written, no step count advances and ``found_inf`` is 1 afterwards;
    ``skipped`` (float32, one element, optional) gains ``found_inf``. Every tensor on the CPU,
    the state buffers contiguous; the caller validates the rest. ``threads``: how many threads
    share the coordinates (``None``: :func:`default_threads`).
    """
    check_cpu_shape(num_heads, head_dim)
    jit = _jit_module()
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    for name, t in (
        ("exp_avg", exp_avg),
        ("exp_avg_sq", exp_avg_sq),
        ("memory_b", memory_b),
        ("steps", steps),
    ):
        if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous float32 CPU tensor")
    memory_ok = memory_W.dtype in (torch.float32, torch.bfloat16) and memory_W.is_cpu
    if not memory_ok or not memory_W.is_contiguous():
        raise TypeError(f"memory_W must be a contiguous float32 or bfloat16 tensor, got {memory_W.dtype}")
    wts = torch.cat([t.detach().reshape(-1) for t in weights])
    if wts.dtype != torch.float32 or not wts.is_cpu or wts.numel() != _num_weights(num_heads, head_dim):
        raise TypeError("weights must be the MGG's float32 tensors in MGGWeights order")

    copies: list[tuple[Tensor, Tensor]] = []  # (non-contiguous parameter, its contiguous working copy)
    if (
        not any(map(operator.is_, grads, repeat(None)))
        and all(map(_is_contiguous, params))
        and all(map(_is_contiguous, grads))
    ):
        work_params, work_grads = params, grads  # the common case, in C-level passes
        stepped = None
    else:
        work_params, work_grads, stepped = [], [], []
        for p, g in zip(params, grads, strict=True):
            if g is not None and not g.is_contiguous():
                g = g.contiguous()
            if g is not None and not p.is_contiguous():
                copies.append((p, p.contiguous()))
                p = copies[-1][1]
            work_params.append(p)
            work_grads.append(p if g is None else g)  # any address: not read
            stepped.append(g is not None)
    # the kernel reads and writes through raw addresses: what could make it touch memory it
    # should not is checked here (a few C-level passes), before anything changes
    n = len(work_params)
    dtypes = list(map(_dtype, work_params))
    if not set(dtypes) <= DTYPE_CODES.keys():
        raise TypeError(
            f"parameters must be float32/float64/bfloat16/float16, got {sorted(map(str, set(dtypes)))}"
        )
    if list(map(_dtype, work_grads)) != dtypes or list(map(_shape, work_grads)) != list(
        map(_shape, work_params)
    ):
        raise TypeError("each gradient must have its parameter's dtype and shape")
    if not all(map(_is_cpu, work_params)) or not all(map(_is_cpu, work_grads)):
        raise ValueError("the CPU MGG step needs CPU parameters and gradients")
    numels = list(map(_numel, work_params))
    total, hidden = sum(numels), num_heads * head_dim
    sizes = (exp_avg.numel(), exp_avg_sq.numel(), memory_W.numel(), memory_b.numel(), steps.numel())
    if sizes != (total, total, total * hidden * head_dim, total * hidden, n):
        raise ValueError(
            f"state sizes {sizes} do not fit {n} parameters of {total} coordinates and an MGG of "
            f"{num_heads} head(s) of {head_dim}"
        )
    for name, t in (("found_inf", found_inf), ("skipped", skipped)):
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu or t.numel() != 1):
            raise TypeError(f"{name} must be a one-element float32 CPU tensor")
    codes = list(map(_DTYPE_CODE, dtypes))
    if stepped is not None:
        codes = [c if s else NOT_STEPPED for c, s in zip(codes, stepped, strict=True)]
    columns = array.array("q", [*map(_data_ptr_of, work_params), 0, *map(_data_ptr_of, work_grads), 0])
    columns.extend([*codes, NOT_STEPPED, *numels, 0])
    columns.frombytes(bytes(16 * (n + 1)))  # rows 4, 5: filled by _prepare
    table = np.frombuffer(columns, dtype=np.int64).reshape(_TABLE_ROWS, n + 1)
    bcs = np.empty((2, n), np.float32)
    wts_np = wts.numpy()
    found = found_inf.numpy().reshape(-1)
    counter = _NO_SKIP_COUNTER if skipped is None else skipped.numpy().reshape(-1)
    chunks = jit._prepare_jit(
        table, bcs, steps.numpy(), found, counter, wts_np, float(beta1), float(beta2), CHUNK
    )
    if chunks > 0:
        kernel = jit._kernel(
            num_heads, head_dim, memory_W.dtype == torch.bfloat16, reference.LN_EPS, reference.TTT_BASE_LR
        )
        if threads is None:
            threads = default_threads(total if stepped is None else sum(compress(numels, stepped)))
        helpers = min(threads, chunks) - 1
        ctrl = np.zeros(1 + helpers, np.int64)
        args = (
            table, bcs, chunks, CHUNK, wts_np,
            exp_avg.data_ptr(), exp_avg_sq.data_ptr(), memory_W.data_ptr(), memory_b.data_ptr(),
            np.float32(lr), float(lr), np.float32(beta1), np.float32(1.0 - beta1),
            np.float32(beta2), np.float32(1.0 - beta2), np.float32(eps),
        )  # fmt: skip
        jobs = []
        for slot, q in enumerate(_HELPERS.get(helpers), start=1):
            jobs.append(_Job(kernel, (ctrl, slot, *args)))
            q.put(jobs[-1])
        started = kernel(ctrl, -1, *args)
        for i, job in enumerate(jobs):
            if started >> i & 1:
                job.done.wait()
                if job.error is not None:
                    raise job.error
    for p, w in copies:
        p.copy_(w)


def _num_weights(num_heads: int, head_dim: int) -> int:
    return 11 * num_heads * head_dim + 3 * num_heads + 1
