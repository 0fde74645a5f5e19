"""The single-launch step (``kernels/mgg_step_single.py``) against the two-kernel step and the
reference. Under TRITON_INTERPRET=1 its grid is one program (programs run one after another, so a
grid barrier cannot wait for several); on a GPU the same tests run a full resident grid."""

import pytest
import torch
from mgg_fast.kernels import (
    StepGuard,
    forced_single_launch,
    fused_group_step,
    prepare_group,
    single_launch_step,
    use_single_launch,
)
from test_kernels_step import (
    DEVICE,
    SHAPES,
    assert_same_step,
    make_params,
    random_mgg,
    set_grads,
    step_twins,
    twin_optimizers,
)

from mgg_fast.flat_state import FlatState

HYPER = {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}


@pytest.fixture(autouse=True)
def _default_device():
    with torch.device(DEVICE):
        yield


def _twin_flats(mgg, shapes, dtype, memory_W_dtype=None):
    """Two flat states over identical parameters (single-launch and two-kernel)."""
    params = make_params(shapes, dtype, seed=3)
    twins = [p.detach().clone() for p in params]
    return [
        FlatState.zeros(ps, mgg.W1, mgg.b1[:, 0, :], torch.float32, memory_W_dtype) for ps in (params, twins)
    ]


def _bits(t):
    return t.detach().reshape(-1).view(torch.int8)


@pytest.mark.parametrize(
    ("dtype", "memory_W_dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "bf16_memory"],
)
def test_single_launch_matches_two_kernels_bitwise(dtype, memory_W_dtype):
    """Same bits as prologue + update over steps with a skipped parameter, a NaN step and an
    empty tensor; the counters and tickets end where the two-kernel step leaves them."""
    mgg = random_mgg(seed=21)
    single, double = _twin_flats(mgg, SHAPES, dtype, memory_W_dtype)
    guard, skipped, two_guard = (
        StepGuard(torch.device(DEVICE)),
        torch.zeros(()),
        StepGuard(torch.device(DEVICE)),
    )
    for step in range(4):
        gen = torch.Generator(DEVICE).manual_seed(step)
        grads = [(torch.randn(p.shape, generator=gen) * 2).to(dtype) for p in single.params]
        grads[3] = None if step == 1 else grads[3]
        if step == 2:
            grads[4][7] = float("nan")
        group = prepare_group(single, grads, mgg, capturable=False)
        single_launch_step(group, mgg, guard, guard.plan([group]), skipped, **HYPER)
        fused_group_step(double, grads, mgg, **HYPER, guard=two_guard)
        assert guard.found_inf.item() == float(step == 2)
        for a, b in zip(single.params, double.params, strict=True):
            assert torch.equal(
                a.detach().reshape(-1).view(torch.int8), b.detach().reshape(-1).view(torch.int8)
            )
        for name in ("exp_avg", "exp_avg_sq", "memory_W", "memory_b", "steps"):
            assert torch.equal(getattr(single, name), getattr(double, name)), name
    assert skipped.item() == 1.0 == two_guard.skipped.item()
    assert single.steps.tolist() == [3.0, 3.0, 3.0, 2.0, 3.0, 3.0]
    assert guard.ticket.tolist() == [0, 0]


def test_single_launch_of_empty_tensors_only_advances_step_counts():
    mgg = random_mgg(seed=24)
    flat = FlatState.zeros(make_params([(0,), (0, 3)]), mgg.W1, mgg.b1[:, 0, :], torch.float32)
    group = prepare_group(flat, [torch.zeros(0), torch.zeros(0, 3)], mgg, capturable=False)
    guard = StepGuard(torch.device(DEVICE))
    single_launch_step(group, mgg, guard, guard.plan([group]), torch.zeros(()), **HYPER)
    assert flat.steps.tolist() == [1.0, 1.0] and guard.found_inf.item() == 0.0


def test_single_launch_rejects_mixed_dtypes():
    mgg = random_mgg(seed=22)
    params = make_params([(4,), (3,)])
    params[1] = params[1].detach().to(torch.bfloat16)
    flat = FlatState.zeros(params, mgg.W1, mgg.b1[:, 0, :], torch.float32)
    group = prepare_group(flat, [torch.ones(4), torch.ones(3, dtype=torch.bfloat16)], mgg, capturable=False)
    guard = StepGuard(torch.device(DEVICE))
    with pytest.raises(ValueError, match="one parameter dtype"):
        single_launch_step(group, mgg, guard, guard.plan([group]), torch.zeros(()), **HYPER)


def test_optimizer_takes_single_launch_steps_when_asked(monkeypatch):
    """With forced_single_launch(True) the optimizer's fused steps (full and repeated) are single
    launches and match the reference; switching back mid-run keeps matching."""
    import mgg_fast.kernels as kernels

    calls = []
    real = kernels.single_launch_step
    monkeypatch.setattr(kernels, "single_launch_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    mgg = random_mgg(seed=23)
    ref_params, ref_opt, params, opt = twin_optimizers(mgg, [(5,), (130,), ()])
    assert not use_single_launch(torch.device(DEVICE)), "off by default until measured on a GPU"
    with forced_single_launch(True):
        for step in range(3):
            step_twins(ref_params, ref_opt, params, opt, step, none=(2,) if step == 1 else ())
            assert_same_step(ref_params, ref_opt, params, opt)
        assert len(calls) == 3
        set_grads(params, 9)
        params[1].grad[0] = float("inf")
        opt.step()
        assert opt.num_skipped_steps == 1 and len(calls) == 4
    step_twins(ref_params, ref_opt, params, opt, 4)  # the two-kernel step again
    assert_same_step(ref_params, ref_opt, params, opt)
    assert len(calls) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_of_single_launch_step(monkeypatch):
    """The cooperative single launch is captured and replayed like the two-kernel step."""
    import mgg_fast.kernels as kernels
    from test_kernels_step import _capture_and_replay

    calls = []
    real = kernels.single_launch_step
    monkeypatch.setattr(kernels, "single_launch_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with forced_single_launch(True):
        _capture_and_replay()
    assert calls, "the captured step was a single launch"


@pytest.mark.parametrize("case", ["hetero", "official_homog"])
def test_parity_vectors_with_single_launches(step_vectors, case):
    """The optimizer-step parity vectors, every step a single launch (float32 tolerances)."""
    from test_kernels_step import test_optimizer_steps_parity as steps_match_the_vectors

    with forced_single_launch(True):
        steps_match_the_vectors(step_vectors, case)
