"""The fused optimizer step (``backend="triton"``) against the parity vectors and the reference step.

Runs on CPU through TRITON_INTERPRET=1 (tests/conftest.py); every program costs ~0.1 s there,
so tensors are small (a few chunks of 128 coordinates per step).
"""

import copy
import io

import pytest
import torch
from helpers import F32, random_mgg
from mgg_fast.kernels import chunk_layout, mgg_step_
from mgg_fast.kernels.memory_layer import weight_args
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
    """The tensor-level step: with found_inf set nothing is written and no count advances; with
    it clear the stepped parameters (not the one without a gradient) move and count one step."""
    mgg = random_mgg(seed=7)
    params = make_params([(10,), (3, 3), (4,)])
    opt = MGGOptimizer(params, mgg, lr=0.05, backend="triton")
    set_grads(params, 0)
    opt.step()
    pack = opt._packs[0]
    snap = snapshot(params, opt)
    grads = [p.grad for p in params[:2]] + [None]
    layout = chunk_layout(pack.numels, pack.offsets, 128, params[0].device)
    buffers = (pack.exp_avg, pack.exp_avg_sq, pack.memory_W, pack.memory_b, pack.steps, layout)
    kw = {"num_heads": 1, "head_dim": 8, "lr": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    weights = weight_args(mgg.weights(), params[0].device)
    skipped = torch.zeros(())
    mgg_step_(
        params,
        grads,
        *buffers,
        weights,
        **kw,
        found_inf=torch.ones(1),
        skipped=skipped,
        block=128,
        num_warps=1,
    )
    assert_unchanged(params, opt, snap)
    assert skipped.item() == 1.0
    mgg_step_(params, grads, *buffers, weights, **kw, found_inf=torch.zeros(1), block=128, num_warps=1)
    assert [opt.state[p]["step"].item() for p in params] == [2.0, 2.0, 1.0]
    assert not torch.equal(params[0].detach(), snap[0][0])
    assert torch.equal(params[2].detach(), snap[0][2])


def test_step_counts_of_more_parameters_than_one_block():
    """300 parameters, one without a gradient: the single program that advances the step counts
    does so in several blocks of rows, and skips the unstepped one."""
    params = make_params([(1,)] * 300)
    opt = MGGOptimizer(params, random_mgg(seed=15), lr=0.05, backend="triton")
    set_grads(params, 0, none=(299,))
    opt.step()
    assert [opt.state[p]["step"].item() for p in params[:299]] == [1.0] * 299
    assert not opt.state.get(params[299])


def test_fused_step_is_deterministic():
    mgg = random_mgg(seed=8)
    runs = []
    for _ in range(2):
        params = make_params(SHAPES)
        opt = MGGOptimizer(params, copy.deepcopy(mgg), lr=0.05, backend="triton")
        for step in range(2):
            set_grads(params, step)
            opt.step()
        for p in params:  # gradients updated in place
            p.grad.mul_(0.5)
        opt.step()
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
    assert not opt.state.get(params[0]), "a step that raises creates no state"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_cuda_graph_capture_of_capturable_step():
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
    assert opt._graph_tensors, "the captured pointer table is kept alive for the graph"
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
    assert (opt._packs[0].num_coords - 1) * 64 > 2**31
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


def test_parameter_resized_under_its_state_raises_and_changes_nothing():
    params = make_params([(6,), (4,)])
    opt = MGGOptimizer(params, random_mgg(seed=17), lr=0.05, backend="triton")
    set_grads(params, 0)
    opt.step()
    snap = snapshot(params, opt)
    params[1].data = torch.zeros(9)
    params[1].grad = torch.ones(9)
    with pytest.raises(ValueError, match=r"has shape \[4\], expected \[9\]"):
        opt.step()
    assert_unchanged(params[:1], opt, (snap[0][:1], snap[1]))
