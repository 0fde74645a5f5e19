"""The reference path against every vector made with the published MGTTA code."""

import pytest
import torch
from helpers import F32, F32_METAGRAD, F64, mgg_from_parity
from torch.testing import assert_close

from mgg_fast import MGG, MGGOptimizer
from mgg_fast.core.reference import bias_corrections, moment_features_

PREFIX = "seq_modeling_block."
DTYPES = [(torch.float64, "f64", F64), (torch.float32, "f32", F32)]


@pytest.mark.parametrize(("dtype", "tag", "tol"), DTYPES)
def test_forward_six_chained_calls(forward_vectors, dtype, tag, tol):
    d = forward_vectors
    mgg = mgg_from_parity(d, dtype)
    state = None
    with torch.no_grad():
        for t in range(d["T"]):
            out, state = mgg(d["inputs"][t].to(dtype), state)
            assert out.shape == (d["N"],)
            assert_close(out.double(), d["outputs_f64"][t].reshape(-1), **tol)
            assert_close(state.W1.double(), d["W1_states_f64"][t], **tol)
            assert_close(state.b1.double(), d["b1_states_f64"][t][:, :, 0, :], **tol)
            assert_close(state.W1.double().sum(0), d["W1_states_sum_f64"][t], **tol)


@pytest.mark.parametrize(
    ("dtype", "tag", "tol", "backend"),
    [(*DTYPES[0], "reference"), (*DTYPES[1], "reference")],
)
@pytest.mark.parametrize("case", ["hetero", "official_homog"])
def test_optimizer_steps(step_vectors, case, dtype, tag, tol, backend):
    d = step_vectors
    c = d["cases"][case]
    mgg = mgg_from_parity(d, dtype)
    params = [p.to(dtype).clone().requires_grad_(True) for p in c["params_init"]]
    opt = MGGOptimizer(
        params, mgg, lr=d["adapt_lr"], betas=(d["beta1"], d["beta2"]), eps=d["eps"], backend=backend
    )
    for t in range(d["T"]):
        for p, g in zip(params, c["grads"][t], strict=True):
            p.grad = g.to(dtype)
        opt.step()
        for i, p in enumerate(params):
            assert_close(p.detach().double(), c["params_f64"][t][i], **tol)
            assert_close(opt.state[p]["exp_avg"].double(), c["m_f64"][t][i], **tol)
            assert_close(opt.state[p]["exp_avg_sq"].double(), c["v_f64"][t][i], **tol)
            assert opt.state[p]["step"].item() == t + 1


def _metagrad(mgg: MGG, inputs, c, state=None) -> dict:
    mgg.zero_grad(set_to_none=True)
    out, _ = mgg(inputs, state)
    (c * out).sum().backward()
    return {n: p.grad for n, p in mgg.named_parameters()}


def _assert_grads(grads: dict, expected: dict, none_names, tol):
    for name, ref in expected.items():
        short = name.removeprefix(PREFIX)
        if name in none_names:
            assert grads[short] is None, f"{short} must get no gradient"
        else:
            assert_close(grads[short].double(), ref, **tol, msg=lambda m, s=short: f"{s}: {m}")


@pytest.mark.parametrize(
    ("dtype", "tag", "tol"), [(torch.float64, "f64", F64), (torch.float32, "f32", F32_METAGRAD)]
)
def test_metagrad_first_call(metagrad_vectors, dtype, tag, tol):
    case = metagrad_vectors["cases"]["first_call"]
    mgg = mgg_from_parity(metagrad_vectors, dtype)
    grads = _metagrad(mgg, case["inputs"].to(dtype), case["c"].to(dtype))
    _assert_grads(grads, case["grads_f64"], case["grads_none"], tol)


@pytest.mark.parametrize(
    ("dtype", "tag", "tol"), [(torch.float64, "f64", F64), (torch.float32, "f32", F32_METAGRAD)]
)
def test_metagrad_carried_state(metagrad_vectors, dtype, tag, tol):
    case = metagrad_vectors["cases"]["carried_state"]
    mgg = mgg_from_parity(metagrad_vectors, dtype)
    with torch.no_grad():
        _, state = mgg(case["prev_inputs"].to(dtype))
    if dtype == torch.float64:
        assert_close(state.W1, case["W1_states_in"], **F64)
        assert_close(state.b1, case["b1_states_in"][:, :, 0, :], **F64)
    grads = _metagrad(mgg, case["inputs"].to(dtype), case["c"].to(dtype), state)
    _assert_grads(grads, case["grads_f64"], case["grads_none"], tol)


def test_metagrad_training_chain(metagrad_vectors):
    """The published meta-training records: grad of sum(c * out_{k+1}), c = -lr * grads[k+1]."""
    case = metagrad_vectors["cases"]["trainmgg_chain"]
    mgg = mgg_from_parity(metagrad_vectors, torch.float64)
    state = None
    for k, record in enumerate(case["records"]):
        c = -case["adapt_lr"] * torch.cat([g.reshape(-1) for g in case["grads"][k + 1]])
        grads = _metagrad(mgg, case["features_f64"][k], c, state)
        _assert_grads(grads, record["grads"], record["grads_none"], F64)
        with torch.no_grad():
            _, state = mgg(case["features_f64"][k], state)


@pytest.mark.parametrize(("dtype", "tag", "tol"), DTYPES)
def test_moment_features(step_vectors, dtype, tag, tol):
    """Moments with the t+1 bias-correction quirk give the published MGG inputs [m̃, g̃]."""
    d = step_vectors
    c = d["cases"]["hetero"]
    n = sum(p.numel() for p in c["params_init"])
    m = torch.zeros(n, dtype=dtype)
    v = torch.zeros(n, dtype=dtype)
    for t in range(d["T"]):
        g = torch.cat([x.reshape(-1) for x in c["grads"][t]]).to(dtype)
        bc1, bc2 = bias_corrections(t + 1, d["beta1"], d["beta2"])
        assert 1 - bc1 == pytest.approx(d["beta1"] ** d["bias_correction_exponents"][t])
        x = moment_features_(g, m, v, bc1, bc2, d["beta1"], d["beta2"], d["eps"])
        assert_close(x.double(), c["features_f64"][t][:, 0, :], **tol)
