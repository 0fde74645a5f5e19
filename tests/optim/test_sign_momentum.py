"""Sign momentum (the rule a saturated MGG approximates) matches its definition."""

import pytest
import torch

from mgg_fast.optim.sign_momentum import SignMomentum


def test_sign_momentum_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(5, generator=g, requires_grad=True),
        torch.randn(2, 3, generator=g, requires_grad=True),
    ]
    expected = [p.detach().clone() for p in params]
    momentum = [torch.zeros_like(p) for p in params]
    opt = SignMomentum(params, lr=0.01, beta=0.8)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad, m, e in zip(params, grads, momentum, expected, strict=True):
            p.grad = grad
            m.mul_(0.8).add_(0.2 * grad)
            e.sub_(0.01 * torch.sign(m))
        opt.step()
    for p, e, m in zip(params, expected, momentum, strict=True):
        torch.testing.assert_close(p.detach(), e)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m)
    # every coordinate moved by exactly lr per step (or not at all)
    assert set(torch.round((params[0].detach() - expected[0]) / 0.01).tolist()) == {0.0}


def test_sign_momentum_skips_parameters_without_gradients_and_checks_its_arguments():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    a.grad = torch.tensor([1.0, -2.0, 0.0])
    SignMomentum([a, b], lr=0.5).step()
    assert a.detach().tolist() == [0.5, 1.5, 1.0] and b.detach().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="learning rate"):
        SignMomentum([a], lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        SignMomentum([a], beta=1.0)
