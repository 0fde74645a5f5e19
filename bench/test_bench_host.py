"""Host (Python) cost of a plain, validating fused ``opt.step()``, measured on the CPU with the
kernel launches stubbed out: what the DESIGN.md target "<= 50 us at 50 tensors" is about.

ViT-B/16 scale: 50 parameter tensors of 768 with fresh gradient tensors every step (subtract
``grad-clones-alone``). The Triton launches are replaced by no-ops, so what remains is the
optimizer's Python: validation, the state check, the address table and the torch calls.
``check-stubbed`` also stubs torch's fused non-finite check (a C++ launch on a GPU; on the CPU it
computes over every gradient element, which a GPU does off the host). ``floor-*``: torch's step
wrapper around nothing, and around only the checks a validating step cannot skip. Beside them,
torch's ``Adam(foreach=True)`` on the same tensors (it computes too: an upper bound of its host
cost).

Run: ``TRITON_INTERPRET=1 pytest bench/test_bench_host.py --benchmark-only``. On a VM whose speed
drifts between cases, ``TRITON_INTERPRET=1 python bench/test_bench_host.py`` times the same cases
in turn, round after round, in one process, and prints min and median of each less the clones.
"""

import array
import os
import statistics
import timeit
from collections.abc import Callable

import pytest
import torch

from mgg_fast import MGG, MGGOptimizer

NUM_TENSORS, DIM = 50, 768

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="stubs the launches of the interpreted kernels"
)

Patch = Callable[[object, str, object], None]  # monkeypatch.setattr, or setattr


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _Bare(torch.optim.Optimizer):
    """A torch optimizer whose ``step()`` runs only ``work``, inside torch's step wrapper (hooks,
    ``record_function``) and ``no_grad``, as every optimizer's step does."""

    def __init__(self, params, work):
        super().__init__(params, {})
        self._work = work

    @torch.no_grad()
    def step(self, closure=None):
        self._work()


def _tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(DIM, generator=gen).requires_grad_(True) for _ in range(NUM_TENSORS)]
    for p in params:
        p.grad = torch.randn(DIM, generator=gen)
    return params


def _with_fresh_grads(params: list[torch.Tensor], then: Callable[[], object]) -> Callable[[], None]:
    """A step that gives every parameter a new gradient tensor (as backward does), then calls ``then``."""
    grads = [p.grad for p in params]

    def step():
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        then()

    return step


def _fused_step(patch: Patch, stub_check: bool) -> Callable[[], None]:
    from mgg_fast.kernels import mgg_step

    params = _tensors()
    opt = MGGOptimizer(params, MGG(), lr=1e-3, backend="triton")
    opt.step()  # the first step packs the state (and really launches, under the interpreter)
    patch(mgg_step, "_mgg_step_kernel", _NoLaunch())
    patch(mgg_step, "_advance_steps_kernel", _NoLaunch())
    if stub_check:
        patch(torch, "_amp_foreach_non_finite_check_and_unscale_", lambda *a: None)
    return _with_fresh_grads(params, opt.step)


def _floor(work: str) -> Callable[[], None]:
    """torch's step wrapper around nothing, or around only the checks a validating MGG step
    cannot skip, the fused step's own: the state record, the gradients' types, shapes, dtypes,
    contiguity and devices, and the address table."""
    from mgg_fast.kernels.mgg_step import _device_table

    params = _tensors()
    opt = MGGOptimizer(params, MGG(), lr=1e-3, backend="triton")
    opt.step()
    pack, record, device = opt._packs[0], opt._state_record, params[0].device

    def checks():
        grads = [p.grad for p in params]
        assert record.matches(opt.state) and pack.steps_all(params, grads, device)
        addresses = [*map(torch.Tensor.data_ptr, params), *map(torch.Tensor.data_ptr, grads)]
        _device_table(array.array("q", addresses + [1] * len(params)), device, [])

    return _with_fresh_grads(params, _Bare(params, checks if work == "checks-only" else lambda: None).step)


def _grad_clones() -> Callable[[], None]:
    return _with_fresh_grads(_tensors(), lambda: None)


@pytest.mark.benchmark(group="host-step-50x768")
@pytest.mark.parametrize("stub_check", [False, True], ids=["check-real", "check-stubbed"])
def test_fused_step_host_cost(benchmark, monkeypatch, stub_check):
    benchmark.extra_info["tensors"] = NUM_TENSORS
    benchmark(_fused_step(monkeypatch.setattr, stub_check))


@pytest.mark.benchmark(group="host-step-50x768")
@pytest.mark.parametrize("work", ["nothing", "checks-only"])
def test_step_floor(benchmark, work):
    benchmark(_floor(work))


@pytest.mark.benchmark(group="host-step-50x768")
def test_grad_clones_alone(benchmark):
    """What the cases above spend on giving every parameter a new gradient tensor (subtract it)."""
    benchmark(_grad_clones())


@pytest.mark.benchmark(group="host-step-50x768")
def test_adam_foreach_step(benchmark):
    params = _tensors()
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    benchmark.extra_info["label"] = "torch Adam(foreach)"
    benchmark(opt.step)


def _round_robin(rounds: int = 40, number: int = 100) -> None:
    cases = {"grad clones alone": _grad_clones()}
    cases.update({f"floor, {work}": _floor(work) for work in ("nothing", "checks-only")})
    cases["fused step, check stubbed"] = _fused_step(setattr, stub_check=True)  # stubs for good
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, step in cases.items():
            times[name].append(timeit.timeit(step, number=number) / number * 1e6)
    base = times["grad clones alone"]
    for name, ts in times.items():
        print(
            f"{name:28s} min {min(ts):7.1f} us, median {statistics.median(ts):7.1f} us; less the clones: "
            f"min {min(ts) - min(base):6.1f}, median {statistics.median(ts) - statistics.median(base):6.1f}"
        )


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (the stubbed kernels are the interpreted ones)")
    _round_robin()
