"""Pure-PyTorch reference of the MGG math: the single source of truth.

Everything here is differentiable and vectorised over coordinates. The fused Triton kernels in
``mgg_fast.kernels`` are tested against these functions, and these functions are tested against
the parity vectors made with the published MGTTA code (``tests/data/parity``).

Notation (see ``tests/data/parity/README.md``): ``N`` coordinates, hidden size ``H``, ``nh``
heads of dimension ``f = H / nh``. Per coordinate the memory is ``W [nh, f, f]``, ``b [nh, f]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-6  # eps of the inner (TTT) layer norm and of the post-norm, as published
TTT_BASE_LR = 1.0


class MGGWeights(NamedTuple):
    """The learned parameters an MGG step reads (shapes as published, minus W1/b1)."""

    q_proj: Tensor  # [H, 2]
    k_proj: Tensor  # [H, 2]
    v_proj: Tensor  # [H, 2]
    o_proj: Tensor  # [1, H]
    post_norm_weight: Tensor  # [H]
    post_norm_bias: Tensor  # [H]
    ttt_norm_weight: Tensor  # [nh, f]
    ttt_norm_bias: Tensor  # [nh, f]
    ttt_lr_weight: Tensor  # [nh, 1, 2]
    ttt_lr_bias: Tensor  # [nh, 1]
    token_idx: Tensor  # [1]


def _normalize_(z: Tensor) -> tuple[Tensor, Tensor]:
    """Layer-norm statistics over the last dim: (z_hat, std), biased variance, eps LN_EPS.
    Centres ``z`` in place: pass an intermediate no other operation has read."""
    centered = z.sub_(z.mean(dim=-1, keepdim=True))
    std = (centered * centered).mean(dim=-1, keepdim=True).add_(LN_EPS).sqrt_()
    return centered / std, std


def inner_lr(x: Tensor, w: MGGWeights) -> Tensor:
    """Per-coordinate, per-head inner learning rate eta ``[N, nh]`` (with the published clamp)."""
    f = w.ttt_norm_weight.shape[-1]
    gate = torch.sigmoid(x @ w.ttt_lr_weight[:, 0, :].T + w.ttt_lr_bias[:, 0])
    token_eta = torch.clamp_min(1.0 + w.token_idx[0], 0.0)
    return token_eta * (TTT_BASE_LR * gate / f)


def memory_layer(
    x: Tensor, W: Tensor, b: Tensor, w: MGGWeights, *, inplace: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """One gradient-memory-layer step for every coordinate.

    Args:
        x: features ``[N, 2]`` (m̃, g̃).
        W: memory ``[N, nh, f, f]`` (or a broadcastable expand of the learned W1).
        b: memory ``[N, nh, f]``.
        inplace: write the new memory into ``W`` and ``b`` (saves a copy; not differentiable).
    Returns:
        ``(out [N], W' [N, nh, f, f], b' [N, nh, f])`` where ``out`` is already tanh'ed.
    """
    n = x.shape[0]
    nh, f = w.ttt_norm_weight.shape
    qkv = x @ torch.cat((w.q_proj, w.k_proj, w.v_proj)).T
    q, k, v = qkv.view(n, 3, nh, f).unbind(1)
    eta = inner_lr(x, w).unsqueeze(-1)  # [N, nh, 1]
    gamma, beta = w.ttt_norm_weight, w.ttt_norm_bias

    # The in-place operations below act on intermediates made just before, which no operation
    # has saved for its backward (so they stay differentiable), and only where the intermediate
    # depends on everything the other operand does (so torch.func.vmap over any input works):
    # fewer new [N, nh, f] tensors, each of which can cost a CPU more in page faults than the
    # arithmetic on it.

    # Inner reconstruction loss 0.5*||LN(kW + b) - (v - k)||^2 and its gradient wrt Z (LN fused).
    z = torch.matmul(k.unsqueeze(-2), W).squeeze(-2) + b
    z_hat, std = _normalize_(z)
    e = (torch.addcmul(beta, gamma, z_hat) - (v - k)).mul_(gamma)
    e_sum, e_dot = e.sum(-1, keepdim=True), (e * z_hat).sum(-1, keepdim=True)
    grad_z = (e * f).sub_(e_sum).sub_(z_hat * e_dot).div_(std * f)

    # Dual-form output q W' + b' = q W - eta (q.k) G + b', then the rank-1 memory update.
    qW = torch.matmul(q.unsqueeze(-2), W).squeeze(-2)
    eta_grad = eta * grad_z
    if inplace:
        W_new = W.addcmul_(k.unsqueeze(-1), eta_grad.unsqueeze(-2), value=-1.0)
        b_new = b.sub_(eta_grad)
    else:
        W_new = torch.addcmul(W, k.unsqueeze(-1), eta_grad.unsqueeze(-2), value=-1.0)
        b_new = b - eta_grad
    z_bar = torch.addcmul(qW, (q * k).sum(-1, keepdim=True), eta_grad, value=-1.0).add_(b_new)
    z_bar_hat, _ = _normalize_(z_bar)
    heads = torch.addcmul(beta, gamma, z_bar_hat).add_(q)

    u = F.layer_norm(heads.reshape(n, nh * f), (nh * f,), w.post_norm_weight, w.post_norm_bias, LN_EPS)
    out = torch.tanh(u @ w.o_proj[0])
    return out, W_new, b_new


def bias_corrections(
    step: float | Tensor, beta1: float, beta2: float
) -> tuple[float | Tensor, float | Tensor]:
    """Published bias corrections of step ``step`` (1-based): the exponent is ``step + 1``.

    ``step`` is a number or a tensor of step counts (computed in float64 either way)."""
    if isinstance(step, Tensor):
        e = step.double() + 1.0
        return 1.0 - torch.pow(beta1, e), 1.0 - torch.pow(beta2, e)
    return 1.0 - beta1 ** (step + 1), 1.0 - beta2 ** (step + 1)


def moment_features_(
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    bc1: Tensor | float,
    bc2: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
) -> Tensor:
    """Update the moments ``m``, ``v`` in place and return the MGG input ``[N, 2]`` = [m̃, g̃].

    ``bc1``/``bc2`` are the bias corrections (scalars, or per-coordinate tensors).
    """
    m.mul_(beta1).add_((1 - beta1) * grad)
    v.mul_(beta2).add_((1 - beta2) * grad * grad)
    return _features(grad, m, v, bc1, bc2, eps)


def _features(
    grad: Tensor, m: Tensor, v: Tensor, bc1: Tensor | float, bc2: Tensor | float, eps: float
) -> Tensor:
    denom = torch.sqrt(v / bc2) + eps
    return torch.stack(((m / bc1) / denom, grad / denom), dim=-1)


class StepResult(NamedTuple):
    """What one optimizer step computes: the MGG output and the new state."""

    update: Tensor  # [N], in (-1, 1): the parameters move by -lr * update
    exp_avg: Tensor  # [N]
    exp_avg_sq: Tensor  # [N]
    memory_W: Tensor  # [N, nh, f, f], in the dtype it was given in
    memory_b: Tensor  # [N, nh, f]


def optimizer_step(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    memory_W: Tensor,
    memory_b: Tensor,
    step: float | Tensor,
    weights: MGGWeights,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    inplace: bool = False,
) -> StepResult:
    """One MGG optimizer step over ``N`` flat coordinates: moments, the published bias correction,
    the features ``[m̃, g̃]`` and one memory step. The single definition of the step; the optimizer's
    reference backend, the meta-trainer and the kernel tests all use it.

    Args:
        grad: gradient ``[N]`` (cast to the state dtype, the dtype of ``exp_avg``).
        exp_avg, exp_avg_sq: the Adam-like moments ``[N]``.
        memory_W, memory_b: the per-coordinate memory ``[N, nh, f, f]`` / ``[N, nh, f]``;
            ``memory_W`` may be stored narrower (bfloat16): it is computed in the state dtype and
            the new one is rounded to nearest-even.
        step: this step's count, 1 on the first step (a number, or a tensor broadcastable to ``[N]``).
        inplace: write the new state into the given tensors (the optimizer); otherwise nothing is
            modified and the result is differentiable (meta-training).
    """
    dtype = exp_avg.dtype
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    if isinstance(bc1, Tensor):
        bc1, bc2 = bc1.to(dtype), bc2.to(dtype)
    g = grad.to(dtype)
    W = memory_W.to(dtype)
    if inplace:
        x = moment_features_(g, exp_avg, exp_avg_sq, bc1, bc2, beta1, beta2, eps)
        m, v = exp_avg, exp_avg_sq
    else:
        m = exp_avg * beta1 + (1 - beta1) * g
        v = exp_avg_sq * beta2 + (1 - beta2) * g * g
        x = _features(g, m, v, bc1, bc2, eps)
    out, W_new, b_new = memory_layer(x, W, memory_b, weights, inplace=inplace)
    if W_new.dtype != memory_W.dtype:
        W_new = memory_W.copy_(W_new) if inplace else W_new.to(memory_W.dtype)  # round to nearest-even
    return StepResult(out, m, v, W_new, b_new)


def apply_update(params: list[Tensor], update: Tensor, lr: float) -> None:
    """``p -= lr * update`` in place for the parameters whose coordinates ``update`` concatenates,
    computed in the wider of the parameter's and the update's dtype and rounded once to the
    parameter's (a float64 parameter keeps its precision; a bfloat16 one is rounded once)."""
    chunks = update.split([p.numel() for p in params])
    torch._foreach_add_(params, [c.view(p.shape) for c, p in zip(chunks, params, strict=True)], alpha=-lr)
