"""The fused MGG forward kernel against the parity vectors and the reference (float64 truth).

Runs on CPU through TRITON_INTERPRET=1 (tests/conftest.py); sizes are kept to a few programs.
"""

import pytest
import torch
from helpers import F32, mgg_from_parity, random_mgg
from mgg_fast.kernels import fused_mgg_forward
from torch.testing import assert_close

from mgg_fast import MGG
from mgg_fast.core.reference import memory_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(8, 1), (16, 2), (24, 3), (32, 1), (64, 2), (64, 8)]  # (hidden, heads): f = 8, 16, 32


@pytest.fixture(autouse=True)
def _default_device():
    """Tensors and MGGs of these tests live on the GPU when there is one (else the interpreter)."""
    with torch.device(DEVICE):
        yield


def learned(mgg: MGG) -> tuple:
    """What the fused forward takes of an MGG: its weights, W1 and b1."""
    return mgg.weights(), mgg.W1, mgg.b1


def reference_f64(mgg: MGG, x, W=None, b=None):
    m64 = MGG(mgg.hidden_size, mgg.num_heads).double()
    m64.load_state_dict(mgg.state_dict())
    n = x.shape[0]
    if W is None:
        W = m64.W1.detach().expand(n, -1, -1, -1)
        b = m64.b1.detach()[:, 0, :].expand(n, -1, -1)
    with torch.no_grad():
        return memory_layer(x.double(), W.double(), b.double(), m64.weights())


def test_forward_six_chained_calls(forward_vectors):
    d = forward_vectors
    mgg = mgg_from_parity(d, torch.float32).to(DEVICE)
    W = b = None
    for t in range(d["T"]):
        out, W, b = fused_mgg_forward(d["inputs"][t].float().to(DEVICE), W, b, *learned(mgg))
        assert out.shape == (d["N"],)
        assert_close(out.double().cpu(), d["outputs_f64"][t].reshape(-1), **F32)
        assert_close(W.double().cpu(), d["W1_states_f64"][t], **F32)
        assert_close(b.double().cpu(), d["b1_states_f64"][t][:, :, 0, :], **F32)
        assert_close(W.double().sum(0).cpu(), d["W1_states_sum_f64"][t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("hidden", "heads"), SIZES)
def test_forward_matches_reference(hidden, heads):
    """First call (tiled learned memory) then a carried-state call; N=150 is not a block multiple."""
    mgg = random_mgg(hidden, heads, seed=hidden + heads)
    gen = torch.Generator(DEVICE).manual_seed(1)
    x = torch.randn(150, 2, generator=gen) * 3
    x[:3] = 0.0
    out, W, b = fused_mgg_forward(x, None, None, *learned(mgg))
    ref_out, ref_W, ref_b = reference_f64(mgg, x)
    assert_close(out.double(), ref_out, **F32)
    assert_close(W.double(), ref_W, **F32)
    assert_close(b.double(), ref_b, **F32)
    x2 = torch.randn(150, 2, generator=gen) * 3
    W_in, b_in = W.clone(), b.clone()
    out2, W2, b2 = fused_mgg_forward(x2, W, b, *learned(mgg))
    assert torch.equal(W, W_in) and torch.equal(b, b_in), "inputs must not be modified"
    ref_out2, ref_W2, ref_b2 = reference_f64(mgg, x2, ref_W, ref_b)
    assert_close(out2.double(), ref_out2, **F32)
    assert_close(W2.double(), ref_W2, **F32)
    assert_close(b2.double(), ref_b2, **F32)


def test_forward_matches_mgg_module_and_published_b_layout():
    mgg = random_mgg(16, 2, seed=3)
    x = torch.randn(40, 1, 2)
    with torch.no_grad():
        ref_out, state = mgg(x)
        ref_out2, ref_state2 = mgg(x * 2, state)
    out, W, b = fused_mgg_forward(x, None, None, *learned(mgg))
    out2, W2, b2 = fused_mgg_forward(x * 2, W, b.unsqueeze(2), *learned(mgg))  # b as [N, nh, 1, f]
    assert_close(out, ref_out, **F32)
    assert_close(out2, ref_out2, **F32)
    assert_close(W2, ref_state2.W1, **F32)
    assert_close(b2, ref_state2.b1, **F32)


@pytest.mark.parametrize("n", [0, 1])
def test_forward_empty_and_single(n):
    mgg = random_mgg(8, 1, seed=0)
    x = torch.randn(n, 2)
    out, W, b = fused_mgg_forward(x, None, None, *learned(mgg))
    assert out.shape == (n,) and W.shape == (n, 1, 8, 8) and b.shape == (n, 1, 8)
    ref_out, ref_W, _ = reference_f64(mgg, x)
    assert_close(out.double(), ref_out, **F32)
    assert_close(W.double(), ref_W, **F32)


def test_forward_eta_clamp_freezes_memory():
    """token_idx < -1 clamps the inner learning rate to 0: the memory must not move."""
    mgg = random_mgg(8, 1, seed=5)
    with torch.no_grad():
        mgg.learnable_token_idx.fill_(-1.5)
    x = torch.randn(20, 2) * 4
    _, W, b = fused_mgg_forward(x, None, None, *learned(mgg))
    assert torch.equal(W, mgg.W1.detach().expand(20, -1, -1, -1))
    assert torch.equal(b, mgg.b1.detach()[:, 0, :].expand(20, -1, -1))


def test_forward_is_deterministic():
    mgg = random_mgg(16, 2, seed=2)
    x = torch.randn(200, 2)
    first = fused_mgg_forward(x, None, None, *learned(mgg))
    second = fused_mgg_forward(x, None, None, *learned(mgg))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("hidden", "heads"), [(12, 1), (128, 2), (4, 1), (128, 8)])
def test_forward_rejects_unsupported_sizes(hidden, heads):
    mgg = MGG(hidden, heads)
    with pytest.raises(ValueError, match="head dim"):
        fused_mgg_forward(torch.zeros(4, 2), None, None, *learned(mgg))


def test_forward_rejects_float64_and_bad_shapes():
    mgg = MGG().double()
    with pytest.raises(TypeError, match="float32"):
        fused_mgg_forward(torch.zeros(4, 2, dtype=torch.float64), None, None, *learned(mgg))
    mgg = MGG()
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        fused_mgg_forward(torch.zeros(4, 3), None, None, *learned(mgg))
    with pytest.raises(ValueError, match="state shapes"):
        fused_mgg_forward(torch.zeros(4, 2), torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8), *learned(mgg))
    with pytest.raises(ValueError, match="both"):
        fused_mgg_forward(torch.zeros(4, 2), torch.zeros(4, 1, 8, 8), None, *learned(mgg))
