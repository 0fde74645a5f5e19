"""Per-batch test-time adaptation latency, split into the model part and the optimizer part.

For each optimizer (MGG reference step, MGG fused step, Tent's SGD, Adam) three timings of the
same adapter: ``forward_backward`` (model forward, FOA loss, backward), ``step`` (the optimizer
alone, on the gradients left by one backward) and ``full`` (``adapter(x)``: checks + both).
CPU: a small ViT (64 px, patch 16, width 192, depth 4) at batch 8, fp32. CUDA: ViT-B/16 at
batch 64 under bf16 autocast. The fused MGG step needs CUDA and is skipped elsewhere.

Run: ``pytest bench/test_bench_adaptation.py --benchmark-only`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mgg_fast import MGG, MGTTA, fit_source_stats

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:  # ViT-B/16, batch 64, bf16 autocast
    MODEL_KW = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    BATCH, ROUNDS = 64, 30
else:
    MODEL_KW = {"img_size": 64, "patch_size": 16, "embed_dim": 192, "depth": 4, "num_heads": 3}
    BATCH, ROUNDS = 8, 8

# (label, MGTTA optimizer, MGG backend)
VARIANTS = [
    ("mgg-reference", "mgg", "reference"),
    ("mgg-fused", "mgg", "triton"),
    ("sgd", "sgd", "auto"),
    ("adam", "adam", "auto"),
]
LABELS = {
    "mgg-reference": "MGG reference",
    "mgg-fused": "MGG fused",
    "sgd": "Tent (SGD)",
    "adam": "torch Adam",
}
PARTS = ("forward_backward", "step", "full")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else nullcontext()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = VisionTransformer(num_classes=1000, **MODEL_KW).to(DEVICE)
    size = MODEL_KW["img_size"]
    x = torch.randn(BATCH, 3, size, size, device=DEVICE)
    stats = fit_source_stats(model, [torch.randn(BATCH, 3, size, size, device=DEVICE)])
    return model, stats, x


def _timed(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with _autocast():
            fn()
        _sync()

    return run


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize(("label", "optimizer", "backend"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_adaptation_latency(benchmark, setup, label, optimizer, backend, part):
    if backend == "triton" and not CUDA:
        pytest.skip("the fused MGG step needs CUDA (interpreter timings would mean nothing)")
    model, stats, x = setup
    torch.manual_seed(1)
    adapter = MGTTA(
        model, optimizer=optimizer, mgg=MGG().to(DEVICE), loss="foa", source_stats=stats, backend=backend
    )
    benchmark.group = f"adapt-{DEVICE.type}-{part}"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        torch=torch.__version__,
        label=LABELS[label],
        batch=BATCH,
        coords=sum(p.numel() for g in adapter.optimizer.param_groups for p in g["params"]),
    )
    try:
        _timed(lambda: adapter.forward_backward(x))()  # leaves gradients for the step-only timing
        fn = {
            "forward_backward": lambda: adapter.forward_backward(x),
            "step": adapter.step,
            "full": lambda: adapter(x),
        }
        benchmark.pedantic(_timed(fn[part]), rounds=ROUNDS, iterations=1, warmup_rounds=2)
        assert torch.isfinite(adapter.last_loss)
    finally:
        adapter.restore_model()
