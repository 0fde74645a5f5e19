"""The fused optimizer step (``backend="triton"``) against the parity vectors and the reference step.

Runs on CPU through TRITON_INTERPRET=1 (tests/conftest.py); every program costs ~0.1 s there,
so tensors are small (a few chunks of 128 coordinates per step).
"""

import copy
import io

import pytest
import torch
import triton
from helpers import F32
from mgg_fast.flat_state import FlatState
from mgg_fast.kernels import StepGuard, fused_group_step, fused_group_update, prepare_group
from mgg_fast.kernels.mgg_step import CAPTURED_PLANS_KEY, TABLE_CACHE_KEY
from mgg_fast.kernels.step_prologue import forced_pdl
from torch.testing import assert_close

from mgg_fast import MGG, MGGOptimizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(0,), (), (1,), (3, 5), (130,), (2, 4)]  # 130 spans two chunks, not a block multiple
STATE_KEYS = ("exp_avg", "exp_avg_sq", "memory_W", "memory_b", "step")
DTYPE_TOL = {  # parameters: one rounding of an fp32 result to the storage dtype may differ
    torch.float32: F32,
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}


@pytest.fixture(autouse=True)
def _default_device():
    """Tensors and MGGs of these tests live on the GPU when there is one (else the interpreter)."""
    with torch.device(DEVICE):
        yield


def random_mgg(hidden: int = 8, heads: int = 1, seed: int = 0) -> MGG:
    torch.manual_seed(seed)
    mgg = MGG(hidden, heads)
    with torch.no_grad():
        for p in mgg.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mgg


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator(DEVICE).manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in shapes]


def twin_optimizers(mgg, shapes, dtype=torch.float32, **kw):
    """Identical parameters under the reference and the fused backend (state: float32)."""
    params = make_params(shapes, dtype)
    fused = [p.detach().clone().requires_grad_(True) for p in params]
    ref_opt = MGGOptimizer(params, copy.deepcopy(mgg), lr=0.05, backend="reference", **kw)
    fused_opt = MGGOptimizer(fused, copy.deepcopy(mgg), lr=0.05, backend="triton", **kw)
    return params, ref_opt, fused, fused_opt


def set_grads(params, seed, scale=2.0, none=()):
    gen = torch.Generator(DEVICE).manual_seed(seed)
    for i, p in enumerate(params):
        g = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        p.grad = None if i in none else g


def copy_grads(src, dst):
    for p, q in zip(src, dst, strict=True):
        q.grad = None if p.grad is None else p.grad.clone()


def step_twins(ref_params, ref_opt, params, opt, seed, **grad_kw):
    """Give both twins the same fresh gradients and take one step with each optimizer."""
    set_grads(ref_params, seed, **grad_kw)
    copy_grads(ref_params, params)
    ref_opt.step()
    opt.step()


def assert_same_step(ref_params, ref_opt, params, opt, tol=F32):
    for p, q in zip(ref_params, params, strict=True):
        assert_close(q.detach().float(), p.detach().float(), **tol)
        for key in STATE_KEYS:
            assert_close(opt.state[q][key], ref_opt.state[p][key], **F32, msg=lambda m, k=key: f"{k}: {m}")


def snapshot(params, opt):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state
    }


def assert_unchanged(params, opt, snap):
    old_params, old_state = snap
    for p, old in zip(params, old_params, strict=True):
        assert torch.equal(p.detach(), old)
    for p in params:
        for k, v in old_state.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("case", ["hetero", "official_homog"])
def test_optimizer_steps_parity(step_vectors, case):
    d = step_vectors
    c = d["cases"][case]
    mgg = MGG(d["config"]["hidden_size"], d["config"]["num_heads"])
    mgg.load_state_dict(d["state_dict"])
    params = [p.float().to(DEVICE).requires_grad_(True) for p in c["params_init"]]
    opt = MGGOptimizer(
        params, mgg, lr=d["adapt_lr"], betas=(d["beta1"], d["beta2"]), eps=d["eps"], backend="triton"
    )
    for t in range(d["T"]):
        for p, g in zip(params, c["grads"][t], strict=True):
            p.grad = g.float().to(DEVICE)
        opt.step()
        for i, p in enumerate(params):
            assert_close(p.detach().double().cpu(), c["params_f64"][t][i], **F32)
            assert_close(opt.state[p]["exp_avg"].double().cpu(), c["m_f64"][t][i], **F32)
            assert_close(opt.state[p]["exp_avg_sq"].double().cpu(), c["v_f64"][t][i], **F32)
            assert opt.state[p]["step"].item() == t + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_reference_param_dtypes(dtype):
    mgg = random_mgg(seed=1)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, SHAPES, dtype)
    for step in range(3):
        step_twins(ref_params, ref_opt, params, opt, step)
        assert_same_step(ref_params, ref_opt, params, opt, DTYPE_TOL[dtype])
        assert all(p.dtype == dtype for p in params)
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(("hidden", "heads"), [(8, 1), (32, 2)])
def test_fused_matches_reference_with_bf16_memory(hidden, heads):
    """memory_W stored as bf16: the kernel rounds to nearest-even as the reference does, so only
    elements whose fp32 values straddle a rounding boundary may differ (by one bf16 ulp)."""
    mgg = random_mgg(hidden, heads, seed=4)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, SHAPES, memory_W_dtype=torch.bfloat16)
    for step in range(3):
        step_twins(ref_params, ref_opt, params, opt, step, none=(3,) if step == 1 else ())
        for p, q in zip(ref_params, params, strict=True):
            W, ref_W = opt.state[q]["memory_W"], ref_opt.state[p]["memory_W"]
            assert W.dtype == ref_W.dtype == torch.bfloat16
            # one ulp apart; an element rounded differently in an earlier step carries its error
            # (an ulp of its old, possibly larger value) into the next: atol of the largest ulp
            largest_ulp = 2**-7 * ref_W.float().abs().max().item() if ref_W.numel() else 0.0
            assert_close(W.float(), ref_W.float(), rtol=2**-7, atol=largest_ulp)
            # truncating instead of rounding would change about half of them
            assert torch.ne(W, ref_W).sum().item() <= 0.01 * W.numel()
            # a W element one ulp off moves its coordinate's output by ~1e-4 (times lr = 0.05)
            assert_close(q.detach(), p.detach(), rtol=1e-4, atol=1e-5)
            for key in ("exp_avg", "exp_avg_sq", "step"):  # independent of W
                assert_close(opt.state[q][key], ref_opt.state[p][key], **F32)
            assert_close(opt.state[q]["memory_b"], ref_opt.state[p]["memory_b"], rtol=1e-4, atol=1e-5)
    assert ref_opt.state[ref_params[3]]["step"].item() == 2


@pytest.mark.parametrize(("hidden", "heads"), [(16, 2), (24, 3), (32, 1), (64, 2)])
def test_fused_matches_reference_mgg_sizes(hidden, heads):
    mgg = random_mgg(hidden, heads, seed=hidden)
    shapes = [(5, 7), (60,), ()]
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, shapes, betas=(0.8, 0.999))
    for step in range(2):
        step_twins(ref_params, ref_opt, params, opt, 10 + step, scale=5.0)
        assert_same_step(ref_params, ref_opt, params, opt)


def test_mixed_param_dtypes_in_one_group():
    mgg = random_mgg(seed=2)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, [(6,), (9,)])
    for p in (ref_params[1], params[1]):
        p.data = p.data.bfloat16()
    step_twins(ref_params, ref_opt, params, opt, 0)
    assert_same_step(ref_params, ref_opt, params, opt, DTYPE_TOL[torch.bfloat16])


def test_params_without_grad_are_untouched_and_keep_their_step():
    mgg = random_mgg(seed=3)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, SHAPES)
    step_twins(ref_params, ref_opt, params, opt, 0)
    snap = snapshot([params[3], params[4]], opt)
    step_twins(ref_params, ref_opt, params, opt, 1, none=(3, 4))
    assert_unchanged([params[3], params[4]], opt, snap)
    assert opt.state[params[3]]["step"].item() == 1 and opt.state[params[0]]["step"].item() == 2
    assert_same_step(ref_params, ref_opt, params, opt)
    # next step: per-parameter step counts (and bias corrections) now differ
    step_twins(ref_params, ref_opt, params, opt, 2)
    assert_same_step(ref_params, ref_opt, params, opt)


def test_non_contiguous_params_and_grads():
    mgg = random_mgg(seed=4)
    base = torch.randn(6, 9)
    ref_params = [torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(torch.randn(20))]
    params = [torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(ref_params[1].detach().clone())]
    assert not params[0].is_contiguous()
    ref_opt = MGGOptimizer(ref_params, copy.deepcopy(mgg), lr=0.05, backend="reference")
    opt = MGGOptimizer(params, copy.deepcopy(mgg), lr=0.05, backend="triton")
    for _ in range(2):
        g0 = torch.randn(6, 9).t()  # non-contiguous gradient
        g1 = torch.randn(40)[::2]
        ref_params[0].grad, ref_params[1].grad = g0.clone(), g1.clone()
        params[0].grad, params[1].grad = g0, g1
        ref_opt.step()
        opt.step()
        assert_same_step(ref_params, ref_opt, params, opt)
    assert params[0].stride() == (1, 9), "the parameter keeps its layout"


def test_nonfinite_grad_skips_with_triton_backend():
    mgg = random_mgg(seed=5)
    params = make_params(SHAPES)
    opt = MGGOptimizer(params, mgg, lr=0.05, backend="triton")
    set_grads(params, 0)
    opt.step()
    snap = snapshot(params, opt)
    set_grads(params, 1)
    params[4].grad[7] = float("nan")
    opt.step()
    assert opt.num_skipped_steps == 1
    assert_unchanged(params, opt, snap)


def test_capturable_found_inf_writes_nothing():
    """capturable=True: the skip decision stays on the device; the kernels read found_inf."""
    mgg = random_mgg(seed=6)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, [(7,), (130,)])
    opt = MGGOptimizer(params, opt.mgg, lr=0.05, backend="triton", capturable=True)
    step_twins(ref_params, ref_opt, params, opt, 0)
    snap = snapshot(params, opt)
    set_grads(params, 1)
    params[1].grad[100] = float("inf")
    opt.step()
    assert opt.num_skipped_steps == 1
    assert_unchanged(params, opt, snap)
    step_twins(ref_params, ref_opt, params, opt, 2)
    assert_same_step(ref_params, ref_opt, params, opt)


def test_update_with_found_inf_set_writes_nothing():
    mgg = random_mgg(seed=7)
    params = make_params([(10,), (3, 3)])
    opt = MGGOptimizer(params, mgg, lr=0.05, backend="triton")
    set_grads(params, 0)
    opt.step()
    flat = opt._flat_state(0)
    snap = snapshot(params, opt)
    group = prepare_group(flat, [p.grad for p in params], mgg, capturable=True)
    kw = {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    fused_group_update(group, mgg, **kw, found_inf=torch.ones(1))
    assert_unchanged(params, opt, snap)
    fused_group_update(group, mgg, **kw, found_inf=torch.zeros(1))  # counts are the prologue's job
    assert opt.state[params[0]]["step"].item() == 1
    assert not torch.equal(params[0].detach(), snap[0][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_prologue_decides_the_whole_step(dtype, bad):
    """One launch over several groups: any non-finite element anywhere (here in the last chunk of
    the last group) skips every group; otherwise every stepped count advances, unstepped ones not."""
    mgg = random_mgg(seed=11)
    shapes = [[(3,), (0,), (5000,)], [(7,), (2, 2)]]  # 5000: three check chunks of 2048
    flats = [FlatState.zeros(make_params(s, dtype), mgg.W1, mgg.b1[:, 0, :], torch.float32) for s in shapes]
    grads = [[torch.randn(p.shape).to(dtype) for p in flat.params] for flat in flats]
    grads[1][0] = None  # not stepped: its count stays
    if bad is not None:
        grads[0][2][4999] = bad
    groups = [prepare_group(f, g, mgg, capturable=False) for f, g in zip(flats, grads, strict=True)]
    guard, skipped = StepGuard(torch.device(DEVICE)), torch.zeros(())
    for _ in range(2):  # the ticket resets: a second step decides the same way
        found = guard.check(groups, skipped)
    assert found.item() == (0.0 if bad is None else 1.0)
    assert skipped.item() == (0.0 if bad is None else 2.0)
    expect = 0.0 if bad is not None else 2.0
    assert flats[0].steps.tolist() == [expect] * 3
    assert flats[1].steps.tolist() == [0.0, expect]
    assert guard.ticket.tolist() == [0, 0]


def test_prologue_checks_bits_not_values():
    """Large finite values (bf16/fp16 max) are not flagged; a NaN in a padded, empty or 1-element
    gradient is; a fresh NaN after a finite step flips the decision back."""
    mgg = random_mgg(seed=12)
    for dtype in (torch.bfloat16, torch.float16):
        flat = FlatState.zeros(make_params([(1,), (0,), (9,)], dtype), mgg.W1, mgg.b1[:, 0, :], torch.float32)
        big = torch.finfo(dtype).max
        grads = [torch.full(s, v, dtype=dtype) for s, v in (((1,), big), ((0,), 0.0), ((9,), -big))]
        guard = StepGuard(torch.device(DEVICE))
        group = prepare_group(flat, grads, mgg, capturable=False)
        assert guard.check([group]).item() == 0.0
        grads[0][0] = float("nan")  # same address: the cached table is reused
        assert guard.check([group]).item() == 1.0
        assert flat.steps.tolist() == [1.0, 1.0, 1.0] and guard.skipped.item() == 1.0


def test_fused_step_is_deterministic_and_caches_its_table():
    mgg = random_mgg(seed=8)
    runs = []
    for _ in range(2):
        params = make_params(SHAPES)
        opt = MGGOptimizer(params, copy.deepcopy(mgg), lr=0.05, backend="triton")
        for step in range(2):
            set_grads(params, step)
            opt.step()
            tables = opt._flat_state(0).cache[TABLE_CACHE_KEY]
            assert len(tables) == step + 1  # fresh gradient tensors: new addresses, a new table
        for p in params:  # gradients updated in place: same addresses, the table is reused
            p.grad.mul_(0.5)
        opt.step()
        assert len(opt._flat_state(0).cache[TABLE_CACHE_KEY]) == 2
        runs.append(([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())))
    (p1, sd1), (p2, sd2) = runs
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
    for i, st in sd1["state"].items():
        for k, v in st.items():
            assert torch.equal(sd2["state"][i][k], v), k


def test_state_dict_round_trip_continues_identically():
    mgg = random_mgg(seed=9)
    params = make_params(SHAPES)
    opt = MGGOptimizer(params, copy.deepcopy(mgg), lr=0.05, backend="triton")
    for step in range(2):
        set_grads(params, step, none=(3,) if step == 0 else ())
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [p.detach().clone().requires_grad_(True) for p in params]
    opt2 = MGGOptimizer(params2, copy.deepcopy(mgg), lr=0.5, backend="triton")
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(2, 4):
        set_grads(params, step)
        set_grads(params2, step)
        opt.step()
        opt2.step()
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p.detach(), q.detach())
        for key in STATE_KEYS:
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
    assert opt2.state[params2[3]]["step"].item() == 3


def test_unsupported_state_and_sizes_raise_clearly():
    params = make_params([(4,)], torch.float64)
    params[0].grad = torch.ones(4, dtype=torch.float64)
    opt = MGGOptimizer(params, MGG().double(), backend="triton")
    with pytest.raises(TypeError, match="backend='reference'"):
        opt.step()
    params = make_params([(4,)])
    params[0].grad = torch.ones(4)
    opt = MGGOptimizer(params, MGG(12, 1), backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        opt.step()
    assert opt.state[params[0]]["step"].item() == 0
    opt = MGGOptimizer(params, MGG(), backend="triton")
    opt.step()
    kw = {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    with pytest.raises(ValueError, match="does not match"):  # direct call: validated when planned
        fused_group_step(opt._flat_state(0), [torch.ones(5)], opt.mgg, **kw)
    with pytest.raises(ValueError, match="1 parameters"):
        fused_group_step(opt._flat_state(0), [None, None], opt.mgg, **kw)
    flat = FlatState.zeros(params, opt.mgg.W1, opt.mgg.b1[:, 0, :], torch.float32, torch.float16)
    with pytest.raises(TypeError, match="memory_W as float32 or bfloat16"):
        fused_group_step(flat, [torch.ones(4)], opt.mgg, **kw)
    assert flat.steps.item() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "no_pdl"])
def test_cuda_graph_capture_of_capturable_step(pdl):
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    with forced_pdl(pdl):
        _capture_and_replay()


def _capture_and_replay():
    mgg = random_mgg(seed=10).cuda()
    shapes = [(768,)] * 4 + [(100,)]
    params = [p.detach().cuda().requires_grad_(True) for p in make_params(shapes)]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    opt = MGGOptimizer(params, mgg, lr=0.05, backend="triton", capturable=True)
    ref_opt = MGGOptimizer(ref_params, copy.deepcopy(mgg), lr=0.05, backend="reference")
    grads = [torch.randn(s, device="cuda") for s in shapes]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: builds the pointer table and compiles
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    assert len(opt._flat_state(0).cache[CAPTURED_PLANS_KEY]) == 1  # pinned: the graph holds its table
    for p, g in zip(ref_params, grads, strict=True):
        p.grad = g.clone()
    ref_opt.step()  # matches the warm-up step
    for _ in range(3):
        new = [torch.randn(s, device="cuda") for s in shapes]
        for g, n in zip(grads, new, strict=True):
            g.copy_(n)
        graph.replay()
        for p, n in zip(ref_params, new, strict=True):
            p.grad = n.clone()
        ref_opt.step()
    torch.cuda.synchronize()
    assert_same_step(ref_params, ref_opt, params, opt)
    assert opt.state[params[0]]["step"].item() == 4
    grads[2][5] = float("nan")  # a non-finite replay writes nothing
    snap = snapshot(params, opt)
    graph.replay()
    torch.cuda.synchronize()
    assert_unchanged(params, opt, snap)
    assert opt.num_skipped_steps == 1


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="64-bit offsets need > 2^31 / 64 coordinates: ~11 GB of GPU state",
)
def test_offsets_past_2_pow_31_elements():
    """Coordinates whose memory rows start past element 2^31 of ``memory_W`` (f=8: N > 2^25).

    Every coordinate is independent, so the last ones must match a small reference run on copies.
    """
    mgg = random_mgg(seed=11)
    big = torch.nn.Parameter(torch.randn(2**25 + 1000))
    small = torch.nn.Parameter(torch.randn(100))
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    tail = torch.nn.Parameter(big.detach()[-100:].clone())
    ref_small = torch.nn.Parameter(small.detach().clone())
    tail.grad, ref_small.grad = big.grad[-100:].clone(), small.grad.clone()
    opt = MGGOptimizer([big, small], mgg, lr=0.05, backend="triton")
    ref_opt = MGGOptimizer([tail, ref_small], copy.deepcopy(mgg), lr=0.05, backend="reference")
    opt.step()
    ref_opt.step()
    assert (opt._flat_state(0).num_coords - 1) * 64 > 2**31
    assert_close(big.detach()[-100:], tail.detach(), **F32)
    assert_close(small.detach(), ref_small.detach(), **F32)
    for key in ("exp_avg", "exp_avg_sq", "memory_W", "memory_b"):
        assert_close(opt.state[small][key], ref_opt.state[ref_small][key], **F32)
        assert_close(opt.state[big][key][-100:], ref_opt.state[tail][key], **F32)


@pytest.mark.parametrize(("betas", "start_step"), [((0.0, 0.0), 0), ((0.9, 0.999), 0), ((0.9, 0.99), 999)])
def test_bias_corrections_across_betas_and_steps(betas, start_step):
    """beta = 0 (ln beta = -inf), beta2 = 0.999 (1 - beta2^2 ~ 2e-3: the cancellation-free branch)
    and a late step (the 1 - exp branch) all match the reference's float64 corrections."""
    mgg = random_mgg(seed=12)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, [(50,), (3, 4)], betas=betas)
    step_twins(ref_params, ref_opt, params, opt, 0)
    for p, q in zip(ref_params, params, strict=True):
        ref_opt.state[p]["step"].fill_(start_step + 1)
        opt.state[q]["step"].fill_(start_step + 1)
    for step in range(1, 3):
        step_twins(ref_params, ref_opt, params, opt, step)
        assert_same_step(ref_params, ref_opt, params, opt)


def _count_full_steps(monkeypatch, opt):
    """Count the optimizer's full (validating) steps; the rest were fast repeats."""
    calls = []
    full = opt._step
    monkeypatch.setattr(opt, "_step", lambda signature: (calls.append(1), full(signature)))
    return calls


def test_repeat_fast_path_matches_reference_and_notices_changes(monkeypatch):
    """Gradients refreshed in place keep their addresses: later steps skip validation and table
    lookups, and still match the reference; lr changes, a NaN, a moved parameter, a
    non-contiguous gradient, a replaced MGG tensor and load_state_dict are all noticed."""
    mgg = random_mgg(seed=13)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, [(7,), (130,), (2, 3)])
    full = _count_full_steps(monkeypatch, opt)
    for p in params:
        p.grad = torch.zeros(p.shape)
    for step in range(3):
        set_grads(ref_params, step)
        for p, q in zip(ref_params, params, strict=True):
            q.grad.copy_(p.grad)  # same addresses
        if step == 2:
            for o in (ref_opt, opt):
                o.param_groups[0]["lr"] = 0.01  # read on every step, fast or not
        ref_opt.step()
        opt.step()
        assert_same_step(ref_params, ref_opt, params, opt)
    assert len(full) == 1, "steps 2 and 3 repeat the first one's kernels"

    params[1].grad[3] = float("nan")  # the repeat still checks every gradient on the device
    snap = snapshot(params, opt)
    opt.step()
    assert opt.num_skipped_steps == 1 and len(full) == 1
    assert_unchanged(params, opt, snap)
    params[1].grad[3] = 0.0

    params[0].data = params[0].data.clone()  # new address: validated and re-planned
    opt.step()
    assert len(full) == 2
    square = torch.zeros(3, 3)
    params[2].grad = square[:2, :]  # contiguous ...
    opt.step()
    params[2].grad = square.t()[:2, :]  # ... then not, at the same address
    opt.step()
    opt.step()  # a copied gradient is never repeated from a table
    assert len(full) == 5
    params[2].grad = square[:2, :]
    opt.step()  # the addresses of two steps before: remembered, repeated
    assert len(full) == 5
    with torch.no_grad():
        opt.mgg.o_proj.weight = torch.nn.Parameter(opt.mgg.o_proj.weight * 2)  # replaced, not updated
    opt.step()
    assert len(full) == 6
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert len(full) == 7
    opt.step()
    assert len(full) == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct relaunches exist on a GPU only")
def test_repeat_fast_path_shows_every_launch_to_a_triton_launch_hook(monkeypatch):
    """With a launch hook registered (as profilers do), repeats take Triton's public launch path,
    so the hook sees both launches of every step, and the results stay the reference's."""
    mgg = random_mgg(seed=17)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, [(7,), (130,)])
    full = _count_full_steps(monkeypatch, opt)
    for p in params:
        p.grad = torch.zeros(p.shape)
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for step in range(3):
            set_grads(ref_params, step)
            for p, q in zip(ref_params, params, strict=True):
                q.grad.copy_(p.grad)
            ref_opt.step()
            opt.step()
            assert_same_step(ref_params, ref_opt, params, opt)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(full) == 1 and len(seen) == 6, seen


def test_repeat_fast_path_holds_no_gradients():
    """The remembered step keeps no gradient tensor alive (the allocator can reuse addresses)."""
    import gc
    import weakref

    params = make_params([(9,)])
    opt = MGGOptimizer(params, random_mgg(seed=14), lr=0.05, backend="triton")
    params[0].grad = torch.randn(9)
    opt.step()
    ref = weakref.ref(params[0].grad)
    params[0].grad = None
    gc.collect()
    assert ref() is None


def test_prologue_advances_more_counts_than_one_block():
    """300 stepped parameters: the deciding program advances their counts in several blocks."""
    mgg = random_mgg(seed=15)
    flat = FlatState.zeros(make_params([(1,)] * 300), mgg.W1, mgg.b1[:, 0, :], torch.float32)
    grads = [torch.ones(1) for _ in range(300)]
    grads[299] = None
    guard = StepGuard(torch.device(DEVICE))
    assert guard.check([prepare_group(flat, grads, mgg, capturable=False)]).item() == 0.0
    assert flat.steps.tolist() == [1.0] * 299 + [0.0]


def test_repeat_path_remembers_a_few_gradient_address_sets(monkeypatch):
    """Gradients that alternate between two sets of tensors (as zero_grad(set_to_none=True) can
    leave them) both repeat; results still match the reference step for step."""
    mgg = random_mgg(seed=16)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, [(5,), (130,)])
    full = _count_full_steps(monkeypatch, opt)
    sets = [[torch.zeros(p.shape) for p in params] for _ in range(2)]
    for step in range(6):
        set_grads(ref_params, step)
        for p, q, g in zip(ref_params, params, sets[step % 2], strict=True):
            q.grad = g.copy_(p.grad)
        ref_opt.step()
        opt.step()
        assert_same_step(ref_params, ref_opt, params, opt)
    assert len(full) == 2, "only the first step with each set validates"


def test_parameter_resized_under_its_state_raises_and_changes_nothing():
    params = make_params([(6,), (4,)])
    opt = MGGOptimizer(params, random_mgg(seed=17), lr=0.05, backend="triton")
    set_grads(params, 0)
    opt.step()
    snap = snapshot(params, opt)
    params[1].data = torch.zeros(9)
    params[1].grad = torch.ones(9)
    with pytest.raises(ValueError, match="changed size"):
        opt.step()
    assert_unchanged(params[:1], opt, (snap[0][:1], snap[1]))
