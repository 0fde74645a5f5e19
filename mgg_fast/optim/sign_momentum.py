"""Sign momentum (signSGD with momentum, "Signum"): the hand-made rule a saturated MGG approximates.

Per coordinate ``m ← β m + (1 − β) g`` and ``p ← p − lr · sign(m)``: every coordinate moves by
exactly ``lr`` (or not at all where ``m`` is 0). The MGG's output is a ``tanh``, so an MGG whose
output saturates steps like this; comparing with it separates what the learned memory adds
from a normalised step of fixed size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class SignMomentum(torch.optim.Optimizer):
    """``p ← p − lr · sign(m)`` with ``m ← β m + (1 − β) g`` (``state[p]["momentum_buffer"]``,
    zero before the first step). Sparse gradients are not supported."""

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3, beta: float = 0.9
    ):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"invalid learning rate {lr!r}: it must be a finite number >= 0")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"invalid beta {beta!r}: it must be in [0, 1)")
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("SignMomentum does not support sparse gradients")
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            grads = [p.grad for p in params]
            torch._foreach_lerp_(buffers, grads, 1.0 - group["beta"])
            torch._foreach_add_(params, torch._foreach_sign(buffers), alpha=-group["lr"])
        return loss
