"""The torch optimizer contract, as real clients use it (issue 14): ``state[p]`` is the truth
(replaced entries, a cleared or reassigned state, extra per-parameter keys, ZeRO and DCP loading
into ``state``), copies, state-dict hooks, LR schedulers, GradScaler, SWA/EMA, gradient clipping
and resume through ``torch.load(weights_only=True)``. Where it makes sense the same client is
run on ``torch.optim.Adam`` too, and MGGOptimizer must behave as Adam does. The reference backend
is used unless the test is about the fused path (interpreted here: tiny tensors)."""

import copy
import io
import os
import pickle
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from helpers import F32, INTERPRETER_ONLY, TRITON_ON_CPU, random_mgg
from torch import nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.testing import assert_close

from mgg_fast import MGGOptimizer
from mgg_fast.testing import run_local_processes

LR, BETAS = 0.05, (0.9, 0.99)
SHAPES = [(6,), (2, 3), (1,)]


def make_params(seed=0, shapes=SHAPES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_(True) for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def set_grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)


def mgg_opt(params, backend="reference", lr=LR, **kw):
    return MGGOptimizer(params, random_mgg(seed=3), lr=lr, betas=BETAS, backend=backend, **kw)


def adam_opt(params, lr=LR, **_):
    return torch.optim.Adam(params, lr=lr, betas=BETAS)


OPTIMIZERS = {"adam": adam_opt, "mgg": mgg_opt}


def run(opt, params, steps):
    for s in steps:
        set_grads(params, s)
        opt.step()


def stepped(kind, steps):
    """Parameters and an optimizer of ``kind`` that took ``steps`` steps."""
    params = make_params()
    opt = OPTIMIZERS[kind](params)
    run(opt, params, range(steps))
    return params, opt


def assert_same_params(a, b):
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.detach(), q.detach())


def assert_same_state_dicts(a, b):
    assert a["state"].keys() == b["state"].keys()
    for i, st in a["state"].items():
        assert st.keys() == b["state"][i].keys(), i
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k])), (i, k)


def saved_and_loaded(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- state[p] is the truth ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "cpu"])
def test_replaced_exp_avg_is_what_is_stepped(backend):
    params = make_params()
    opt = mgg_opt(params, backend)
    run(opt, params, range(2))
    # the same replacement through a state dict, on a twin, is the expected outcome
    twin = clone_params(params)
    twin_opt = mgg_opt(twin, backend)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg"] = torch.full((2, 3), 0.5)
    twin_opt.load_state_dict(sd)
    opt.state[params[1]]["exp_avg"] = torch.full((2, 3), 0.5)
    # Adam steps the replaced tensor too: its new moment is 0.9 * 0.5 + 0.1 * g
    adam_params = clone_params(params)
    adam = adam_opt(adam_params)
    run(adam, adam_params, range(2))
    adam.state[adam_params[1]]["exp_avg"] = torch.full((2, 3), 0.5)
    for o, ps in ((opt, params), (twin_opt, twin), (adam, adam_params)):
        set_grads(ps, 2)
        o.step()
    assert_same_params(params, twin)
    assert_same_state_dicts(opt.state_dict(), twin_opt.state_dict())
    assert_close(opt.state[params[1]]["exp_avg"], adam.state[adam_params[1]]["exp_avg"], **F32)
    assert float(opt.state[params[1]]["step"]) == 3.0


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "cpu"])
def test_state_entry_replaced_by_copies_continues_identically(backend):
    """What ZeroRedundancyOptimizer.load_state_dict does: ``optim.state[p] = {...copies...}``."""
    params, twin = make_params(), make_params()
    opt, twin_opt = mgg_opt(params, backend), mgg_opt(twin, backend)
    run(opt, params, range(2))
    run(twin_opt, twin, range(2))
    for p in params:
        opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
    run(opt, params, range(2, 4))
    run(twin_opt, twin, range(2, 4))
    assert_same_params(params, twin)
    assert_same_state_dicts(opt.state_dict(), twin_opt.state_dict())


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "cpu"])
def test_entry_replaced_while_its_group_has_no_gradient_is_seen_later(backend):
    """A step that leaves a group out (no gradients) must not take a replaced entry of that group
    as checked: the group's next step steps the replacement."""
    params, twin = make_params(), make_params()
    opts = [
        MGGOptimizer([{"params": ps[:1]}, {"params": ps[1:]}], random_mgg(seed=3), lr=LR, backend=backend)
        for ps in (params, twin)
    ]
    for opt, ps in zip(opts, (params, twin), strict=True):
        run(opt, ps, range(2))
    opts[0].state[params[1]]["exp_avg"] = torch.full((2, 3), 0.5)
    set_grads(params[:1], 2)
    for p in params[1:]:
        p.grad = None
    opts[0].step()  # group 1 has no gradient: untouched
    set_grads(twin[:1], 2)
    for p in twin[1:]:
        p.grad = None
    opts[1].step()
    opts[1].state[twin[1]]["exp_avg"] = torch.full((2, 3), 0.5)
    for opt, ps in zip(opts, (params, twin), strict=True):
        set_grads(ps, 3)
        opt.step()
    assert_same_params(params, twin)
    assert_same_state_dicts(opts[0].state_dict(), opts[1].state_dict())


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "cpu"])
def test_renamed_state_key_is_seen(backend):
    """Moving the last entry of ``state[p]`` under another key keeps every tensor in place, but
    ``state[p]`` now lacks ``memory_b``: the step says so, as it would on a fresh load."""
    params, opt = make_params(), None
    opt = mgg_opt(params, backend)
    run(opt, params, range(2))
    entry = opt.state[params[0]]
    last = list(entry)[-1]
    entry["renamed"] = entry.pop(last)
    set_grads(params, 2)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=f"lacks {last!r}"):
        opt.step()
    assert_same_params(params, before)


@pytest.mark.parametrize("how", ["clear", "reassign"])
@pytest.mark.parametrize("kind", ["adam", "mgg"])
def test_cleared_state_is_a_fresh_start(kind, how):
    params, opt = stepped(kind, 3)
    if how == "clear":
        opt.state.clear()
    else:
        opt.state = defaultdict(dict)
    assert opt.state_dict()["state"] == {}
    fresh_params = clone_params(params)
    fresh = OPTIMIZERS[kind](fresh_params)
    run(opt, params, range(3, 5))
    run(fresh, fresh_params, range(3, 5))
    assert_same_params(params, fresh_params)
    sd = opt.state_dict()
    assert_same_state_dicts(sd, fresh.state_dict())
    assert [float(st["step"]) for st in sd["state"].values()] == [2.0] * len(params)


@pytest.mark.parametrize("kind", ["adam", "mgg-reference", "mgg-triton"])
def test_lookahead_resume_matches_an_uninterrupted_run(kind):
    """timm's Lookahead keeps ``lookahead_slow_buff`` in the base optimizer's ``state[p]``."""
    from timm.optim import Lookahead

    def make(params):
        if kind == "adam":
            return Lookahead(adam_opt(params), alpha=0.5, k=3)
        return Lookahead(mgg_opt(params, kind.split("-")[1]), alpha=0.5, k=3)

    params = make_params()
    opt = make(params)
    run(opt, params, range(7))

    resumed = make_params()
    opt2 = make(resumed)
    run(opt2, resumed, range(4))  # the slow buffers exist (k = 3) and a cycle is under way
    saved = saved_and_loaded({"params": [p.detach() for p in resumed], "optim": opt2.state_dict()})
    assert all("lookahead_slow_buff" in st for st in saved["optim"]["state"].values())
    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    opt3 = make(resumed)
    opt3.load_state_dict(saved["optim"])
    run(opt3, resumed, range(4, 7))
    assert_same_params(params, resumed)
    assert_same_state_dicts(opt.state_dict(), opt3.state_dict())


@pytest.mark.parametrize("kind", ["adam", "mgg"])
def test_state_made_by_a_finite_step_can_be_copied_and_loaded(kind):
    """A finite gradient of 1e21 overflows the fp32 second moment (g * g) to +inf; Adam and the
    MGG both step on. Whatever state a step produced must survive a copy and a resume."""
    params, opt = stepped(kind, 1)
    for p in params:
        p.grad = torch.full_like(p, 1e21)
    opt.step()
    assert torch.isinf(opt.state[params[0]]["exp_avg_sq"]).all()
    dup = copy.deepcopy(opt)
    resumed = clone_params(params)
    loaded = OPTIMIZERS[kind](resumed)
    loaded.load_state_dict(saved_and_loaded(opt.state_dict()))
    dup_params = dup.param_groups[0]["params"]
    for o, ps in ((opt, params), (dup, dup_params), (loaded, resumed)):
        run(o, ps, range(2, 4))
    assert_same_params(params, dup_params)
    assert_same_params(params, resumed)


# ---- copies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["adam", "mgg"])
def test_copy_of_the_optimizer_works_and_is_independent(kind, how):
    params, opt = stepped(kind, 2)
    dup = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    dup_params = dup.param_groups[0]["params"]
    assert all(q is not p for p, q in zip(params, dup_params, strict=True))
    assert_same_params(params, dup_params)
    if kind == "mgg":
        assert dup.mgg is not opt.mgg
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    run(dup, dup_params, range(2, 4))  # the copy steps alone: the original does not move
    assert_same_state_dicts(opt.state_dict(), before[0])
    assert_same_params(params, before[1])
    run(opt, params, range(2, 4))
    assert_same_params(params, dup_params)
    assert_same_state_dicts(opt.state_dict(), dup.state_dict())


# ---- state-dict hooks --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adam", "mgg"])
def test_all_four_state_dict_hooks_fire(kind):
    params, opt = stepped(kind, 2)
    calls = []

    def rewrite(o, sd):
        calls.append("load_pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.125
        sd["state"][0]["exp_avg"] = torch.full((6,), 0.25)
        return sd

    opt.register_state_dict_pre_hook(lambda o: calls.append("save_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save_post"))
    opt.register_load_state_dict_pre_hook(rewrite)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == ["save_pre", "save_post", "load_pre", "load_post"]
    assert opt.param_groups[0]["lr"] == 0.125
    assert torch.all(opt.state[params[0]]["exp_avg"] == 0.25)
    assert sd["param_groups"][0]["lr"] == LR  # the hook rewrote a copy


@pytest.mark.parametrize("kind", ["adam", "mgg"])
def test_state_dict_post_hook_sees_the_whole_state_dict(kind):
    """torch calls the post-hook "after generating a state_dict": it sees (and may rewrite or
    replace) everything ``state_dict()`` returns."""
    _params, opt = stepped(kind, 1)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd)))
    returned = opt.state_dict()
    assert seen == [sorted(returned)]
    opt.register_state_dict_post_hook(
        lambda o, sd: {"state": sd["state"], "param_groups": sd["param_groups"]}
    )
    assert sorted(opt.state_dict()) == ["param_groups", "state"]


# ---- LR schedulers -----------------------------------------------------------------------------

STEPS = 6
TORCH_SCHEDULERS = {
    "StepLR": lambda o: StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: MultiStepLR(o, milestones=[1, 3], gamma=0.3),
    "ExponentialLR": lambda o: ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: CosineAnnealingLR(o, T_max=4),
    "CosineAnnealingWarmRestarts": lambda o: CosineAnnealingWarmRestarts(o, T_0=2),
    "LambdaLR": lambda o: LambdaLR(o, lambda e: 1.0 / (e + 1)),
    "LinearLR": lambda o: LinearLR(o, start_factor=0.2, total_iters=3),
    "ConstantLR": lambda o: ConstantLR(o, factor=0.5, total_iters=2),
    "PolynomialLR": lambda o: PolynomialLR(o, total_iters=4, power=2.0),
    "OneCycleLR": lambda o: OneCycleLR(
        o, max_lr=0.1, total_steps=STEPS, base_momentum=0.8, max_momentum=0.95
    ),
    "CyclicLR": lambda o: CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=2, base_momentum=0.8, max_momentum=0.9
    ),
    "ReduceLROnPlateau": lambda o: ReduceLROnPlateau(o, patience=0, factor=0.5),
}
BETA_CYCLING = ("OneCycleLR", "CyclicLR")


def timm_scheduler(name, opt):
    import timm.scheduler as ts

    return {
        "timm.CosineLRScheduler": lambda: ts.CosineLRScheduler(
            opt, t_initial=4, warmup_t=1, warmup_lr_init=1e-3
        ),
        "timm.StepLRScheduler": lambda: ts.StepLRScheduler(opt, decay_t=2, decay_rate=0.5),
        "timm.MultiStepLRScheduler": lambda: ts.MultiStepLRScheduler(opt, decay_t=[2, 4], decay_rate=0.5),
        "timm.PlateauLRScheduler": lambda: ts.PlateauLRScheduler(opt, patience_t=0, decay_rate=0.5),
        "timm.TanhLRScheduler": lambda: ts.TanhLRScheduler(opt, t_initial=5),
        "timm.PolyLRScheduler": lambda: ts.PolyLRScheduler(opt, t_initial=5, power=2.0),
    }[name]()


SCHEDULERS = [*TORCH_SCHEDULERS, *(f"timm.{n}" for n in ("CosineLRScheduler", "StepLRScheduler"))]
SCHEDULERS += [f"timm.{n}" for n in ("MultiStepLRScheduler", "PlateauLRScheduler", "TanhLRScheduler")]
SCHEDULERS += ["timm.PolyLRScheduler"]


def scheduled_run(kind, name):
    """``STEPS`` steps under scheduler ``name``; the (lr, betas) each step used, and the params."""
    params = make_params()
    opt = OPTIMIZERS[kind](params)
    sched = timm_scheduler(name, opt) if name.startswith("timm.") else TORCH_SCHEDULERS[name](opt)
    used = []
    for s in range(STEPS):
        group = opt.param_groups[0]
        used.append((group["lr"], tuple(group["betas"])))
        set_grads(params, s)
        opt.step()
        metric = float(s % 2)  # plateaus: alternately no improvement
        if isinstance(sched, ReduceLROnPlateau):
            sched.step(metric)
        elif name == "timm.PlateauLRScheduler":
            sched.step(s + 1, metric)
        elif name.startswith("timm."):
            sched.step(s + 1)
        else:
            sched.step()
    return used, params


@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_schedulers_drive_the_mgg_as_they_drive_adam(name):
    used, params = scheduled_run("mgg", name)
    adam_used, _ = scheduled_run("adam", name)
    assert used == adam_used
    assert len({lr for lr, _ in used}) > 1  # the schedule changed the learning rate
    # every step read the group's lr and betas: the same values set by hand give the same result
    by_hand = make_params()
    opt = mgg_opt(by_hand)
    for s, (lr, betas) in enumerate(used):
        opt.param_groups[0]["lr"], opt.param_groups[0]["betas"] = lr, betas
        set_grads(by_hand, s)
        opt.step()
    assert_same_params(params, by_hand)
    if name in BETA_CYCLING:
        assert len({b for _, b in used}) > 1
        fixed_betas = make_params()
        opt = mgg_opt(fixed_betas)
        for s, (lr, _) in enumerate(used):
            opt.param_groups[0]["lr"] = lr
            set_grads(fixed_betas, s)
            opt.step()
        assert not torch.equal(fixed_betas[0].detach(), params[0].detach())  # beta cycling mattered


# ---- GradScaler, SWA/EMA, clipping -------------------------------------------------------------


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def batch(seed):
    gen = torch.Generator().manual_seed(500 + seed)
    return torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)


def model_loss(model, seed):
    x, y = batch(seed)
    return ((model(x).float() - y) ** 2).mean()


@pytest.mark.parametrize("kind", ["adam", "mgg"])
def test_grad_scaler_with_autocast(kind):
    scaled, plain = tiny_model(), tiny_model()
    opt_s, opt_p = (OPTIMIZERS[kind](list(m.parameters())) for m in (scaled, plain))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for s in range(3):
        for model, opt in ((scaled, opt_s), (plain, opt_p)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model_loss(model, s)
            if opt is opt_s:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    # a power-of-two scale and its inverse are exact: the same steps as without the scaler
    assert_same_params(scaled.parameters(), plain.parameters())
    # an overflowing step is skipped by the scaler: nothing changes, the scale halves
    before = copy.deepcopy(opt_s.state_dict()), [p.detach().clone() for p in scaled.parameters()]
    opt_s.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model_loss(scaled, 3)
    scaler.scale(loss).backward()
    next(scaled.parameters()).grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt_s)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert_same_params(scaled.parameters(), before[1])
    assert_same_state_dicts(opt_s.state_dict(), before[0])


def test_ema_and_swa_average_the_mgg_trajectory():
    from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

    model = tiny_model()
    opt = mgg_opt(list(model.parameters()))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    swa = AveragedModel(model)
    swalr = SWALR(opt, swa_lr=0.01, anneal_epochs=2)
    trajectory, lrs = [], []
    for s in range(4):
        opt.zero_grad()
        model_loss(model, s).backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        swalr.step()
        ema.update_parameters(model)
        swa.update_parameters(model)
        trajectory.append([p.detach().clone() for p in model.parameters()])
    assert lrs[0] != lrs[-1] and lrs[-1] == pytest.approx(0.01)
    for i, (e, w) in enumerate(zip(ema.module.parameters(), swa.module.parameters(), strict=True)):
        expected_ema = trajectory[0][i]
        for step in trajectory[1:]:
            expected_ema = 0.9 * expected_ema + 0.1 * step[i]
        assert_close(e.detach(), expected_ema, **F32)
        assert_close(w.detach(), torch.stack([t[i] for t in trajectory]).mean(0), **F32)


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "cpu"])
def test_clip_grad_norm_then_step(backend):
    params, by_hand = make_params(), make_params()
    opt, opt_hand = mgg_opt(params, backend), mgg_opt(by_hand, backend)
    for s in range(3):
        set_grads(params, s, scale=10.0)
        set_grads(by_hand, s, scale=10.0)
        total = torch.nn.utils.clip_grad_norm_(params, max_norm=0.5)
        assert total > 0.5
        coef = 0.5 / (total + 1e-6)
        for p in by_hand:
            p.grad.mul_(coef)
        opt.step()
        opt_hand.step()
    for p, q in zip(params, by_hand, strict=True):
        assert_close(p.detach(), q.detach(), **F32)
    assert_close(opt.state[params[0]]["exp_avg"], opt_hand.state[by_hand[0]]["exp_avg"], **F32)


# ---- resume through a file, weights_only -------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "memory"),
    [
        ("reference", None),
        pytest.param("triton", None, marks=INTERPRETER_ONLY),
        pytest.param("triton", torch.bfloat16, marks=INTERPRETER_ONLY),
        ("reference", torch.bfloat16),
    ],
)
def test_resume_through_torch_save_and_weights_only_load(tmp_path, backend, memory):
    shapes = [(130,), (2, 3), (1,)]  # two programs under the interpreter for the first tensor

    def make(params):
        opt = mgg_opt(params, backend, memory_W_dtype=memory)
        return opt, OneCycleLR(opt, max_lr=0.1, total_steps=6)

    def train(opt, sched, params, steps):
        for s in steps:
            set_grads(params, s)
            opt.step()
            sched.step()

    params = make_params(shapes=shapes)
    opt, sched = make(params)
    train(opt, sched, params, range(6))

    resumed = make_params(shapes=shapes)
    opt2, sched2 = make(resumed)
    train(opt2, sched2, resumed, range(3))
    path = tmp_path / "ckpt.pt"
    save_atomic(
        {"params": [p.detach() for p in resumed], "optim": opt2.state_dict(), "sched": sched2.state_dict()},
        path,
    )
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt.pt"]
    ckpt = torch.load(path, weights_only=True)
    resumed = [p.clone().requires_grad_(True) for p in ckpt["params"]]
    opt3, sched3 = make(resumed)
    opt3.load_state_dict(ckpt["optim"])
    sched3.load_state_dict(ckpt["sched"])
    train(opt3, sched3, resumed, range(3, 6))
    assert_same_params(params, resumed)
    assert_same_state_dicts(opt.state_dict(), opt3.state_dict())
    assert opt3.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_groups_naming_the_mgg_save_weights_only_and_resume():
    """What ZeroRedundancyOptimizer hands its local optimizer: groups that hold the constructor's
    ``mgg=``. The groups keep the MGG's config instead, so the state dict loads with
    weights_only=True and resumes bitwise."""
    mgg = random_mgg(seed=3)

    def make(params):
        return MGGOptimizer([{"params": params, "mgg": mgg, "lr": LR}], mgg, betas=BETAS, backend="reference")

    params = make_params()
    opt = make(params)
    run(opt, params, range(4))
    resumed = make_params()
    opt2 = make(resumed)
    run(opt2, resumed, range(2))
    assert opt2.param_groups[0]["mgg"] == mgg.config
    saved = saved_and_loaded({"params": [p.detach() for p in resumed], "optim": opt2.state_dict()})
    assert saved["optim"]["param_groups"][0]["mgg"] == {"hidden_size": 8, "num_heads": 1}
    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    opt3 = make(resumed)
    opt3.load_state_dict(saved["optim"])
    run(opt3, resumed, range(2, 4))
    assert_same_params(params, resumed)
    assert_same_state_dicts(opt.state_dict(), opt3.state_dict())


def test_a_group_naming_another_mgg_is_refused_and_changes_nothing():
    mgg, other = random_mgg(seed=3), random_mgg(16, 2, seed=4)
    with pytest.raises(ValueError, match=r"'mgg' entry is another MGG .*cannot name another"):
        MGGOptimizer([{"params": make_params(), "mgg": other}], mgg)
    _params, opt = stepped("mgg", 2)
    with pytest.raises(ValueError, match="cannot name another"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "mgg": random_mgg(seed=3)})
    assert len(opt.param_groups) == 1
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["mgg"] = other.config
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"saved parameter group's 'mgg' entry is \{'hidden_size': 16"):
        opt.load_state_dict(sd)
    assert "mgg" not in opt.param_groups[0]
    assert_same_state_dicts(opt.state_dict(), before)


def test_a_first_step_with_zero_gradients_and_lr_0_is_a_real_step():
    """Only DCP's own state-initialising call is recognised, not the values it steps with: a
    user's first step with zero gradients and lr 0 runs the memory step as any step does."""
    params = make_params()
    opt = mgg_opt(params, lr=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = opt.state[params[0]]
    assert float(state["step"]) == 1.0
    assert not torch.equal(state["memory_b"][0], opt.mgg.b1.detach()[:, 0, :])


# ---- distributed: DDP + DCP, ZeroRedundancyOptimizer (2 gloo processes on 127.0.0.1) ----------


def _ddp_train(model, opt, rank, steps):
    for s in steps:
        opt.zero_grad()
        model_loss(model, 100 * rank + s).backward()  # different data per rank: DDP averages
        opt.step()


def _dcp_scenario(rank, out):
    """DDP, 4 steps uninterrupted vs 2 steps, DCP save/load (get/set_optimizer_state_dict), 2 more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make():
        model = DDP(tiny_model())
        return model, mgg_opt(list(model.parameters()))

    model, opt = make()
    _ddp_train(model, opt, rank, range(4))
    model2, opt2 = make()
    _ddp_train(model2, opt2, rank, range(2))
    opt2.zero_grad()
    model_loss(model2, 100 * rank + 99).backward()
    next(model2.parameters()).grad.fill_(float("nan"))
    opt2.step()  # skipped (counted; nothing else changes): the count must survive DCP too
    ckpt = str(Path(out) / "dcp")
    dcp.save(
        {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)},
        checkpoint_id=ckpt,
    )
    model3, opt3 = make()
    target = {"model": get_model_state_dict(model3), "optim": get_optimizer_state_dict(model3, opt3)}
    dcp.load(target, checkpoint_id=ckpt)
    set_model_state_dict(model3, target["model"])
    set_optimizer_state_dict(model3, opt3, target["optim"])
    _ddp_train(model3, opt3, rank, range(2, 4))
    return {
        "uninterrupted": [p.detach() for p in model.parameters()],
        "resumed": [p.detach() for p in model3.parameters()],
        "steps": [float(opt3.state[p]["step"]) for p in model3.parameters()],
        "skipped": (opt2.num_skipped_steps, opt3.num_skipped_steps),
        "state": opt.state_dict()["state"],
        "resumed_state": opt3.state_dict()["state"],
    }


def _dcp_before_first_step_scenario(rank, out):
    """A DCP checkpoint taken before the first step: ``get_optimizer_state_dict`` (and
    ``set_optimizer_state_dict``) first run torch's state-initialising step (zero gradients,
    lr 0). Neither the optimizer that was saved nor one resumed from the checkpoint may then
    train differently from one that was never checkpointed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make():
        model = DDP(tiny_model())
        return model, mgg_opt(list(model.parameters()))

    model, opt = make()
    _ddp_train(model, opt, rank, range(3))
    model2, opt2 = make()
    ckpt = str(Path(out) / "dcp-before-first-step")
    dcp.save(
        {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)},
        checkpoint_id=ckpt,
    )
    b1 = opt2.mgg.b1.detach()[:, 0, :]
    made = {
        "steps": [float(st["step"]) for st in opt2.state.values()],
        "memory_b_moved": max(float((st["memory_b"] - b1).abs().max()) for st in opt2.state.values()),
        "moments": max(float(st["exp_avg"].abs().max()) for st in opt2.state.values()),
    }
    _ddp_train(model2, opt2, rank, range(3))
    model3, opt3 = make()
    target = {"model": get_model_state_dict(model3), "optim": get_optimizer_state_dict(model3, opt3)}
    dcp.load(target, checkpoint_id=ckpt)
    set_model_state_dict(model3, target["model"])
    set_optimizer_state_dict(model3, opt3, target["optim"])
    _ddp_train(model3, opt3, rank, range(3))
    return {
        "made": made,
        "uninterrupted": [p.detach() for p in model.parameters()],
        "saved": [p.detach() for p in model2.parameters()],
        "resumed": [p.detach() for p in model3.parameters()],
        "state": opt.state_dict()["state"],
        "saved_state": opt2.state_dict()["state"],
        "resumed_state": opt3.state_dict()["state"],
    }


def _zero_scenario(rank, out):
    """ZeroRedundancyOptimizer(optimizer_class=MGGOptimizer, mgg=...) under DDP, built the natural
    way (ZeRO hands every constructor argument to the local optimizer inside its parameter
    groups): the same resume, through consolidate_state_dict, torch.save, a weights-only load and
    ZeRO's load_state_dict (which sets ``optim.state[p]``)."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make():
        model = DDP(tiny_model())
        opt = ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=MGGOptimizer,
            mgg=random_mgg(seed=3),
            lr=LR,
            betas=BETAS,
            backend="reference",
        )
        return model, opt

    model, opt = make()
    _ddp_train(model, opt, rank, range(4))
    model2, opt2 = make()
    _ddp_train(model2, opt2, rank, range(2))
    opt2.consolidate_state_dict(to=0)
    path = Path(out) / "zero.pt"
    if rank == 0:
        save_atomic(opt2.state_dict(), path)
    dist.barrier()
    model3, opt3 = make()
    model3.module.load_state_dict(model2.module.state_dict())
    saved = torch.load(path, weights_only=True)
    opt3.load_state_dict(saved)
    _ddp_train(model3, opt3, rank, range(2, 4))
    return {
        "uninterrupted": [p.detach() for p in model.parameters()],
        "resumed": [p.detach() for p in model3.parameters()],
        "steps": [float(st["step"]) for st in opt3.optim.state.values()],
        "num_local_params": len(opt3.optim.param_groups[0]["params"]),
        "saved_mgg": [g.get("mgg") for g in saved["param_groups"]],
    }


def _attempt(scenario, rank, out):
    """What ``scenario`` returned, or ``{"error": ...}``: one failing scenario must not hide
    what the others found."""
    try:
        return scenario(rank, out)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _distributed_worker(rank, _world_size, out):
    """The distributed scenarios in one pair of processes (each process start costs seconds)."""
    return {
        "dcp": _attempt(_dcp_scenario, rank, out),
        "dcp_first": _attempt(_dcp_before_first_step_scenario, rank, out),
        "zero": _attempt(_zero_scenario, rank, out),
    }


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    return run_local_processes(_distributed_worker, tmp_path_factory.mktemp("distributed"))


def scenario_results(distributed_results, name):
    results = [r[name] for r in distributed_results]
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
    return results


def test_ddp_dcp_resume_matches_an_uninterrupted_run(distributed_results):
    results = scenario_results(distributed_results, "dcp")
    for r in results:
        assert_same_params(r["uninterrupted"], r["resumed"])
        assert r["steps"] == [4.0] * 4
        assert r["skipped"] == (1, 1)  # saved with one skipped step, resumed with it
        assert_same_state_dicts({"state": r["state"]}, {"state": r["resumed_state"]})
    assert_same_params(results[0]["resumed"], results[1]["resumed"])  # DDP kept the ranks in sync


def test_dcp_checkpoint_before_the_first_step_does_not_change_training(distributed_results):
    results = scenario_results(distributed_results, "dcp_first")
    for r in results:
        assert_same_params(r["uninterrupted"], r["saved"])
        assert_same_params(r["uninterrupted"], r["resumed"])
        assert_same_state_dicts({"state": r["state"]}, {"state": r["saved_state"]})
        assert_same_state_dicts({"state": r["state"]}, {"state": r["resumed_state"]})
        # DCP's state-initialising step made the state a first step starts from, and stepped nothing
        assert r["made"] == {"steps": [0.0] * 4, "memory_b_moved": 0.0, "moments": 0.0}
    assert_same_params(results[0]["resumed"], results[1]["resumed"])


def test_zero_redundancy_resume_matches_an_uninterrupted_run(distributed_results):
    """Built the natural way, ZeRO's consolidated state dict loads with weights_only=True (its
    groups hold the MGG's config, not the module) and resumes bitwise."""
    results = scenario_results(distributed_results, "zero")
    for r in results:
        assert r["saved_mgg"] == [{"hidden_size": 8, "num_heads": 1}]
        assert r["num_local_params"] >= 1  # each rank steps its own share
        assert_same_params(r["uninterrupted"], r["resumed"])
        assert r["steps"] and r["steps"] == [4.0] * len(r["steps"])
    assert_same_params(results[0]["resumed"], results[1]["resumed"])
