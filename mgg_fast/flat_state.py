"""Flat per-group optimizer state: one buffer per quantity, parameters as consecutive chunks.

The MGG step treats a parameter group as one long vector of coordinates (the published code
concatenates the norm parameters in order). Keeping moments and memory in flat buffers lets one
vectorised call (reference) or one kernel launch (fused) serve the whole list; ``state[p]``
exposes views of the chunk that belongs to ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "memory_W", "memory_b")


@dataclass
class FlatState:
    """Flat state of one parameter group, on the parameters' device: the state dtype throughout,
    except ``memory_W``, which may be stored narrower (bfloat16; computed in the state dtype)."""

    params: list[Tensor]
    numels: list[int]
    exp_avg: Tensor  # [N]
    exp_avg_sq: Tensor  # [N]
    memory_W: Tensor  # [N, nh, f, f]
    memory_b: Tensor  # [N, nh, f]
    steps: Tensor  # [P] float32: steps taken by each parameter
    cache: dict = field(default_factory=dict)  # backend-specific, derived data (e.g. pointer tables)

    @property
    def num_coords(self) -> int:
        return self.exp_avg.shape[0]

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return out

    @classmethod
    def zeros(
        cls,
        params: list[Tensor],
        W1: Tensor,
        b1: Tensor,
        dtype: torch.dtype,
        memory_W_dtype: torch.dtype | None = None,
    ) -> FlatState:
        """Fresh state: zero moments, memory tiled from the learned ``W1 [nh,f,f]``/``b1 [nh,f]``
        (``memory_W`` in ``memory_W_dtype``, default ``dtype``)."""
        device = params[0].device
        numels = [p.numel() for p in params]
        n = sum(numels)
        W = W1.detach().to(device=device, dtype=dtype).to(memory_W_dtype or dtype)
        W = W.unsqueeze(0).expand(n, -1, -1, -1).contiguous()
        b = b1.detach().to(device=device, dtype=dtype).unsqueeze(0).expand(n, -1, -1).contiguous()
        zeros = torch.zeros(n, device=device, dtype=dtype)
        steps = torch.zeros(len(params), device=device, dtype=torch.float32)
        return cls(list(params), numels, zeros, zeros.clone(), W, b, steps)

    def views(self, i: int) -> dict[str, Tensor]:
        """``state[p]`` entries of parameter ``i``: views into the flat buffers."""
        start = self.offsets[i]
        end = start + self.numels[i]
        shape = self.params[i].shape
        return {
            "step": self.steps[i],
            "exp_avg": self.exp_avg[start:end].view(shape),
            "exp_avg_sq": self.exp_avg_sq[start:end].view(shape),
            "memory_W": self.memory_W[start:end],
            "memory_b": self.memory_b[start:end],
        }
