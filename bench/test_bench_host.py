"""Host (Python) cost of a plain, validating fused ``opt.step()``, measured on the CPU with the
kernel launches stubbed out: what the DESIGN.md target "<= 50 us at 50 tensors" is about.

ViT-B/16 scale: 50 parameter tensors of 768 with fresh gradient tensors. The Triton launches are
replaced by no-ops, so what remains is the optimizer's Python: validation, the state check,
the address table and the torch calls. ``check-stubbed`` also stubs torch's fused non-finite
check (a C++ launch on a GPU; on the CPU it computes over every gradient element, which a GPU
does off the host). Beside it, torch's ``Adam(foreach=True)`` on the same tensors (it computes
too: an upper bound of its host cost). Run: ``pytest bench/test_bench_host.py --benchmark-only``.
"""

import os

import pytest
import torch

from mgg_fast import MGG, MGGOptimizer

NUM_TENSORS, DIM = 50, 768

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="stubs the launches of the interpreted kernels"
)


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(DIM, generator=gen).requires_grad_(True) for _ in range(NUM_TENSORS)]
    for p in params:
        p.grad = torch.randn(DIM, generator=gen)
    return params


@pytest.mark.benchmark(group="host-step-50x768")
@pytest.mark.parametrize("stub_check", [False, True], ids=["check-real", "check-stubbed"])
def test_fused_step_host_cost(benchmark, monkeypatch, stub_check):
    from mgg_fast.kernels import mgg_step

    params = _tensors()
    opt = MGGOptimizer(params, MGG(), lr=1e-3, backend="triton")
    opt.step()  # the first step packs the state (and really launches, under the interpreter)
    monkeypatch.setattr(mgg_step, "_mgg_step_kernel", _NoLaunch())
    monkeypatch.setattr(mgg_step, "_advance_steps_kernel", _NoLaunch())
    if stub_check:
        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", lambda *a: None)
    grads = [p.grad for p in params]

    def step():
        for p, g in zip(params, grads, strict=True):  # new gradient tensors each step, as backward gives
            p.grad = g.clone()
        opt.step()

    benchmark.extra_info["tensors"] = NUM_TENSORS
    benchmark(step)


@pytest.mark.benchmark(group="host-step-50x768")
def test_grad_clones_alone(benchmark):
    """What the loop above spends on giving every parameter a new gradient tensor (subtract it)."""
    params = _tensors()
    grads = [p.grad for p in params]

    def step():
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()

    benchmark(step)


@pytest.mark.benchmark(group="host-step-50x768")
def test_adam_foreach_step(benchmark):
    params = _tensors()
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    benchmark(opt.step)


class _Bare(torch.optim.Optimizer):
    """A torch optimizer whose ``step()`` runs only ``work``, inside torch's step wrapper (hooks,
    ``record_function``) and ``no_grad``, as every optimizer's step does."""

    def __init__(self, params, work):
        super().__init__(params, {})
        self._work = work

    @torch.no_grad()
    def step(self, closure=None):
        self._work()


@pytest.mark.benchmark(group="host-step-50x768")
@pytest.mark.parametrize("work", ["nothing", "checks-only"])
def test_step_floor(benchmark, work):
    """What the host target leaves for: torch's step wrapper around nothing, and around only the
    checks a validating MGG step cannot skip, the fused step's own: the state record, the
    gradients' types, shapes, dtypes, contiguity and devices, and the address table (fresh
    gradients each step, as in ``test_fused_step_host_cost``; subtract ``test_grad_clones_alone``)."""
    import array

    from mgg_fast.kernels.mgg_step import _device_table

    params = _tensors()
    opt = MGGOptimizer(params, MGG(), lr=1e-3, backend="triton")
    opt.step()
    pack, record, device = opt._packs[0], opt._state_record, params[0].device
    grads = [p.grad for p in params]

    def checks():
        now = [p.grad for p in params]
        assert record.matches(opt.state) and pack.steps_all(params, now, device)
        table = array.array("q", [*map(torch.Tensor.data_ptr, params), *map(torch.Tensor.data_ptr, now)])
        _device_table(table + array.array("q", [1] * len(params)), device, [])

    bare = _Bare(params, checks if work == "checks-only" else lambda: None)

    def step():
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        bare.step()

    benchmark(step)
