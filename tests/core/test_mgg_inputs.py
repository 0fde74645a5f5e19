"""The MGG's own inputs: its sizes (checked before anything is allocated) and the memory state a
call carries. Each bad input is an error that names it."""

import pytest
import torch

from mgg_fast import MGG


@pytest.mark.parametrize(
    ("args", "error", "fragment"),
    [
        ((True,), TypeError, "hidden_size must be an int, got bool"),
        ((8, True), TypeError, "num_heads must be an int, got bool"),
        ((8.0,), TypeError, "hidden_size must be an int, got float"),
        ((2**40,), ValueError, "hidden_size must be <= 1024, got 1099511627776"),
        ((0,), ValueError, "hidden_size must be an int >= 1, got 0"),
        ((8, 0), ValueError, "num_heads must be an int >= 1, got 0"),
    ],
)
def test_bad_sizes_are_refused_before_allocating(monkeypatch, args, error, fragment):
    def no_allocation(*a, **k):
        raise AssertionError("an MGG with bad sizes reached the allocator")

    monkeypatch.setattr(torch, "empty", no_allocation)
    monkeypatch.setattr(torch, "zeros", no_allocation)
    monkeypatch.setattr(torch, "ones", no_allocation)
    with pytest.raises(error, match=fragment):
        MGG(*args)


def test_integral_sizes_of_other_types_are_accepted():
    np = pytest.importorskip("numpy")
    mgg = MGG(np.int64(16), np.int32(2))
    assert mgg.config == {"hidden_size": 16, "num_heads": 2}
    assert type(mgg.hidden_size) is int and type(mgg.num_heads) is int


@pytest.mark.parametrize(
    ("state", "held"),
    [
        ((torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8), torch.zeros(3)), r"a 3-element tuple"),
        (torch.zeros(3, 1, 8, 8), r"a Tensor"),
        ((None, None), r"a 2-element tuple of \['NoneType', 'NoneType'\]"),
        ({"W1": torch.zeros(3, 1, 8, 8)}, r"a dict"),
    ],
)
def test_a_state_that_is_not_a_pair_of_tensors_is_named(state, held):
    mgg = MGG()
    features = torch.randn(3, 2)
    before = {k: v.clone() for k, v in mgg.state_dict().items()}
    with pytest.raises(TypeError, match=rf"state must be the \(W, b\) pair of tensors .*got {held}"):
        mgg(features, state)
    assert all(torch.equal(v, before[k]) for k, v in mgg.state_dict().items())
    _, carried = mgg(features)
    mgg(features, carried)  # the state a call returns is accepted
    mgg(features, list(carried))
