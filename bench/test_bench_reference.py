"""CPU benchmark of the reference MGG optimizer step at ViT-B/16 norm scale, beside torch's Adam.

ViT-B/16 has 50 LayerNorm affine tensors of 768 = 38,400 coordinates. Run with
``pytest bench/test_bench_reference.py --benchmark-only``; compare the two means of one run.
"""

import pytest
import torch

from mgg_fast import MGG, MGGOptimizer

NUM_TENSORS, DIM = 50, 768


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(DIM, generator=gen).requires_grad_(True) for _ in range(NUM_TENSORS)]
    for p in params:
        p.grad = torch.randn(DIM, generator=gen)
    return params


@pytest.mark.benchmark(group="cpu-step-38400")
def test_adam_foreach_step(benchmark):
    params = _tensors()
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    benchmark.extra_info.update(coords=NUM_TENSORS * DIM, label="torch Adam(foreach)")
    benchmark(opt.step)


@pytest.mark.benchmark(group="cpu-step-38400")
@pytest.mark.parametrize(
    ("backend", "memory_W_dtype"),
    [("reference", None), ("reference", torch.bfloat16)],
    ids=["reference", "reference-bf16-memory"],
)
def test_mgg_step(benchmark, backend, memory_W_dtype):
    """The eager reference, and the eager reference with memory_W stored as bf16 (converted to
    fp32 and back each step)."""
    torch.manual_seed(0)
    params = _tensors()
    opt = MGGOptimizer(params, MGG(hidden_size=8), lr=1e-3, backend=backend, memory_W_dtype=memory_W_dtype)
    opt.step()  # first step: state allocation
    label = "MGG reference" + (", bf16 memory" if memory_W_dtype is not None else "")
    benchmark.extra_info.update(coords=NUM_TENSORS * DIM, label=label)
    benchmark(opt.step)
    assert torch.isfinite(torch.cat([p.detach() for p in params])).all()
