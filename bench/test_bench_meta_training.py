"""Time and memory of one meta-training window for K = 1, 2, 4, 8 truncated unrolls.

The demo's ResNet source architecture (randomly initialised: the cost does not depend on the
weights) at the evaluation batch of 64, FOA loss, MGG reference math, on the CPU. One benchmark
round = K ``MetaTrainer.step`` calls, i.e. one window: K adaptation steps and one meta-update.
``extra_info["saved_mb"]`` is the memory autograd holds for the window's backward: the bytes of
every tensor saved for backward while the K steps run (a saved-tensors hook counts them; shared
storages count once), which is what grows with K.

Run: ``pytest bench/test_bench_meta_training.py --benchmark-only`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import pytest
import torch

from mgg_fast import MGG, fit_source_stats
from mgg_fast.evaluation.bundled.source_models import build_source_model
from mgg_fast.tta.meta_training import MetaTrainer

BATCH = 64


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_source_model("resnet").eval()
    stats = fit_source_stats(model, [torch.randn(BATCH, 3, 32, 32)])
    xs = [torch.randn(BATCH, 3, 32, 32) for _ in range(8)]
    return model, stats, xs


def _saved_bytes(trainer: MetaTrainer, xs: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while one window of steps runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for x in xs:
            trainer.step(x)
    return sum(seen.values())


@pytest.mark.parametrize("unroll", [1, 2, 4, 8])
def test_meta_window(benchmark, setup, unroll):
    model, stats, xs = setup
    with MetaTrainer(model, MGG(), source_stats=stats, adapt_lr=1e-3, unroll=unroll) as trainer:
        trainer.step(xs[0])  # past the first (MGG-free) step
        for x in xs[1:unroll]:
            trainer.step(x)
        saved = _saved_bytes(trainer, xs[:unroll])
        benchmark.group = "meta-window-cpu"
        benchmark.extra_info.update(
            label=f"K = {unroll}", unroll=unroll, batch=BATCH, torch=torch.__version__, saved_mb=saved / 2**20
        )
        window = xs[:unroll]
        benchmark.pedantic(lambda: [trainer.step(x) for x in window], rounds=4, iterations=1, warmup_rounds=1)
        assert trainer.num_steps % unroll == 0
