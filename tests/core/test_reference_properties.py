"""The vectorised reference against the naive per-coordinate MGG on random shapes and sizes."""

import torch
from helpers import F64, random_mgg
from hypothesis import given, settings
from hypothesis import strategies as st
from naive import naive_mgg, naive_optimizer_step
from torch.testing import assert_close

from mgg_fast import MGGOptimizer

sizes = st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 8)).map(lambda t: (t[0] * t[1], t[0]))


@settings(max_examples=25, deadline=None)
@given(size=sizes, n=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_forward_matches_naive(size, n, seed, scale):
    hidden, heads = size
    mgg = random_mgg(hidden, heads, seed, scale=0.3, dtype=torch.float64)
    sd = {k: v.detach() for k, v in mgg.state_dict().items()}
    x1, x2 = scale * torch.randn(2, n, 2, dtype=torch.float64)
    with torch.no_grad():
        out1, state = mgg(x1)
        out2, state2 = mgg(x2, state)
    W0, b0 = mgg.initial_state(n)
    ref1, W1, b1 = naive_mgg(x1, W0, b0, sd, heads)
    ref2, W2, b2 = naive_mgg(x2, W1, b1, sd, heads)
    assert_close(out1, ref1, **F64)
    assert_close(out2, ref2, **F64)
    assert_close(state2.W1, W2, **F64)
    assert_close(state2.b1, b2, **F64)


shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=15, deadline=None)
@given(shapes=shapes, size=sizes, seed=st.integers(0, 2**16))
def test_optimizer_matches_naive(shapes, size, seed):
    hidden, heads = size
    mgg = random_mgg(hidden, heads, seed, scale=0.3, dtype=torch.float64)
    sd = {k: v.detach() for k, v in mgg.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    ref_params = [p.clone() for p in params]
    n = sum(p.numel() for p in params)
    m, v = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    W, b = mgg.initial_state(n)
    opt = MGGOptimizer(params, mgg, lr=0.05, backend="reference")
    for step in range(1, 4):
        grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        ref_params, W, b = naive_optimizer_step(
            ref_params, grads, m, v, step, W, b, sd, heads, 0.05, 0.9, 0.99, 1e-8
        )
        for p, r in zip(params, ref_params, strict=True):
            assert_close(p, r, **F64)
    assert_close(torch.cat([opt.state[p]["memory_W"] for p in params]), W, **F64)


def test_memory_layer_vmaps_over_any_one_input():
    """The memory layer's in-place steps never write a batched operand into an unbatched
    intermediate: ``torch.func.vmap`` over x, W, b or any one learned tensor equals a loop,
    with no slow per-sample fallback (its warning is an error here)."""
    import warnings

    from torch.func import vmap

    from mgg_fast.core.reference import MGGWeights, memory_layer

    mgg = random_mgg(8, 2, seed=5, scale=0.3, dtype=torch.float64)
    w = mgg.weights()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    W, b = (t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in mgg.initial_state(6))
    inputs = [x, W, b, *w]

    def layer(i, value):
        args = [*inputs[:i], value, *inputs[i + 1 :]]
        return memory_layer(args[0], args[1], args[2], MGGWeights(*args[3:]))

    for i, t in enumerate(inputs):
        batch = t.detach() + 0.05 * torch.randn((3, *t.shape), generator=gen, dtype=t.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = vmap(lambda v, i=i: layer(i, v))(batch)
        for j in range(3):
            for g, want in zip(got, layer(i, batch[j]), strict=True):
                assert_close(g[j], want, **F64)
