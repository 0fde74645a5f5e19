"""Regression tests for the optimizer-core bugs of issue 14 (items 1-9), one test (or one small
family) per item. Each failed on the code before the core rebuild (62d5b4a). The fused backend
runs under the Triton interpreter here, so tensors stay at a few hundred elements."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import INTERPRETER_ONLY, TRITON_ON_CPU, random_mgg
from torch.testing import assert_close

from mgg_fast import MGG, MGGOptimizer
from mgg_fast.optim.validation import SKIPPED_GROUP_KEY

BACKENDS = [TRITON_ON_CPU, "cpu", "reference"]
NAN, INF = float("nan"), float("inf")


def mgg_params(mgg):
    return {k: v.detach().clone() for k, v in mgg.state_dict().items()}


def assert_mgg_unchanged(mgg, before):
    for k, v in mgg.state_dict().items():
        assert torch.equal(v, before[k]), k


def snapshot(params, opt):
    """Parameters, state and groups as they are now (deep copies)."""
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy(opt.state_dict()),
        opt.num_skipped_steps,
    )


def assert_unchanged(params, opt, snap):
    old_params, old_sd, old_skipped = snap
    for p, q in zip(params, old_params, strict=True):
        assert torch.equal(p.detach(), q)
    sd = opt.state_dict()
    assert sd["state"].keys() == old_sd["state"].keys()
    for i, st in old_sd["state"].items():
        assert st.keys() == sd["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(sd["state"][i][k]), torch.as_tensor(v)), (i, k)
    for g, old in zip(sd["param_groups"], old_sd["param_groups"], strict=True):
        assert _settings(g) == _settings(old)
    assert opt.num_skipped_steps == old_skipped


def _settings(saved_group):
    """A saved group less the skip count it carries (compared on its own, above)."""
    return {k: v for k, v in saved_group.items() if k != SKIPPED_GROUP_KEY}


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


# ---- 1. a one-coordinate group must not write into the MGG -----------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), ()])
def test_one_coordinate_group_leaves_the_mgg_alone(backend, shape):
    mgg = random_mgg(seed=1)
    before = mgg_params(mgg)
    p = torch.randn(shape, requires_grad=True)
    q = torch.randn(5, requires_grad=True)
    opt = MGGOptimizer([{"params": [p]}, {"params": [q]}], mgg, lr=0.1, backend=backend)
    for s in range(3):
        set_grads([p, q], s)
        opt.step()
    assert_mgg_unchanged(mgg, before)
    # the state of the one-coordinate parameter is its own tensor, not the MGG's W1/b1
    assert opt.state[p]["memory_W"].data_ptr() != mgg.W1.data_ptr()
    assert opt.state[p]["memory_b"].data_ptr() != mgg.b1.data_ptr()
    # a second optimizer with this MGG starts from the learned memory: q steps as if alone
    q2 = q.detach().clone().requires_grad_(True)
    q3 = q.detach().clone().requires_grad_(True)
    alone = MGGOptimizer([q2], random_mgg(seed=1), lr=0.1, backend=backend)
    after = MGGOptimizer([q3], mgg, lr=0.1, backend=backend)
    set_grads([q2], 7)
    set_grads([q3], 7)
    alone.step()
    after.step()
    assert torch.equal(q2.detach(), q3.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_a_one_coordinate_state_leaves_the_mgg_alone(backend):
    mgg = random_mgg(seed=2)
    p = torch.randn(1, requires_grad=True)
    opt = MGGOptimizer([p], mgg, lr=0.1, backend=backend)
    p.grad = torch.ones(1)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["memory_W"].fill_(3.0)
    sd["state"][0]["memory_b"].fill_(-3.0)
    before = mgg_params(mgg)
    fresh = MGGOptimizer([p], mgg, lr=0.1, backend=backend)
    fresh.load_state_dict(sd)
    assert_mgg_unchanged(mgg, before)
    assert torch.all(fresh.state[p]["memory_W"] == 3.0)


# ---- 2. an empty gradient is not a missing one ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_missing_gradients_advance_the_right_step_counts(backend):
    params = [torch.zeros(0, requires_grad=True) for _ in range(2)]
    params.append(torch.randn(3, requires_grad=True))
    opt = MGGOptimizer(params, random_mgg(seed=3), lr=0.1, backend=backend)
    params[0].grad = torch.zeros(0)  # step 1: the first empty parameter has a gradient
    params[2].grad = torch.ones(3)
    opt.step()
    params[0].grad, params[1].grad = None, torch.zeros(0)  # step 2: only the second one
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [1.0, 1.0, 2.0]


# ---- 3. a parameter shrunk in place is caught before anything is written ----------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_shrunk_at_the_same_address_raises_and_writes_nothing(backend):
    base, grads = torch.randn(200), torch.randn(200)
    p = torch.nn.Parameter(base[:200])
    opt = MGGOptimizer([p], random_mgg(seed=4), lr=0.1, backend=backend)
    p.grad = grads[:200]
    opt.step()
    p.data = base[:75]  # the parameter and its gradient keep their addresses, 125 elements fewer
    p.grad = grads[:75]
    memory = base.clone()
    snap = snapshot([p], opt)
    with pytest.raises(ValueError, match=r"shape|size"):
        opt.step()
    assert torch.equal(base, memory)  # nothing written past the parameter's new end either
    assert_unchanged([p], opt, snap)


# ---- 4. add_param_group is all or nothing ------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "learning rate"),
        ({"betas": (0.9, 1.5)}, ValueError, "betas"),
        ({"params": [torch.zeros(3, dtype=torch.int64)]}, TypeError, "int64"),
        ({"params": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]}, TypeError, "complex"),
        ({"params": []}, ValueError, "at least one"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_add_param_group_adds_nothing(backend, group, error, match):
    p = torch.randn(4, requires_grad=True)
    opt = MGGOptimizer([p], random_mgg(seed=5), lr=0.1, backend=backend)
    twin = torch.randn(4).copy_(p.detach()).requires_grad_(True)
    twin_opt = MGGOptimizer([twin], random_mgg(seed=5), lr=0.1, backend=backend)
    new = {"params": [torch.randn(3, requires_grad=True)], **group}
    with pytest.raises(error, match=match):
        opt.add_param_group(new)
    assert len(opt.param_groups) == 1
    for o, q in ((opt, p), (twin_opt, twin)):
        set_grads([q], 0)
        o.step()
        set_grads([q], 1)
        o.step()
    assert torch.equal(p.detach(), twin.detach())
    assert opt.state_dict()["param_groups"] == twin_opt.state_dict()["param_groups"]


# ---- 5. a parameter listed twice is an error ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_listed_twice_is_rejected(backend):
    p, q = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="more than once"):
        MGGOptimizer([p, q, p], random_mgg(), backend=backend)
    opt = MGGOptimizer([q], random_mgg(), backend=backend)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p, p]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p, q]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [q]


# ---- 6. hyper-parameters checked at step time and on load; tensor lr ---------------------------

BAD_HYPERPARAMS = [
    ("lr", NAN, "learning rate"),
    ("lr", INF, "learning rate"),
    ("lr", torch.tensor(NAN), "learning rate"),
    ("lr", -0.5, "learning rate"),
    ("lr", 0.1j, "learning rate"),
    ("lr", torch.tensor([0.1, 0.2]), "learning rate"),
    ("betas", (1.0, 0.99), "betas"),
    ("betas", (2, 2), "betas"),
    ("betas", (0.9, NAN), "betas"),
    ("eps", INF, "eps"),
    ("eps", NAN, "eps"),
]


def stepped_opt(backend, seed=6, **kw):
    params = [torch.randn(5, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
    opt = MGGOptimizer(params, random_mgg(seed=seed), lr=0.1, backend=backend, **kw)
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    return params, opt


@pytest.mark.parametrize(("key", "value", "match"), BAD_HYPERPARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_hyperparameter_set_on_a_group_raises_at_step_and_changes_nothing(backend, key, value, match):
    params, opt = stepped_opt(backend)
    snap = snapshot(params, opt)
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    opt.param_groups[0][key] = good
    assert_unchanged(params, opt, snap)


@pytest.mark.parametrize(("key", "value", "match"), BAD_HYPERPARAMS)
def test_bad_hyperparameter_in_a_state_dict_is_rejected_on_load(key, value, match):
    params, opt = stepped_opt("reference")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][key] = value
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "memory_W", "memory_b", "step"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_state_raises_at_step_and_on_load(backend, key):
    params, opt = stepped_opt(backend)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0][key] = sd["state"][0][key].to(torch.complex64)
    snap = snapshot(params, opt)
    with pytest.raises(TypeError, match="real floating-point"):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap)
    good = opt.state[params[0]][key]
    opt.state[params[0]][key] = good.to(torch.complex64)
    with pytest.raises(TypeError, match="real floating-point"):
        opt.step()
    opt.state[params[0]][key] = good  # the original view again: nothing was re-packed
    assert_unchanged(params, opt, snap)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_is_read_on_every_step(backend):
    lr = torch.tensor(0.05)
    p = torch.randn(6, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    opt_t = MGGOptimizer([p], random_mgg(seed=7), lr=lr, backend=backend)
    opt_f = MGGOptimizer([q], random_mgg(seed=7), lr=float(lr), backend=backend)
    for s, new_lr in enumerate([0.05, 0.2, 0.0]):
        lr.fill_(new_lr)  # in place, as a scheduler writing a tensor lr does
        opt_f.param_groups[0]["lr"] = float(lr)
        set_grads([p], s)
        set_grads([q], s)
        opt_t.step()
        opt_f.step()
        assert torch.equal(p.detach(), q.detach()), s
    # a tensor lr set on a group later works as well
    opt_t.param_groups[0]["lr"] = torch.tensor(0.125)
    opt_f.param_groups[0]["lr"] = 0.125
    set_grads([p], 9)
    set_grads([q], 9)
    opt_t.step()
    opt_f.step()
    assert torch.equal(p.detach(), q.detach())
    assert float(opt_t.state[p]["step"]) == 4.0


# ---- 7. a non-finite MGG weight makes the step non-finite, in both backends --------------------


@pytest.mark.parametrize("weight", ["learnable_token_idx", "o_proj.weight", "W1"])
def test_constructor_rejects_a_non_finite_mgg(weight):
    mgg = random_mgg()
    mgg.get_parameter(weight).data.view(-1)[0] = NAN
    with pytest.raises(ValueError, match="NaN or Inf"):
        MGGOptimizer([torch.zeros(3, requires_grad=True)], mgg)


# every MGG parameter but W1/b1, which a step reads only to create state
READ_EVERY_STEP = [name for name, _ in MGG().named_parameters() if name not in ("W1", "b1")]


@pytest.mark.parametrize(
    ("weight", "first"),
    [*((w, f) for w in READ_EVERY_STEP for f in (True, False)), ("W1", True), ("b1", True)],
    ids=lambda v: {True: "first-step", False: "later-step"}.get(v, v) if isinstance(v, bool) else v,
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_mgg_weight_skips_or_raises(backend, weight, first):
    """A non-finite weight that the step reads (W1/b1 are read only to create state) skips it."""
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    mgg = random_mgg(seed=8)
    opt = MGGOptimizer(params, mgg, lr=0.1, backend=backend)
    if not first:
        set_grads(params, 0)
        opt.step()
    mgg.get_parameter(weight).data.view(-1)[0] = NAN
    set_grads(params, 1)
    snap = snapshot(params, opt)
    opt.step()
    assert opt.num_skipped_steps == 1
    old_params, old_sd, _ = snap
    assert_unchanged(params, opt, (old_params, old_sd, 1))
    opt.nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="not taken"):
        opt.step()
    assert_unchanged(params, opt, (old_params, old_sd, 1))


@pytest.mark.parametrize("weight", ["W1", "b1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_initial_memory_matters_only_where_state_is_created(backend, weight):
    """Once state exists a step reads the carried memory, not W1/b1: a NaN there changes nothing
    of it, but a parameter group added later starts from W1/b1, and its first step is skipped."""
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    opt, twin_opt = (MGGOptimizer(ps, random_mgg(seed=8), lr=0.1, backend=backend) for ps in (params, twins))
    for s in range(2):
        set_grads(params, s)
        set_grads(twins, s)
        if s == 1:
            opt.mgg.get_parameter(weight).data.view(-1)[0] = NAN
        opt.step()
        twin_opt.step()
    assert opt.num_skipped_steps == 0
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p.detach(), q.detach())
    late = torch.randn(4, requires_grad=True)
    opt.add_param_group({"params": [late]})
    set_grads([*params, late], 2)
    before = late.detach().clone()
    opt.step()
    assert opt.num_skipped_steps == 1
    assert torch.equal(late.detach(), before)
    assert late not in opt.state


# ---- 8. float64 parameters keep float64 precision ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_parameter_unchanged_at_lr_zero(backend):
    p = (1.0 + 1e-12 * torch.arange(1, 8, dtype=torch.float64)).requires_grad_(True)
    before = p.detach().clone()
    opt = MGGOptimizer([p], random_mgg(seed=9), lr=0.0, backend=backend)
    for s in range(2):
        set_grads([p], s)
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_parameter_update_is_applied_in_float64(backend):
    lr = 1e-6
    mgg = random_mgg(seed=10)
    p = (1.0 + 1e-10 * torch.arange(1, 8, dtype=torch.float64)).requires_grad_(True)
    before = p.detach().clone()
    opt = MGGOptimizer([p], mgg, lr=lr, backend=backend)
    set_grads([p], 0)
    opt.step()
    # the first step by hand: published bias correction (exponent t + 1), then the MGG call
    g = p.grad.float()
    m, v = 0.1 * g, 0.01 * g * g
    denom = torch.sqrt(v / (1 - 0.99**2)) + 1e-8
    update, _ = mgg(torch.stack(((m / (1 - 0.9**2)) / denom, g / denom), dim=-1))
    expected = before - lr * update.detach().double()
    # float32 rounding near 1 is 6e-8: the update must survive far below that
    assert_close(p.detach(), expected, rtol=0, atol=1e-11)
    assert not torch.equal(p.detach(), before)


# ---- 9. a step that raises, or is skipped, creates no state -------------------------------------


def assert_no_state(opt, params, before):
    assert len(opt.state) == 0
    assert opt.state_dict()["state"] == {}
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize(
    ("mgg", "error", "match"),
    [
        (lambda: MGG(12, 1), ValueError, "head dim"),
        (lambda: random_mgg(dtype=torch.float64), TypeError, "float64"),
    ],
    ids=["head-dim-12", "float64-mgg"],
)
@INTERPRETER_ONLY
def test_fused_step_that_raises_creates_no_state(mgg, error, match):
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    if match == "float64":
        params = [p.detach().double().requires_grad_(True) for p in params]
    before = [p.detach().clone() for p in params]
    opt = MGGOptimizer(params, mgg(), lr=0.1, backend="triton")
    set_grads(params, 0)
    with pytest.raises(error, match=match):
        opt.step()
    assert_no_state(opt, params, before)


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_first_step_creates_no_state(backend, policy):
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    before = [p.detach().clone() for p in params]
    opt = MGGOptimizer(params, random_mgg(seed=11), lr=0.1, backend=backend, nonfinite=policy)
    set_grads(params, 0)
    params[1].grad[1] = -INF
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="not taken"):
            opt.step()
    else:
        opt.step()
        assert opt.num_skipped_steps == 1
    assert_no_state(opt, params, before)
    set_grads(params, 1)  # the next good step is a first step
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
    assert math.isfinite(float(sum(p.detach().sum() for p in params)))


# ---- found while writing these tests: an MGG of another size swapped in ------------------------

SWAP_MGG = """
import torch
from helpers import random_mgg
from mgg_fast import MGGOptimizer

p = torch.zeros(4, requires_grad=True)
opt = MGGOptimizer([p], random_mgg(), lr=0.1, backend={backend!r})
p.grad = torch.ones(4)
opt.step()
before = {{k: v.clone() for k, v in opt.state[p].items()}}, p.detach().clone()
opt.mgg = random_mgg(16, 2)  # memory [4, 1, 8, 8] no longer fits: the step must refuse
try:
    opt.step()
except (TypeError, ValueError) as e:
    assert re.search(r"MGG|shape|head", str(e)), e
    print("raised:", e)
else:
    raise SystemExit("no error")
assert torch.equal(p.detach(), before[1])
assert all(torch.equal(opt.state[p][k], v) for k, v in before[0].items())
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_mgg_of_another_size_swapped_in_raises_and_changes_nothing(backend):
    """``opt.mgg`` is a plain attribute (a float64 MGG swapped in is already rejected). One of
    another size must be too, before anything changes. Run in a child process: the fused kernel
    reading and writing the old memory with the new sizes corrupts the heap."""
    code = "import re\n" + SWAP_MGG.format(backend=backend)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "raised:" in done.stdout
