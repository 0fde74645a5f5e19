"""Per-rank optimizer-state bytes of MGGOptimizer under FSDP2 (``fully_shard``) on 1, 2 and 4
gloo processes (CPU, 127.0.0.1): the MGG state is 74 floats per coordinate at H = 8, so it must
be sharded like the parameters, falling as 1/world size (give or take FSDP's row padding).

Each case spawns its ranks, takes one step and records every rank's bytes of ``opt.state``
(local shards) in ``extra_info``; the timing is that of the whole spawned run, not of a step.
Skipped where torch has no distributed support or the machine has too few cores for the ranks.
Run: ``pytest bench/test_bench_distributed.py --benchmark-only``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mgg_fast import MGG, MGGOptimizer
from mgg_fast.testing import run_local_processes, state_bytes

HIDDEN, HEADS = 8, 1
LAYERS = [(64, 256), (256, 256), (256, 10)]  # Linear(in, out): weight rows = out


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(i, o) for i, o in LAYERS))


def _worker(rank: int, world_size: int, out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_model(), mesh=init_device_mesh("cpu", (world_size,)))
    opt = MGGOptimizer(model.parameters(), MGG(HIDDEN, HEADS), backend="reference")
    model(torch.randn(8, LAYERS[0][0])).pow(2).mean().backward()
    opt.step()
    return {"state_bytes": state_bytes(opt)}


def _bytes_per_coordinate() -> int:
    f = HIDDEN // HEADS
    return 4 * (2 + HEADS * f * f + HEADS * f)  # exp_avg, exp_avg_sq, memory_W, memory_b (fp32)


def _bound(world_size: int) -> int:
    """The most state one rank can hold: FSDP2 gives each rank ceil(rows / world) rows of each
    parameter (weights and biases of the layers), plus a 4-byte step count per parameter."""
    per_coord = _bytes_per_coordinate()
    rows = sum(math.ceil(o / world_size) * (i + 1) for i, o in LAYERS)
    return rows * per_coord + 4 * 2 * len(LAYERS)


@pytest.mark.benchmark(group="fsdp-state")
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_state_bytes_per_rank_fall_as_one_over_world_size(benchmark, world_size, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch has no distributed support")
    if world_size > 2 * (os.cpu_count() or 1):
        pytest.skip(f"{world_size} ranks need at least {world_size // 2} cores")
    results = benchmark.pedantic(
        run_local_processes, args=(_worker, tmp_path, world_size), rounds=1, iterations=1
    )
    per_rank = [r["state_bytes"] for r in results]
    full = sum(o * (i + 1) for i, o in LAYERS) * _bytes_per_coordinate() + 4 * 2 * len(LAYERS)
    benchmark.extra_info.update(
        {
            "label": f"{world_size} rank(s)",
            "world_size": world_size,
            "state_bytes_per_rank": per_rank,
            "single_process_bytes": full,
        }
    )
    assert sum(per_rank) == full + 4 * 2 * len(LAYERS) * (world_size - 1)  # steps are replicated
    assert max(per_rank) <= _bound(world_size)
    assert max(per_rank) <= full / world_size * 1.01 + 4 * 2 * len(LAYERS)
