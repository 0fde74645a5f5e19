"""One parameter group's optimizer state packed into flat buffers, with ``state[p]`` as views.

The MGG step treats a group as one long vector of coordinates (the published code concatenates
the norm parameters in order), so one vectorised call (reference) or one launch (fused) serves
the whole group when the state sits in flat buffers. ``state[p]`` stays the truth: the optimizer
checks before every step that each ``state[p]`` still holds the views made here (the same
tensor objects) and packs again from whatever ``state[p]`` holds when it does not (a replaced
entry, a cleared or reassigned state, a state dict loaded by a wrapper).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "memory_W", "memory_b")
_shape = operator.attrgetter("shape")


def state_shapes(p: Tensor, num_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """The shape of each ``state[p]`` entry of parameter ``p``."""
    n = p.numel()
    return {
        "step": (),
        "exp_avg": tuple(p.shape),
        "exp_avg_sq": tuple(p.shape),
        "memory_W": (n, num_heads, head_dim, head_dim),
        "memory_b": (n, num_heads, head_dim),
    }


def check_entry(
    where: str, p: Tensor, entry: Mapping, num_heads: int, head_dim: int, memory_W_dtype: torch.dtype
) -> None:
    """Raise a clear error unless ``entry`` is a valid ``state[p]`` for parameter ``p``: every key
    present, real floating-point tensors (``step`` may be any real number) of the right shapes, no
    NaN (``step`` a finite, non-negative whole number). ``where`` names the entry in messages."""
    shapes = state_shapes(p, num_heads, head_dim)
    for key, shape in shapes.items():
        if key not in entry:
            raise ValueError(f"{where} lacks {key!r} (has {sorted(map(str, entry))})")
        value = entry[key]
        if key == "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}[{key!r}] must be a tensor, got {type(value).__name__}")
        if (
            value.is_complex()
            or value.dtype == torch.bool
            or (key != "step" and not value.is_floating_point())
        ):
            raise TypeError(f"{where}[{key!r}] must be a real floating-point tensor, got {value.dtype}")
        if key == "memory_W" and value.dtype not in (memory_W_dtype, torch.float32, torch.float64):
            raise TypeError(
                f"{where}[{key!r}] is {value.dtype}; this optimizer stores it as {memory_W_dtype}"
            )
        if tuple(value.shape) != shape and not (key == "step" and value.numel() == 1):
            raise ValueError(
                f"{where}[{key!r}] has shape {list(value.shape)}, expected {list(shape)} for a parameter "
                f"of shape {list(p.shape)}"
            )
        # NaN is rejected; +-Inf is not: a step on a huge finite gradient overflows exp_avg_sq
        if value.numel() and bool(torch.isnan(value).any()):
            raise ValueError(f"{where}[{key!r}] holds NaN values")
        if key == "step" and not (
            math.isfinite(float(value)) and float(value) >= 0 and float(value).is_integer()
        ):
            raise ValueError(f"{where}['step'] must be a non-negative whole number, got {float(value)}")


@dataclass(eq=False)
class PackedState:
    """Flat state of the packed parameters of one group (those that have state), in group order.

    Moments and ``memory_b`` in the state dtype, ``memory_W`` in its storage dtype, one float32
    step count per parameter. ``views[i]`` are the tensors installed in ``state[params[i]]``.
    """

    params: list[Tensor]
    numels: list[int]
    offsets: list[int]
    exp_avg: Tensor  # [N]
    exp_avg_sq: Tensor  # [N]
    memory_W: Tensor  # [N, nh, f, f]
    memory_b: Tensor  # [N, nh, f]
    steps: Tensor  # [P] float32
    views: list[dict[str, Tensor]]
    layouts: dict[int, Tensor] = field(default_factory=dict)  # fused chunk table per BLOCK (shapes only)
    shapes: list[torch.Size] = field(init=False)  # of the parameters when packed
    by_key: dict[str, list[Tensor]] = field(init=False)  # views[i][key] for each key, in order

    def __post_init__(self) -> None:
        self.shapes = [p.shape for p in self.params]
        self.by_key = {key: [view[key] for view in self.views] for key in STATE_KEYS}

    @property
    def num_coords(self) -> int:
        return self.exp_avg.shape[0]

    @classmethod
    def pack(
        cls,
        params: Sequence[Tensor],
        entries: Sequence[Mapping | None],
        W1: Tensor,
        b1: Tensor,
        dtype: torch.dtype,
        memory_W_dtype: torch.dtype,
    ) -> PackedState:
        """Buffers for ``params``: each parameter's state copied from ``entries[i]`` (validated by
        :func:`check_entry`), or fresh where it is ``None`` (zero moments and step, the memory
        tiled from the learned ``W1 [nh, f, f]`` / ``b1 [nh, f]``)."""
        device = params[0].device
        numels = [p.numel() for p in params]
        offsets = [0]
        for n in numels[:-1]:
            offsets.append(offsets[-1] + n)
        n = sum(numels)
        m = torch.zeros(n, device=device, dtype=dtype)
        v = torch.zeros(n, device=device, dtype=dtype)
        # repeat(), not expand().contiguous(): for n == 1 the latter is a view of the MGG's own W1
        W = W1.detach().to(device=device, dtype=dtype).to(memory_W_dtype).repeat(n, 1, 1, 1)
        b = b1.detach().to(device=device, dtype=dtype).repeat(n, 1, 1)
        steps = torch.zeros(len(params), device=device, dtype=torch.float32)
        views = []
        for i, (p, start, count) in enumerate(zip(params, offsets, numels, strict=True)):
            view = {
                "step": steps[i],
                "exp_avg": m[start : start + count].view(p.shape),
                "exp_avg_sq": v[start : start + count].view(p.shape),
                "memory_W": W[start : start + count],
                "memory_b": b[start : start + count],
            }
            entry = entries[i]
            if entry is not None:
                for key in STATE_KEYS:
                    view[key].copy_(torch.as_tensor(entry[key]).reshape(view[key].shape))
            views.append(view)
        return cls(list(params), numels, offsets, m, v, W, b, steps, views)

    def holds_all(self, params: list[Tensor], states: list[Mapping | None]) -> bool:
        """Whether ``params`` are exactly the packed parameters (all of them), unchanged in shape,
        each ``states[i]`` holding this pack's views: the check of a common step, in C-level passes."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        if list(map(_shape, params)) != self.shapes:
            return False
        try:
            return all(
                all(map(operator.is_, map(operator.itemgetter(key), states), views))
                for key, views in self.by_key.items()
            )
        except (KeyError, TypeError):  # a state without that key, or no state at all
            return False

    def holds(self, members: Sequence[Tensor], states: Sequence[Mapping | None], dtype: torch.dtype) -> bool:
        """Whether ``members`` are exactly the packed parameters, in order, each ``state[p]``
        (``states[i]``) holding this pack's views, with sizes, state dtype and device unchanged."""
        packed, views, numels = self.params, self.views, self.numels
        if len(members) != len(packed) or self.exp_avg.dtype != dtype:
            return False
        device = self.exp_avg.device
        for j, (p, st) in enumerate(zip(members, states, strict=True)):
            view = views[j]
            if not (
                st
                and packed[j] is p
                and p.numel() == numels[j]
                and p.device == device
                and st.get("exp_avg") is view["exp_avg"]
                and st.get("exp_avg_sq") is view["exp_avg_sq"]
                and st.get("memory_W") is view["memory_W"]
                and st.get("memory_b") is view["memory_b"]
                and st.get("step") is view["step"]
            ):
                return False
        return True
