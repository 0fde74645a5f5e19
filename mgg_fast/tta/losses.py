"""Unsupervised test-time losses: entropy, the filtered entropy of SAR/EATA, and the published
FOA-style loss with source statistics.

``foa_loss`` = mean softmax entropy + λ · (Σ MSE(batch std, source std) + Σ MSE(batch mean,
source mean)) / 64, over per-layer features of the batch (the MGTTA objective, λ = 0.4; the
features are those of :mod:`mgg_fast.tta.source_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mgg_fast.tta.source_stats import SourceStats, concat_features, feature_tap, resolve_layers

FOA_LAMBDA = 0.4
FOA_SCALE = 64.0
LOSSES = ("foa", "entropy")
MARGIN_COEFF = 0.4  # entropy margin = 0.4 ln C (SAR's e0, EATA's e_margin)


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy ``[B]`` of the softmax of ``logits [B, C]`` (computed in float32+)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def entropy_margin(num_classes: int, coeff: float = MARGIN_COEFF) -> float:
    """``coeff · ln C``: the published reliable-entropy threshold of SAR and EATA."""
    return coeff * math.log(num_classes)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; 0 (with zero gradients) when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def foa_loss(logits: Tensor, features: Tensor, stats: SourceStats, lam: float = FOA_LAMBDA) -> Tensor:
    """Mean entropy + ``lam`` · (Σ (std_b − std_s)² + Σ (mean_b − mean_s)²) / 64.

    ``features [B, D]`` are the batch's features (the layers of ``stats``); ``B`` must be ≥ 2.
    """
    if features.dim() != 2 or features.shape[1] != stats.mean.numel():
        raise ValueError(
            f"features of shape {list(features.shape)} do not match source statistics of "
            f"{stats.mean.numel()} features"
        )
    if features.shape[0] < 2:
        raise ValueError("loss='foa' needs batches of at least 2 samples (batch std); use loss='entropy'")
    std, mean = torch.std_mean(features if features.dtype == torch.float64 else features.float(), dim=0)
    discrepancy = ((std - stats.std) ** 2).sum() + ((mean - stats.mean) ** 2).sum()
    return softmax_entropy(logits).mean() + lam * discrepancy / FOA_SCALE


class ClassMask:
    """The classes an adapter keeps from the logits (``class_mask=``), checked against the width of
    the model's head: class indices (distinct, >= 0) or a boolean mask over the classes.

    The head's width is checked at construction when it is known (``num_classes``, as timm
    models have); otherwise on every forward, before the mask is applied, so a mask that does not
    fit is a ``ValueError`` naming ``class_mask`` before any gradient or step (nothing changes).
    """

    def __init__(self, class_mask: Sequence[int] | Tensor, device: torch.device, num_classes: int | None):
        try:
            index = torch.as_tensor(class_mask).detach()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"class_mask must hold class indices or booleans, got {class_mask!r}") from exc
        self.width = None  # a boolean mask must have exactly one entry per class
        if index.dtype == torch.bool and index.dim() == 1:
            self.width = index.numel()
            index = index.nonzero().flatten()
        if index.dim() != 1 or index.numel() == 0 or index.is_floating_point() or index.is_complex():
            raise ValueError("class_mask must be a non-empty 1-D list of class indices or a boolean mask")
        self.largest = int(index.max())
        if int(index.min()) < 0:
            raise ValueError(f"class_mask holds the negative class index {int(index.min())}")
        if index.unique().numel() != index.numel():
            raise ValueError("class_mask lists a class twice")
        self.index = index.long().to(device)
        if num_classes is not None:
            self.check(num_classes)

    def check(self, num_classes: int) -> None:
        """Raise a ``ValueError`` naming ``class_mask`` unless it fits a head of ``num_classes``."""
        if self.width is not None and self.width != num_classes:
            raise ValueError(
                f"class_mask is a boolean mask over {self.width} classes, but the model's head has "
                f"{num_classes}"
            )
        if self.largest >= num_classes:
            raise ValueError(
                f"class_mask holds class index {self.largest}, but the model's head has {num_classes} "
                f"classes (indices 0 to {num_classes - 1})"
            )

    def __call__(self, logits: Tensor) -> Tensor:
        self.check(logits.shape[1])
        return logits[:, self.index]


class AdaptationLoss:
    """The loss an adapter or meta-trainer minimises: runs the forward and returns (logits, loss).

    ``loss`` is ``"foa"`` (needs ``source_stats``), ``"entropy"``, or a callable
    ``outputs -> scalar`` (the raw model output; for custom objectives and tests).
    ``gather`` (data-parallel runs: :func:`mgg_fast.tta.data_parallel.gather_batch`) turns this rank's
    FOA features into the whole batch's before their statistics are taken.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Callable[[Tensor], Tensor],
        source_stats: SourceStats | None = None,
        class_mask: ClassMask | None = None,
        gather: Callable[[Tensor], Tensor] | None = None,
    ):
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")
        if loss == "foa" and source_stats is None:
            raise ValueError(
                "loss='foa' needs source statistics: pass source_stats=fit_source_stats(model, "
                "source_batches), or use loss='entropy'"
            )
        self.model = model
        self.loss = loss
        device = next(model.parameters()).device
        self.stats = source_stats.to(device) if loss == "foa" else None
        self._layers = resolve_layers(model, self.stats.layers) if self.stats is not None else {}
        self.class_mask = class_mask
        self.gather = gather

    def __call__(self, forward: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """Run ``forward()`` (the model on the batch) and return ``(logits, loss)``."""
        if self.stats is None:
            logits = self._mask(forward())
            loss = self.loss(logits) if callable(self.loss) else softmax_entropy(logits).mean()
            return logits, loss
        with feature_tap(self._layers, self.stats.mode) as found:
            logits = self._mask(forward())
        features = concat_features(found, self.stats.layers)
        if self.gather is not None:
            features = self.gather(features)
        return logits, foa_loss(logits, features, self.stats)

    def _mask(self, logits: Tensor) -> Tensor:
        return logits if self.class_mask is None else self.class_mask(logits)
