"""One parameter group's optimizer state packed into flat buffers, with ``state[p]`` as views.

The MGG step treats a group as one long vector of coordinates (the published code concatenates
the norm parameters in order), so one vectorised call (reference) or one launch (fused) serves
the whole group when the state sits in flat buffers. ``state[p]`` stays the truth: the optimizer
checks before every step that each ``state[p]`` still holds the views made here (the same
tensor objects) and packs again from whatever ``state[p]`` holds when it does not (a replaced
entry, a cleared or reassigned state, a state dict loaded by a wrapper).

DTensor parameters (FSDP2's ``fully_shard``, tensor-parallel shards) are packed by their local
shards, and their ``state[p]`` entries are DTensors with the parameter's mesh and placements
(``step`` stays a plain tensor, as in torch's Adam: it is the same on every rank). Their memory
is laid out ``[*p.shape, nh, f, f]`` / ``[*p.shape, nh, f]`` so that it shards exactly as the
parameter does (a ``[numel, ...]`` layout chunks elements, not rows, and would not match the
parameter's uneven ``Shard(d)`` chunks); plain parameters keep ``[numel, ...]`` and accept
either layout on load.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch
from torch import Tensor

from mgg_fast.optim.dtensor import DTensor, is_dtensor, local_tensor

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "memory_W", "memory_b")
SHARDED_KEYS = STATE_KEYS[1:]  # DTensors like the parameter, for a DTensor parameter
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_PLAIN_TENSOR = {Tensor}


def state_shapes(p: Tensor, num_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """The (global) shape of each ``state[p]`` entry of parameter ``p``: the memory is
    ``[numel, ...]`` for a plain parameter, ``[*p.shape, ...]`` for a DTensor one."""
    lead = tuple(p.shape) if is_dtensor(p) else (p.numel(),)
    return {
        "step": (),
        "exp_avg": tuple(p.shape),
        "exp_avg_sq": tuple(p.shape),
        "memory_W": (*lead, num_heads, head_dim, head_dim),
        "memory_b": (*lead, num_heads, head_dim),
    }


def _accepted_shapes(p: Tensor, key: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Shapes accepted on load: the memory of a plain parameter also in the DTensor layout (a full
    state dict gathered from an FSDP run)."""
    if key in ("memory_W", "memory_b") and not is_dtensor(p):
        return shape, (*p.shape, *shape[1:])
    return (shape,)


def _check_placement(where: str, p: Tensor, key: str, value: Tensor) -> Tensor:
    """The local tensor of ``value`` after checking it is laid out like ``p``: a DTensor with
    ``p``'s mesh and placements for a DTensor parameter (``step`` a plain tensor or a replicated
    DTensor), a plain tensor for a plain one."""
    if not is_dtensor(p):
        if is_dtensor(value):
            raise TypeError(f"{where}[{key!r}] is a DTensor but the parameter is a plain tensor")
        return value
    if key == "step":
        if is_dtensor(value) and not all(pl.is_replicate() for pl in value.placements):
            raise ValueError(f"{where}['step'] must be a plain or replicated tensor, got {value.placements}")
        return local_tensor(value)
    if not is_dtensor(value):
        raise TypeError(
            f"{where}[{key!r}] is a plain tensor but the parameter is a DTensor: load sharded state "
            "through torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
        )
    if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
        raise ValueError(
            f"{where}[{key!r}] is laid out as {value.device_mesh}, {tuple(value.placements)}; "
            f"the parameter as {p.device_mesh}, {tuple(p.placements)}"
        )
    return local_tensor(value)


def check_entry(
    where: str, p: Tensor, entry: Mapping, num_heads: int, head_dim: int, memory_W_dtype: torch.dtype
) -> None:
    """Raise a clear error unless ``entry`` is a valid ``state[p]`` for parameter ``p``: every key
    present, real floating-point tensors (``step`` may be any real number) of the right shapes, no
    NaN (``step`` a finite, non-negative whole number), laid out like ``p`` (DTensors with its mesh
    and placements for a DTensor parameter; the values of this rank's shard are checked).
    ``where`` names the entry in messages."""
    shapes = state_shapes(p, num_heads, head_dim)
    for key, shape in shapes.items():
        if key not in entry:
            raise ValueError(f"{where} lacks {key!r} (has {sorted(map(str, entry))})")
        value = entry[key]
        if key == "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}[{key!r}] must be a tensor, got {type(value).__name__}")
        global_shape = tuple(value.shape)
        value = _check_placement(where, p, key, value)
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
        if global_shape not in _accepted_shapes(p, key, shape) and not (key == "step" and value.numel() == 1):
            raise ValueError(
                f"{where}[{key!r}] has shape {list(global_shape)}, expected {list(shape)} for a parameter "
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
    For a DTensor parameter the buffers hold its local shard (``numels`` are local sizes) and
    its views are DTensors over them.
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
        locals_ = list(map(local_tensor, params))
        device = locals_[0].device
        numels = [p.numel() for p in locals_]
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
        for i, (p, loc, start, count) in enumerate(zip(params, locals_, offsets, numels, strict=True)):
            sharded = is_dtensor(p)
            lead = loc.shape if sharded else (count,)
            view = {
                "step": steps[i],
                "exp_avg": m[start : start + count].view(loc.shape),
                "exp_avg_sq": v[start : start + count].view(loc.shape),
                "memory_W": W[start : start + count].view(*lead, *W.shape[1:]),
                "memory_b": b[start : start + count].view(*lead, *b.shape[1:]),
            }
            entry = entries[i]
            if entry is not None:
                for key in STATE_KEYS:
                    source = local_tensor(torch.as_tensor(entry[key]))
                    view[key].copy_(source.reshape(view[key].shape))
            if sharded:
                view.update({key: _like(p, view[key]) for key in SHARDED_KEYS})
            views.append(view)
        return cls(list(params), numels, offsets, m, v, W, b, steps, views)

    def reset_memory(self, W1: Tensor, b1: Tensor) -> None:
        """Every coordinate's memory back to the learned ``W1 [nh, f, f]`` / ``b1 [nh, f]`` (in
        place: the views in ``state[p]`` see it)."""
        with torch.no_grad():
            self.memory_W.copy_(W1.detach().to(self.memory_b.dtype).expand_as(self.memory_W))
            self.memory_b.copy_(b1.detach().expand_as(self.memory_b))

    def steps_all(self, params: list[Tensor], grads: list[Tensor | None], device: torch.device) -> bool:
        """Whether stepping ``params`` with ``grads`` is the common step of this pack: they are
        exactly the packed parameters, unchanged in shape, on ``device``, each with a plain, dense,
        contiguous gradient of its shape and dtype. C-level passes (the slow path says what is
        wrong, if anything)."""
        index = -1 if device.type == "cpu" else device.index
        return (
            len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and set(map(type, grads)) == _PLAIN_TENSOR  # no None, DTensor or other subclass
            and list(map(_shape, params)) == self.shapes
            and list(map(_shape, grads)) == self.shapes
            and list(map(_dtype, grads)) == list(map(_dtype, params))
            and all(map(Tensor.is_contiguous, grads))  # dense too: a sparse one is not contiguous
            and set(map(Tensor.get_device, grads)) == {index}
            and set(map(Tensor.get_device, params)) == {index}
        )

    def holds(self, members: Sequence[Tensor], states: Sequence[Mapping | None], dtype: torch.dtype) -> bool:
        """Whether ``members`` are exactly the packed parameters, in order, each ``state[p]``
        (``states[i]``) holding this pack's views, with shapes, state dtype and device unchanged."""
        packed, views, shapes = self.params, self.views, self.shapes
        if len(members) != len(packed) or self.exp_avg.dtype != dtype:
            return False
        device = self.exp_avg.device
        for j, (p, st) in enumerate(zip(members, states, strict=True)):
            view = views[j]
            if not (
                st
                and packed[j] is p
                and p.shape == shapes[j]
                and p.device == device
                and st.get("exp_avg") is view["exp_avg"]
                and st.get("exp_avg_sq") is view["exp_avg_sq"]
                and st.get("memory_W") is view["memory_W"]
                and st.get("memory_b") is view["memory_b"]
                and st.get("step") is view["step"]
            ):
                return False
        return True


def _like(p: Tensor, local: Tensor) -> Tensor:
    """A DTensor over ``local`` (this rank's part of a state entry of DTensor parameter ``p``)
    with ``p``'s mesh and placements; its global shape leads with ``p``'s."""
    shape = torch.Size((*p.shape, *local.shape[p.dim() :]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=shape, stride=stride)


@dataclass(frozen=True, eq=False)
class StateRecord:
    """What an optimizer's ``state`` held after a step: its parameters, their entries' keys and
    the tensor objects under them, in order. A later ``state`` that :meth:`matches` it holds
    exactly those objects (kept alive here, so identity is sound; no address is compared), so
    the packs' views checked then are still in place."""

    state: Mapping
    params: list[Tensor]
    keys: list[str]
    values: list[object]

    @classmethod
    def of(cls, state: Mapping) -> StateRecord | None:
        """The record of ``state`` (``None`` if an entry is not a dict: never matched)."""
        entries = list(state.values())
        try:
            values = list(chain.from_iterable(map(dict.values, entries)))
        except TypeError:
            return None
        return cls(state, list(state), list(chain.from_iterable(entries)), values)

    def matches(self, state: Mapping) -> bool:
        """Whether ``state`` is the recorded mapping with the same parameters, keys and objects."""
        if state is not self.state or len(state) != len(self.params):
            return False
        entries = list(state.values())
        try:
            return (
                all(map(operator.is_, state, self.params))
                and list(chain.from_iterable(entries)) == self.keys
                and all(map(operator.is_, chain.from_iterable(map(dict.values, entries)), self.values))
            )
        except TypeError:  # an entry that is no longer a dict
            return False
