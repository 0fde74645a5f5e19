"""SAR and EATA on a tiny BatchNorm + LayerNorm model: their steps against a by-hand statement of
the published rules, the filters, SAR's model recovery, EATA's Fisher, resets."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mgg_fast.tta.eata import EATA, eata_fisher
from mgg_fast.tta.losses import entropy_margin, softmax_entropy
from mgg_fast.tta.norm_params import select_norm_params
from mgg_fast.tta.sar import SAR


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.LayerNorm(6),
        nn.Linear(6, 4),
    ).double()
    with torch.no_grad():  # confident enough that the entropy filters keep some samples, not all
        model[6].weight.mul_(6.0)
    return model


def _batch(seed=1, n=8):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _norm_params(adapter):
    return [p.detach().clone() for _, p in select_norm_params(adapter.model)]


def _entropy_at(model, names, params, x):
    """Per-sample entropy of ``model`` at the given norm params (BatchNorm on batch statistics)."""
    return softmax_entropy(functional_call(model, dict(zip(names, params, strict=True)), (x,)))


def test_sar_step_is_sam_on_the_reliable_entropy():
    model = _tiny()
    reference = copy.deepcopy(model)
    sar = SAR(model, lr=0.5, rho=0.05, margin_coeff=0.4, reset_constant=0.0)  # no recovery here
    names = list(sar.param_names)
    p0 = _norm_params(sar)
    x = _batch()
    # by hand, from the published rule: filter, ascend by rho along the normalised gradient, re-filter,
    # gradient there, SGD (first step: momentum buffer = gradient) from the unperturbed params
    reference.train()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    margin = entropy_margin(4, 0.4)
    leaf = [p.clone().requires_grad_(True) for p in p0]
    ent = _entropy_at(reference, names, leaf, x)
    reliable = ent.detach() < margin
    assert 0 < int(reliable.sum()) < len(x)  # the filter does something on this batch
    g1 = torch.autograd.grad(ent[reliable].mean(), leaf)
    norm = torch.sqrt(sum((g**2).sum() for g in g1))
    perturbed = [(p + 0.05 * g / norm).requires_grad_(True) for p, g in zip(p0, g1, strict=True)]
    ent2 = _entropy_at(reference, names, perturbed, x)[reliable]
    keep = ent2.detach() < margin
    g2 = torch.autograd.grad(ent2[keep].mean(), perturbed)
    expected = [p - 0.5 * g for p, g in zip(p0, g2, strict=True)]

    logits = sar.forward_backward(x)
    sar.step()
    torch.testing.assert_close(logits, functional_call(reference, dict(zip(names, p0, strict=True)), (x,)))
    for got, want in zip(_norm_params(sar), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert sar.ema == pytest.approx(float(ent2[keep].mean().detach()))


def test_sar_recovers_and_filters():
    model = _tiny()
    sar = SAR(model, lr=0.5, reset_constant=100.0)  # any entropy average is "collapsed": recover
    p0 = _norm_params(sar)
    sar(_batch())
    assert sar.recoveries == 1 and sar.ema is None and sar.num_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(_norm_params(sar), p0, strict=True))

    strict = SAR(_tiny(), lr=0.5, margin_coeff=0.0)  # margin 0: no reliable sample, nothing moves
    q0 = _norm_params(strict)
    strict(_batch())
    assert all(torch.equal(a, b) for a, b in zip(_norm_params(strict), q0, strict=True))
    assert strict.ema is None and strict.num_updates == 1
    with pytest.raises(RuntimeError, match="needs a forward_backward"):
        strict.step()


def test_eata_fisher_is_the_mean_squared_gradient_of_self_labelled_ce():
    model = _tiny().eval()
    batches = [_batch(s) for s in (2, 3)]
    fisher = eata_fisher(model, batches)
    assert not model.training and model[1].running_mean is not None  # left as it was
    adapted = copy.deepcopy(model).train()
    for m in adapted.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    params = [p for _, p in select_norm_params(adapted)]
    expected = [torch.zeros_like(p) for p in params]
    for x in batches:
        logits = adapted(x)
        for e, g in zip(
            expected, torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params), strict=True
        ):
            e += g**2 / len(batches)
    for got, want in zip(fisher, expected, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="no batches"):
        eata_fisher(model, [])


def test_eata_step_weighted_entropy_redundancy_and_fisher():
    model = _tiny()
    fisher = [torch.full_like(p, 0.3) for _, p in select_norm_params(model)]
    eata = EATA(model, lr=0.2, fisher=fisher, fisher_alpha=5.0, margin_coeff=0.4, d_margin=0.5)
    names = list(eata.param_names)
    reference = copy.deepcopy(eata.model)
    p0 = _norm_params(eata)
    x = _batch()
    eata(x)  # first batch: no moving average yet, only the entropy filter; Fisher term is 0 at p0
    margin = entropy_margin(4, 0.4)
    leaf = [p.clone().requires_grad_(True) for p in p0]
    logits = functional_call(reference, dict(zip(names, leaf, strict=True)), (x,))
    ent = softmax_entropy(logits)
    keep = ent.detach() < margin
    loss = (ent[keep] * torch.exp(margin - ent[keep].detach())).mean()
    grads = torch.autograd.grad(loss, leaf)
    p1 = [p - 0.2 * g for p, g in zip(p0, grads, strict=True)]
    for got, want in zip(_norm_params(eata), p1, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    probs = logits.detach().softmax(1)[keep].mean(0)
    torch.testing.assert_close(eata.model_probs, probs)
    assert eata.kept_samples == int(keep.sum())

    # second batch: the moving average filters redundant samples; the Fisher term pulls to p0
    x2 = _batch(5)
    leaf = [p.clone().requires_grad_(True) for p in p1]
    logits2 = functional_call(reference, dict(zip(names, leaf, strict=True)), (x2,))
    ent2 = softmax_entropy(logits2)
    cos = F.cosine_similarity(probs.unsqueeze(0), logits2.detach().softmax(1), dim=1)
    keep2 = (ent2.detach() < margin) & (cos.abs() < 0.5)
    loss2 = (ent2 * torch.exp(margin - ent2.detach()) * keep2).sum() / keep2.sum().clamp_min(1)
    loss2 = loss2 + 5.0 * sum((f * (p - q) ** 2).sum() for f, p, q in zip(fisher, leaf, p0, strict=True))
    eata(x2)
    if keep2.any():
        # SGD momentum 0.9, second step: buffer = 0.9 * g1 + g2
        g2 = torch.autograd.grad(loss2, leaf)
        p2 = [p - 0.2 * (0.9 * a + b) for p, a, b in zip(p1, grads, g2, strict=True)]
    else:
        p2 = p1
    for got, want in zip(_norm_params(eata), p2, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    eata.reset()
    assert eata.model_probs is None
    assert all(torch.equal(a, b) for a, b in zip(_norm_params(eata), p0, strict=True))


def test_eata_skips_updates_when_every_sample_is_filtered_and_checks_the_fisher():
    eata = EATA(_tiny(), lr=0.2, d_margin=1e-9)  # after one batch, every sample is "redundant"
    x = _batch()
    eata(x)
    p1 = _norm_params(eata)
    eata(x)
    assert all(torch.equal(a, b) for a, b in zip(_norm_params(eata), p1, strict=True))
    assert eata.num_updates == 2
    with pytest.raises(ValueError, match="do not match the model's norm params"):
        EATA(_tiny(), fisher=[torch.ones(3)])
    assert entropy_margin(1000) == pytest.approx(0.4 * math.log(1000))
