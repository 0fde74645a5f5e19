"""mgg_fast: the Meta Gradient Generator (a learned optimizer for test-time adaptation), made fast.

Public API (imported on first use, so ``import mgg_fast.kernels`` or ``python -m mgg_fast --help``
load only what they need):

    MGG, MGGState            the learned optimizer network and its per-coordinate memory
    MGGOptimizer             a torch.optim.Optimizer performing the published MGTTA step
    MGTTA, MGTTADropIn       test-time adaptation of a model's norm layers (MGG, Tent, Adam)
    SAR, EATA                the filtered-entropy baselines under the same harness
    norm_params              the parameters test-time adaptation updates
    SourceStats, fit_source_stats   source feature statistics for the FOA loss
    train_mgg                meta-training of an MGG on unlabeled batches

The layers, each importing only the ones below it: ``cli`` → ``evaluation`` → ``tta`` →
``optim`` → ``core``; ``kernels`` stand on ``core`` alone.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "MGG": "mgg_fast.core.mgg",
    "MGGState": "mgg_fast.core.mgg",
    "MGGOptimizer": "mgg_fast.optim.optimizer",
    "MGTTA": "mgg_fast.tta.mgtta",
    "MGTTADropIn": "mgg_fast.tta.mgtta",
    "SAR": "mgg_fast.tta.sar",
    "EATA": "mgg_fast.tta.eata",
    "norm_params": "mgg_fast.tta.norm_params",
    "SourceStats": "mgg_fast.tta.source_stats",
    "fit_source_stats": "mgg_fast.tta.source_stats",
    "train_mgg": "mgg_fast.tta.meta_training",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mgg_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
