"""Data-parallel test-time adaptation and meta-training over several processes: gradients
averaged over the ranks, the whole batch's features and predictions gathered
(``MGTTA(data_parallel=True)``, ``train_mgg(data_parallel=True)``), rank 0 first, and the
process group of ``torchrun``.

The optimizer itself needs nothing from here: DTensor parameters (FSDP2, tensor parallel) are
handled by :class:`mgg_fast.MGGOptimizer` directly, DDP needs nothing at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def is_rank_zero() -> bool:
    """Whether this process writes reports, checkpoints and progress bars: rank 0 of the default
    process group, or the only process when none is initialised."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_torchrun(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (NCCL for a CUDA
    ``device``, gloo otherwise), if it describes more than one process; returns whether this
    run is data-parallel."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


@contextlib.contextmanager
def rank_zero_first(active: bool = True) -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it (e.g. rank 0 trains and caches a
    model, the others then load it from the cache instead of racing to write it). Rank 0 lets
    the others go also when its block raises: they then meet the same error (bad input), rather
    than waiting for rank 0 forever."""
    import torch.distributed as dist

    if active and not is_rank_zero():
        dist.barrier()
    try:
        yield
    finally:
        if active and is_rank_zero():
            dist.barrier()


def close_process_group(synchronize: bool = False) -> None:
    """Leave the default process group, if this process is in one. With ``synchronize`` (a run
    that ended well on this rank) the ranks first meet at a barrier, so that no rank tears its
    connections down while another still works (rank 0 writing the reports); after an error
    they do not wait for each other."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def rank_part(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of a batch (rank ``r`` of ``W`` takes the ``r``-th of ``W``
    equal parts); the batch size must be divisible by the world size."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if batch.shape[0] % world:
        raise ValueError(f"a batch of {batch.shape[0]} does not split evenly over {world} processes")
    return batch[part_slice(batch.shape[0])]


def part_sizes(n: int, world: int) -> list[int]:
    """The sizes of ``world`` consecutive parts of ``n`` items, the first ``n % world`` of them one
    item longer (``n = 5`` on 2 ranks: 3 and 2)."""
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


def part_slice(n: int) -> slice:
    """This rank's contiguous part of ``n`` items: rank ``r`` takes the ``r``-th of
    :func:`part_sizes` (``n = 5`` on 2 ranks: items 0-2 and 3-4)."""
    import torch.distributed as dist

    sizes, rank = part_sizes(n, dist.get_world_size()), dist.get_rank()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def require_process_group(what: str) -> None:
    """Raise a clear error unless a default process group is initialised (``what`` needs it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised process group: call torch.distributed.init_process_group "
            "first (torchrun sets up the environment for it)"
        )


def broadcast_from_rank_zero(tensors: Iterable[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors`` (in place; the same tensors, in the same
    order, on every rank), as DDP does with a model's parameters at construction."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each gradient by its mean over the ranks, in one all-reduce (what DDP does in the
    backward pass). Parameters without a gradient are left out; every rank must have gradients
    for the same parameters (true when all ranks run the same model and loss)."""
    average_tensors([p.grad for p in params if p.grad is not None])


def average_tensors(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor (in place) by its mean over the ranks, in one all-reduce."""
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(
        tensors,
        [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)],
    )


class _GatherBatch(torch.autograd.Function):
    """All ranks' ``[B_r, ...]`` parts (sizes ``sizes``, in rank order) concatenated; the
    backward pass sums the gradients every rank computed for this rank's part (an all-reduce:
    works on gloo too). Parts are padded to the largest for the all-gather, which needs one size."""

    @staticmethod
    def forward(ctx: Any, part: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        import torch.distributed as dist

        rank = dist.get_rank()
        ctx.start, ctx.size = sum(sizes[:rank]), part.shape[0]
        padded = part.new_zeros((max(sizes), *part.shape[1:]))
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.size], None


def gather_batch(part: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """The whole batch's ``[B_total, ...]`` from every rank's ``[B_r, ...]`` part, differentiable.

    Used for the FOA loss's feature statistics: its std/mean term is not a mean over samples, so
    averaging the ranks' gradients of per-part statistics would not give the whole batch's
    gradient; with the gathered features (and gradients averaged over the ranks) it is exact.
    Also gathers predictions. Without ``sizes`` the parts must have the same size on every rank
    (exchanged and checked: a clear error on every rank). ``sizes``: the parts' sizes in rank
    order, known to every rank (:func:`part_sizes` of a batch every rank holds whole), which may
    differ: for callers that weigh each rank's loss by its part (as ``MGTTA(whole_batches=True)``
    does), so that the averaged gradients stay exact."""
    import torch.distributed as dist

    if sizes is None:
        size = torch.tensor([part.shape[0]], device=part.device)
        all_sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(all_sizes, size)
        sizes = [int(n) for n in all_sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"data-parallel batches must have the same size on every rank, got {sizes}")
    return _GatherBatch.apply(part, sizes)
