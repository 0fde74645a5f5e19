"""Differential fuzz of the fused step (``backend="triton"``) against the reference backend.

Each seeded case draws an MGG size the kernels support (head dim 8/16/32, hidden <= 64), the
memory storage dtype, parameters (0, 1 or a few hundred elements, fp32/bf16/fp16/fp64, some
non-contiguous, in one or two groups) and several steps of gradients (missing, empty,
non-contiguous, tiny to huge, now and then NaN/Inf). Both optimizers take the same steps; after
each one the parameters, the state, the step counts and the skipped-step count must agree, and
the reference is then set to the fused values so that every step is compared from identical
inputs (one step's rounding, not an accumulated drift). The default run is a few cases (the
interpreter is slow); set ``MGG_FUZZ_CASES`` (e.g. 300) for a larger run, ``MGG_FUZZ_FIRST`` to
start at another seed.
"""

import copy
import os
import random
from dataclasses import dataclass

import pytest
import torch
from helpers import F32, random_mgg
from torch.testing import assert_close

from mgg_fast import MGGOptimizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernels on CPU

HEAD_CONFIGS = {8: (1, 2, 4, 8), 16: (1, 2, 4), 32: (1, 2)}  # head dim f -> head counts, nh * f <= 64
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GRAD_EXPONENTS = {  # log10 range of gradient scales that the dtype (and g * g in fp32) holds
    torch.float32: (-20, 15),
    torch.bfloat16: (-20, 15),
    torch.float16: (-3, 3),
    torch.float64: (-20, 15),
}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "memory_W", "memory_b")
DEFAULT_CASES = 8
FIRST = int(os.environ.get("MGG_FUZZ_FIRST", "0"))
SEEDS = range(FIRST, FIRST + int(os.environ.get("MGG_FUZZ_CASES", str(DEFAULT_CASES))))


@dataclass
class Tensor_:
    shape: tuple[int, ...]
    dtype: torch.dtype
    contiguous: bool


@dataclass
class Case:
    seed: int
    heads: int
    head_dim: int
    memory: torch.dtype | None
    lr: float
    betas: tuple[float, float]
    tensors: list[Tensor_]
    # per step and tensor: None (no gradient) or (log10 scale, contiguous, bad value or None)
    grads: list[list[tuple[float, bool, float | None] | None]]
    split: int  # tensors[split:] form a second parameter group (lr / 2) when 0 < split


def draw_case(seed: int) -> Case:
    """A random case; seed by seed the head dim, the memory dtype and the first tensor's dtype
    cycle, so that a few seeds already cover every one of them."""
    rng = random.Random(seed)
    f = (8, 16, 32)[seed % 3]
    heads = rng.choice(HEAD_CONFIGS[f])
    memory = (None, torch.bfloat16)[(seed // 3) % 2]
    tensors = []
    for i in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.25:
            shape = rng.choice([(0,), (1,), (), (1, 1), (0, 3)])
        elif kind < 0.6:
            shape = (rng.randint(2, 300),)
        else:
            shape = (rng.randint(1, 12), rng.randint(2, 20))
        dtype = PARAM_DTYPES[seed % 4] if i == 0 else rng.choice(PARAM_DTYPES)
        contiguous = len(shape) == 0 or rng.random() < 0.7
        tensors.append(Tensor_(shape, dtype, contiguous))
    grads = []
    for _ in range(rng.randint(2, 4)):
        row = []
        for t in tensors:
            if rng.random() < 0.2:
                row.append(None)
                continue
            lo, hi = GRAD_EXPONENTS[t.dtype]
            bad = rng.choice([float("nan"), float("inf"), -float("inf")]) if rng.random() < 0.05 else None
            row.append((rng.uniform(lo, hi), rng.random() < 0.7, bad))
        grads.append(row)
    lr = rng.choice([1e-3, 0.05, 0.5])
    betas = (rng.choice([0.0, 0.5, 0.9]), rng.choice([0.9, 0.99, 0.999]))
    split = rng.randint(1, len(tensors) - 1) if len(tensors) > 1 and rng.random() < 0.4 else 0
    return Case(seed, heads, f, memory, lr, betas, tensors, grads, split)


def laid_out(values: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """``values`` on DEVICE as they are, or as a non-contiguous tensor with the same shape and values."""
    if contiguous or values.dim() == 0:
        return values.to(DEVICE, copy=True)
    if values.dim() == 1:
        out = torch.zeros(values.shape[0], 2, dtype=values.dtype, device=DEVICE)[:, 0]
    else:
        out = torch.zeros(values.shape[::-1], dtype=values.dtype, device=DEVICE).t()
    return out.copy_(values)


def make_params(case: Case) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    return [
        laid_out(torch.randn(t.shape, generator=gen).to(t.dtype), t.contiguous).requires_grad_(True)
        for t in case.tensors
    ]


def make_grads(case: Case, step: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(10_000 * case.seed + step)
    grads = []
    for t, spec in zip(case.tensors, case.grads[step], strict=True):
        if spec is None:
            grads.append(None)
            continue
        log_scale, contiguous, bad = spec
        g = torch.randn(t.shape, generator=gen, dtype=torch.float64) * 10.0**log_scale
        if bad is not None and g.numel():
            g.view(-1)[0] = bad
        grads.append(laid_out(g.to(t.dtype), contiguous))
    return grads


def groups(case: Case, params: list[torch.Tensor]) -> list[dict]:
    if not case.split:
        return [{"params": params}]
    return [{"params": params[: case.split]}, {"params": params[case.split :], "lr": case.lr / 2}]


def low_precision_tol(dtype: torch.dtype) -> dict[str, float]:
    """F32, widened by one rounding to ``dtype`` where it is narrower than fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return {"rtol": F32["rtol"] + torch.finfo(dtype).eps, "atol": F32["atol"]}
    return F32


def compare(case, step, fused, opt_f, ref, opt_r):
    where = f"seed {case.seed} step {step}"
    assert opt_f.num_skipped_steps == opt_r.num_skipped_steps, where
    for i, (p, q) in enumerate(zip(fused, ref, strict=True)):
        assert p.stride() == q.stride(), f"{where}: parameter {i} changed layout"
        assert_close(
            p.detach(),
            q.detach(),
            **low_precision_tol(p.dtype),
            msg=lambda m, w=f"{where} param {i}": f"{w}: {m}",
        )
        st_f, st_r = opt_f.state.get(p), opt_r.state.get(q)
        assert bool(st_f) == bool(st_r), f"{where}: state of parameter {i} exists in one backend only"
        if not st_f:
            continue
        assert float(st_f["step"]) == float(st_r["step"]), f"{where} parameter {i}: step count"
        for key in STATE_KEYS:
            a, b = st_f[key], st_r[key]
            assert a.dtype == b.dtype, f"{where} {key}"
            assert_close(
                a.float(),
                b.float(),
                **low_precision_tol(a.dtype),
                msg=lambda m, w=f"{where} param {i} {key}": f"{w}: {m}",
            )


def resync(fused, opt_f, ref, opt_r):
    """Set the reference to the fused values (in place: its state stays the same views)."""
    with torch.no_grad():
        for p, q in zip(fused, ref, strict=True):
            q.copy_(p)
            if opt_r.state.get(q):
                for key in STATE_KEYS:
                    opt_r.state[q][key].copy_(opt_f.state[p][key])


@pytest.mark.parametrize("seed", SEEDS)
def test_fused_matches_reference(seed):
    case = draw_case(seed)
    mgg = random_mgg(case.heads * case.head_dim, case.heads, seed=seed).to(DEVICE)
    weights = copy.deepcopy(mgg.state_dict())
    fused, ref = make_params(case), make_params(case)
    kw = {"lr": case.lr, "betas": case.betas, "memory_W_dtype": case.memory}
    opt_f = MGGOptimizer(groups(case, fused), copy.deepcopy(mgg), backend="triton", **kw)
    opt_r = MGGOptimizer(groups(case, ref), copy.deepcopy(mgg), backend="reference", **kw)
    for step in range(len(case.grads)):
        grads = make_grads(case, step)
        for p, q, g in zip(fused, ref, grads, strict=True):
            p.grad = g
            q.grad = None if g is None else g.clone()
        opt_f.step()
        opt_r.step()
        compare(case, step, fused, opt_f, ref, opt_r)
        resync(fused, opt_f, ref, opt_r)
    for opt in (opt_f, opt_r):  # neither backend wrote into the learned MGG
        for k, v in opt.mgg.state_dict().items():
            assert torch.equal(v, weights[k]), k


def test_default_cases_cover_the_space():
    """The seeds of the default run reach every head dim, memory dtype and parameter dtype, and
    the edge cases the fuzz is for (so the default run is not a lucky few easy cases)."""
    cases = [draw_case(s) for s in range(DEFAULT_CASES)]
    assert {c.head_dim for c in cases} == {8, 16, 32}
    assert {c.memory for c in cases} == {None, torch.bfloat16}
    assert {t.dtype for c in cases for t in c.tensors} == set(PARAM_DTYPES)
    numels = [torch.Size(t.shape).numel() for c in cases for t in c.tensors]
    assert 0 in numels and 1 in numels and max(numels) > 128  # more than one program
    assert any(not t.contiguous for c in cases for t in c.tensors)
    specs = [g for c in cases for row in c.grads for g in row]
    assert None in specs and any(g is not None and not g[1] for g in specs)
    assert any(g is not None and g[2] is not None for g in specs)  # a NaN/Inf step
    assert any(c.split for c in cases)  # two parameter groups
