"""DTensor parameters (FSDP2's ``fully_shard``, tensor-parallel shards): their local shards, and
the decisions the ranks of their meshes take together.

The step is coordinate-wise, so a rank steps its local shard and needs no communication for
the math; only the whole-step decisions (a non-finite gradient anywhere, a rank whose
validation failed) are agreed on with one all-reduce of a flag.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

# The non-finite flag of a rank whose validation failed (a non-finite step is 1.0).
REJECTED = 2.0

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor

    is_dtensor = functools.partial(type.__instancecheck__, DTensor)
else:  # a torch built without distributed: no DTensor can exist
    DTensor = None

    def is_dtensor(t: object) -> bool:
        return False


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), as a tensor that aliases it:
    what the step reads and writes in place."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def meshes(groups: list[dict[str, Any]]) -> list[Any]:
    """The device meshes of the DTensor parameters, in order of first appearance (the same on
    every rank, so the collectives match)."""
    found: dict[Any, None] = {}
    for group in groups:
        params = group["params"]
        if any(map(is_dtensor, params)):
            found.update(dict.fromkeys(p.device_mesh for p in params if is_dtensor(p)))
    return list(found)


def max_over_ranks(flag: Tensor, device_meshes: list[Any]) -> None:
    """``flag`` becomes its maximum over every rank of every mesh (in place, on the device)."""
    import torch.distributed as dist

    for mesh in device_meshes:
        for dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
