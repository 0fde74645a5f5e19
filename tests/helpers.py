"""Helpers shared by the tests: tolerances, the parity vectors, random MGGs, spawned gloo ranks."""

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch

from mgg_fast import MGG

PARITY_DIR = Path(__file__).parent / "data" / "parity"
F64 = {"rtol": 1e-9, "atol": 1e-10}
F32 = {"rtol": 1e-4, "atol": 1e-5}
F32_METAGRAD = {"rtol": 1e-3, "atol": 1e-4}


def load_parity(name: str) -> dict:
    return torch.load(PARITY_DIR / name, weights_only=True)


def mgg_from_parity(data: dict, dtype: torch.dtype) -> MGG:
    cfg = data["config"]
    mgg = MGG(cfg["hidden_size"], cfg["num_heads"]).to(dtype)
    mgg.load_state_dict(data["state_dict"])  # published names, with the prefix
    return mgg


def random_mgg(
    hidden: int = 8, heads: int = 1, seed: int = 0, *, scale: float = 0.1, dtype: torch.dtype = torch.float32
) -> MGG:
    """An MGG whose every parameter matters: the published init plus N(0, scale^2) noise (as the
    parity vectors were made), on the default device."""
    torch.manual_seed(seed)
    mgg = MGG(hidden, heads).to(dtype)
    with torch.no_grad():
        for p in mgg.parameters():
            p.add_(scale * torch.randn_like(p))
    return mgg


DIST_TIMEOUT_S = 180.0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(worker, out: Path, nprocs: int = 2, timeout_s: float = DIST_TIMEOUT_S) -> list:
    """Run ``worker(rank, world_size, port, out)`` on ``nprocs`` spawned processes, bounded in
    time (killed past ``timeout_s``); the results each rank saved to ``out/rank{r}.pt``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        worker, args=(nprocs, free_port(), str(out)), nprocs=nprocs, join=False, start_method="spawn"
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


def init_gloo(rank: int, world_size: int, port: int):
    """Join a gloo process group on 127.0.0.1 (60 s collective timeout); returns torch.distributed."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    return dist
