"""MGGOptimizer behaviour: state round-trip, skipped parameters, non-finite gradients, bad input."""

import copy
import io

import pytest
import torch
from helpers import F64, TRITON_ON_CPU
from torch.testing import assert_close

from mgg_fast import MGG, MGGOptimizer
from mgg_fast.optim.functional import fused_supported

SHAPES = [(6,), (3, 4), (5,), ()]


def make(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    mgg = MGG().to(dtype)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    return mgg, params, MGGOptimizer(params, mgg, lr=0.01, backend="reference", **kw)


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)


def saved_and_loaded(state_dict):
    """``state_dict`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(params, opt, snap):
    old_params, old_sd = snap
    for p, q in zip(params, old_params, strict=True):
        assert torch.equal(p.detach(), q)
    new_sd = opt.state_dict()
    for i, st in old_sd["state"].items():
        for k, v in st.items():
            assert torch.equal(new_sd["state"][i][k], v), k


def test_state_exposes_moments_and_memory():
    _mgg, params, opt = make()
    set_grads(params, 1)
    opt.step()
    st = opt.state[params[1]]
    assert st["exp_avg"].shape == (3, 4) and st["exp_avg_sq"].shape == (3, 4)
    assert st["memory_W"].shape == (12, 1, 8, 8) and st["memory_b"].shape == (12, 1, 8)
    assert st["step"].item() == 1
    assert_close(st["exp_avg"], 0.1 * params[1].grad, **F64)


def test_state_dict_round_trip_continues_identically():
    _mgg, params, opt = make()
    mgg2, params2, _ = make()
    for step in range(3):
        set_grads(params, step)
        opt.step()
    saved = saved_and_loaded(opt.state_dict())
    for p, q in zip(params2, params, strict=True):
        p.data.copy_(q.detach())
    opt2 = MGGOptimizer(params2, mgg2, lr=0.5, backend="reference")  # lr comes back from the state
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.01
    for step in range(3, 6):
        set_grads(params, step)
        set_grads(params2, step)
        opt.step()
        opt2.step()
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p.detach(), q.detach())
    assert torch.equal(opt2.state[params2[0]]["memory_W"], opt.state[params[0]]["memory_W"])
    assert opt2.state[params2[0]]["step"].item() == 6


def test_load_state_dict_rejects_mismatch_without_change():
    _mgg, params, opt = make()
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    sd["state"][1]["exp_avg"] = torch.zeros(7, dtype=torch.float64)
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    other = MGGOptimizer([torch.zeros(3, requires_grad=True)], MGG(16, 2).double())
    with pytest.raises(ValueError, match="state dict was made for MGG"):
        other.load_state_dict(opt.state_dict())


def test_params_without_grad_are_skipped():
    mgg, params, opt = make()
    subset = [params[i].detach().clone().requires_grad_(True) for i in (0, 1, 3)]
    opt_subset = MGGOptimizer(subset, copy.deepcopy(mgg), lr=0.01, backend="reference")
    set_grads(params, 0)
    params[2].grad = None
    for q, i in zip(subset, (0, 1, 3), strict=True):
        q.grad = params[i].grad.clone()
    before = params[2].detach().clone()
    opt.step()
    opt_subset.step()
    assert torch.equal(params[2].detach(), before)
    assert not opt.state.get(params[2])  # as torch's Adam: no state before a first gradient
    for q, i in zip(subset, (0, 1, 3), strict=True):
        assert_close(params[i].detach(), q.detach(), **F64)
    # next step: every tensor moves, each with its own step count (bias correction)
    set_grads(params, 1)
    opt.step()
    assert opt.state[params[2]]["step"].item() == 1
    assert opt.state[params[0]]["step"].item() == 2
    assert not torch.equal(params[2].detach(), before)


def test_nonfinite_gradient_skips_whole_step():
    _mgg, params, opt = make()
    set_grads(params, 0)
    opt.step()
    snap = snapshot(params, opt)
    set_grads(params, 1)
    params[3].grad = torch.tensor(float("nan"), dtype=torch.float64)
    opt.step()
    assert opt.num_skipped_steps == 1
    assert_unchanged(params, opt, snap)
    params[3].grad = torch.tensor(float("inf"), dtype=torch.float64)
    opt.step()
    assert opt.num_skipped_steps == 2
    assert opt.state_dict()["mgg_fast"]["skipped_steps"] == 2


def test_skip_count_is_restored_from_the_groups_where_dcp_keeps_it():
    """DCP's state dicts have only "state" and "param_groups": the count rides in each saved
    group (never in the optimizer's own groups); a bad count is an error that changes nothing."""
    _mgg, params, opt = make()
    set_grads(params, 0)
    opt.step()
    params[0].grad[0] = float("nan")
    opt.step()
    sd = opt.state_dict()
    assert [g["mgg_fast_skipped_steps"] for g in sd["param_groups"]] == [1]
    assert "mgg_fast_skipped_steps" not in opt.param_groups[0]
    _mgg2, _params2, opt2 = make()
    opt2.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    assert opt2.num_skipped_steps == 1
    assert "mgg_fast_skipped_steps" not in opt2.param_groups[0]
    for bad in (-1, 1.5, True, "2"):
        groups = [{**sd["param_groups"][0], "mgg_fast_skipped_steps": bad}]
        with pytest.raises(ValueError, match="skipped-step count"):
            opt2.load_state_dict({"state": {}, "param_groups": groups})
        assert opt2.num_skipped_steps == 1 and opt2.state


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_bfloat16_gradient_is_found(bad):
    """bfloat16 gradients are checked through a float32 copy (CUDA's check has no bf16 kernel)."""
    params = [torch.zeros(4, dtype=torch.bfloat16, requires_grad=True), torch.zeros(3, requires_grad=True)]
    opt = MGGOptimizer(params, MGG(), lr=0.1, backend="reference")
    params[0].grad = torch.tensor([1.0, bad, 2.0, 3.0], dtype=torch.bfloat16)
    params[1].grad = torch.ones(3)
    opt.step()
    assert opt.num_skipped_steps == 1
    assert torch.all(params[0] == 0) and torch.all(params[1] == 0)
    params[0].grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert opt.num_skipped_steps == 1 and torch.all(params[0] != 0)


def test_nonfinite_raise_policy():
    _mgg, params, opt = make(nonfinite="raise")
    set_grads(params, 0)
    params[0].grad[2] = float("-inf")
    snap = snapshot(params, opt)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        opt.step()
    assert_unchanged(params, opt, snap)


def test_bad_inputs_raise_before_any_change():
    _mgg, params, opt = make()
    set_grads(params, 0)
    opt.step()
    snap = snapshot(params, opt)
    set_grads(params, 1)
    params[0].grad_dtype = None  # torch allows a differing gradient dtype only when asked
    params[0].grad = params[0].grad.float()
    with pytest.raises(TypeError, match="dtype"):
        opt.step()
    assert_unchanged(params, opt, snap)
    set_grads(params, 1)
    opt.mgg.float()
    with pytest.raises(TypeError, match=r"state is torch\.float64 but the MGG is now torch\.float32"):
        opt.step()
    opt.mgg.double()
    assert_unchanged(params, opt, snap)


def test_constructor_validation():
    mgg = MGG()
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="MGG"):
        MGGOptimizer(p, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        MGGOptimizer(p, mgg, backend="cuda")
    with pytest.raises(ValueError, match="learning rate"):
        MGGOptimizer(p, mgg, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        MGGOptimizer(p, mgg, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match=r"parameters, got torch\.int64"):
        MGGOptimizer([torch.zeros(3, dtype=torch.int64)], mgg)
    with pytest.raises(TypeError, match="float32 or float64"):
        MGGOptimizer(p, MGG().half())


def test_low_precision_params_use_fp32_state():
    torch.manual_seed(0)
    mgg = MGG()
    p32 = torch.randn(10, requires_grad=True)
    pbf = p32.detach().bfloat16().requires_grad_(True)
    o32 = MGGOptimizer([p32], mgg, backend="reference")
    obf = MGGOptimizer([pbf], mgg, backend="reference")
    g = torch.randn(10)
    p32.grad, pbf.grad = g.bfloat16().float(), g.bfloat16()
    o32.step()
    obf.step()
    assert obf.state[pbf]["exp_avg"].dtype == torch.float32
    assert pbf.dtype == torch.bfloat16
    assert_close(pbf.detach().float(), p32.detach().bfloat16().float(), rtol=0, atol=0.02)


def test_mgg_load_accepts_published_names_and_init():
    mgg = MGG(16, 2)
    names = dict(mgg.named_parameters())
    assert set(names) == {
        "W1",
        "b1",
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "post_norm.weight",
        "post_norm.bias",
        "ttt_norm_weight",
        "ttt_norm_bias",
        "learnable_ttt_lr_weight",
        "learnable_ttt_lr_bias",
        "learnable_token_idx",
    }
    assert names["W1"].shape == (2, 8, 8) and names["b1"].shape == (2, 1, 8)
    assert torch.all(names["b1"] == 0) and torch.all(names["ttt_norm_weight"] == 1)
    assert 0.005 < names["W1"].std().item() < 0.05
    published = {"seq_modeling_block." + k: v + 1 for k, v in mgg.state_dict().items()}
    other = MGG(16, 2)
    other.load_state_dict(published)
    assert torch.equal(other.W1, mgg.W1 + 1)
    with pytest.raises(ValueError, match="multiple"):
        MGG(10, 3)


def test_mgg_is_built_on_the_default_device():
    """Every tensor follows ``with torch.device(...)`` (torch.normal(size=...) alone would not)."""
    with torch.device("meta"):
        mgg = MGG(16, 2)
    assert {p.device.type for p in mgg.parameters()} == {"meta"}


def test_mgg_rejects_bad_features_and_state():
    mgg = MGG()
    with pytest.raises(ValueError, match="shape"):
        mgg(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="float64"):
        mgg(torch.zeros(5, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"features must be a torch\.Tensor"):
        mgg([[0.0, 1.0]])
    _, state = mgg(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="state"):
        mgg(torch.zeros(4, 2), state)


def test_auto_backend_falls_back_for_sizes_the_kernels_lack():
    assert fused_supported(MGG())
    assert fused_supported(MGG(32, 2))
    assert not fused_supported(MGG().double())
    assert not fused_supported(MGG(12, 1))
    assert not fused_supported(MGG(128, 4))


def test_step_hooks_profiler_and_lr_scheduler_still_work():
    """step() runs through torch's hook and profiler wrapper, as every torch optimizer does."""
    import warnings

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _mgg, params, opt = make()
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    set_grads(params, 0)
    opt.step()
    assert calls == [("pre", opt), ("post", opt)]
    pre.remove(), post.remove()
    glob = register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global", o)))
    try:
        opt.step()
    finally:
        glob.remove()
    assert calls[2:] == [("global", opt)]
    opt.step()
    assert len(calls) == 3, "removed hooks are not called"

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#MGGOptimizer.step" in {e.name for e in prof.events()}

    before = [p.detach().clone() for p in params]
    loss = opt.step(lambda: torch.tensor(3.0))  # a closure's loss comes back
    assert loss.item() == 3.0 and not all(torch.equal(p, q) for p, q in zip(params, before, strict=True))

    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns if it thinks opt.step() was not called
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_memory_is_the_state_dtype_step_rounded(dtype):
    """With ``memory_W_dtype=torch.bfloat16`` a step computes exactly what a full-precision step
    from the same (bf16-valued) state computes, and stores memory_W rounded to nearest-even."""
    _mgg, params, full = make(dtype, seed=2)
    with torch.no_grad():
        full.mgg.W1.copy_(full.mgg.W1.bfloat16())  # a bf16-valued learned memory: the same start
    params_bf = [p.detach().clone().requires_grad_(True) for p in params]
    narrow = MGGOptimizer(
        params_bf, copy.deepcopy(full.mgg), lr=0.01, backend="reference", memory_W_dtype=torch.bfloat16
    )
    for step in range(3):
        for p, q in zip(params, params_bf, strict=True):
            if full.state.get(p):  # same starting memory (written in place: still the state)
                full.state[p]["memory_W"].copy_(narrow.state[q]["memory_W"])
        set_grads(params, step)
        set_grads(params_bf, step)
        if step == 1:  # a parameter without gradient: the partial-group path
            params[2].grad = params_bf[2].grad = None
        full.step()
        narrow.step()
        for p, q in zip(params, params_bf, strict=True):
            assert torch.equal(p.detach(), q.detach())
            for key in ("exp_avg", "exp_avg_sq", "memory_b", "step"):
                assert torch.equal(full.state[p][key], narrow.state[q][key]), key
            W = narrow.state[q]["memory_W"]
            assert W.dtype == torch.bfloat16 and narrow.state[q]["exp_avg"].dtype == dtype
            assert torch.equal(W, full.state[p]["memory_W"].bfloat16())
    assert narrow.state[params_bf[2]]["step"].item() == 2


def test_bf16_memory_state_dict_round_trip_and_validation():
    mgg, params, opt = make(torch.float32, memory_W_dtype=torch.bfloat16)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    params2 = [p.detach().clone().requires_grad_(True) for p in params]
    opt2 = MGGOptimizer(params2, copy.deepcopy(mgg), backend="reference", memory_W_dtype=torch.bfloat16)
    opt2.load_state_dict(saved_and_loaded(opt.state_dict()))
    set_grads(params, 5)
    set_grads(params2, 5)
    opt.step()
    opt2.step()
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["memory_W"], opt2.state[q]["memory_W"])
    p = [torch.zeros(3, requires_grad=True)]
    for bad in (torch.float16, torch.float64, "bfloat16"):
        with pytest.raises(ValueError, match="memory_W_dtype"):
            MGGOptimizer(p, MGG(), memory_W_dtype=bad)


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "cpu"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_sparse_gradient_raises_and_changes_nothing(first, backend):
    """(torch refuses other sparse layouts as ``.grad`` already.)"""
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = MGGOptimizer(params, MGG(), lr=0.01, backend=backend)
    if not first:
        set_grads(params, 0)
        opt.step()
    set_grads(params, 1)
    params[0].grad = params[0].grad.to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match="dense"):
        opt.step()
    for p, q in zip(params, before[0], strict=True):
        assert torch.equal(p.detach(), q)
    assert len(opt.state_dict()["state"]) == len(before[1]["state"])


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "cpu"])
def test_memoryless_mgg_equals_the_mgg_with_its_memory_reset_every_step(backend):
    """``carry_memory=False`` (the ablation) is the published step with ``state[p]``'s memory set
    back to the learned W1, b1 before every step; the moments still carry."""
    from helpers import random_mgg

    mgg = random_mgg(seed=4)
    g = torch.Generator().manual_seed(1)
    shapes = [(130,), (3, 4)]
    params = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    memoryless = MGGOptimizer(params, copy.deepcopy(mgg), lr=0.05, backend=backend, carry_memory=False)
    reset = MGGOptimizer(twins, copy.deepcopy(mgg), lr=0.05, backend=backend)
    for _ in range(3):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        for q in twins:
            if q in reset.state:  # the learned memory, as a first step would tile it
                reset.state[q]["memory_W"].copy_(mgg.W1.detach().expand_as(reset.state[q]["memory_W"]))
                reset.state[q]["memory_b"].copy_(
                    mgg.b1.detach()[:, 0, :].expand_as(reset.state[q]["memory_b"])
                )
        memoryless.step()
        reset.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq", "memory_W", "memory_b", "step"):
            assert torch.equal(memoryless.state[p][key], reset.state[q][key]), key
    carried = MGGOptimizer([torch.zeros(3, requires_grad=True)], copy.deepcopy(mgg), lr=0.05)
    assert carried.carry_memory and not copy.deepcopy(memoryless).carry_memory


def test_auto_falls_back_to_the_reference_where_the_cpu_step_cannot_run(monkeypatch):
    """Where numba is missing or its kernel does not compile (e.g. a CPU it was never built for),
    ``backend="auto"`` steps with the reference and gives its numbers; ``backend="cpu"`` says why."""
    import mgg_fast.kernels.cpu_step as cpu_step

    from mgg_fast.optim.functional import resolve_backend

    mgg = MGG()
    monkeypatch.setattr(cpu_step, "cpu_step_unavailable_reason", lambda: "ImportError: no numba here")
    assert resolve_backend("auto", mgg, torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run here: ImportError: no numba here"):
        resolve_backend("cpu", mgg, torch.device("cpu"))
    torch.manual_seed(0)
    params = [torch.randn(300, requires_grad=True), torch.randn(7, 5, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    auto = MGGOptimizer(params, mgg=mgg, lr=1e-2)
    ref = MGGOptimizer(twins, mgg=mgg, lr=1e-2, backend="reference")
    for step in range(3):
        for group in (params, twins):
            for i, p in enumerate(group):
                p.grad = torch.full_like(p, 0.1 * (step + 1)) * (i + 1)
        auto.step()
        ref.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
