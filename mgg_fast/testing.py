"""Helpers for the multi-process tests and benchmarks (not used by the library itself): local
gloo process groups on 127.0.0.1, bounded in time, and the bytes of optimizer state a rank holds."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from mgg_fast.optim.dtensor import local_tensor


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this rank: every tensor in ``optimizer.state``, counted
    by its local shard for a DTensor (so it falls as 1/world size under FSDP2)."""
    return sum(
        local_tensor(v).numel() * v.element_size()
        for st in optimizer.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_gloo(rank: int, world_size: int, port: int, timeout_s: float = 60.0) -> Any:
    """Join a gloo process group on 127.0.0.1 (collectives time out after ``timeout_s``);
    returns ``torch.distributed``."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist


def _rank_main(
    rank: int, worker: Callable[[int, int, Path], Any], world_size: int, port: int, out: str
) -> None:
    init_local_gloo(rank, world_size, port)
    try:
        torch.save(worker(rank, world_size, Path(out)), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_local_processes(
    worker: Callable[[int, int, Path], Any], out: Path, nprocs: int = 2, timeout_s: float = 180.0
) -> list[Any]:
    """Run ``worker(rank, world_size, out)`` on ``nprocs`` spawned processes joined in a gloo
    group on 127.0.0.1, bounded in time (all killed past ``timeout_s``); returns what each
    rank's worker returned (saved to ``out/rank{r}.pt``, loaded with ``weights_only=True``). A
    rank that raises makes this raise. ``worker`` must be a module-level function."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _rank_main,
        args=(worker, nprocs, free_port(), str(out)),
        nprocs=nprocs,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} did not finish within {timeout_s} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nprocs)]
