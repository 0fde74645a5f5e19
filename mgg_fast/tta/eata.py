"""EATA (Niu et al., ICML 2022): efficient anti-forgetting test-time adaptation.

It adapts the norm-layer affine parameters with SGD (momentum 0.9), predicts a batch with the
parameters of that moment and then adapts on it, and resets like :class:`MGTTA`. Its objective
is its own, not the FOA loss: the samples with entropy < ``0.4 ln C`` (``C`` the number of
classes) whose softmax is not redundant with a moving average (0.9) of earlier kept ones
(|cosine| < ``d_margin``), weighted by ``exp(e_margin - entropy)``; plus ``fisher_alpha · Σ F
(p - p0)²``, an anti-forgetting regulariser with the diagonal Fisher ``F`` of the source model
on clean data (:func:`eata_fisher`). No update when no sample survives the filters. Defaults
are the published ones: SGD lr 2.5e-4 (their batch 64), ``fisher_alpha`` 2000, ``d_margin``
0.05 (the ImageNet value).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgg_fast.tta.batches import batch_inputs
from mgg_fast.tta.losses import MARGIN_COEFF, entropy_margin, masked_mean, softmax_entropy
from mgg_fast.tta.mgtta import MGTTA
from mgg_fast.tta.norm_params import configure_for_adaptation, select_norm_params

PUBLISHED_LR = 2.5e-4  # EATA's SGD lr at batch 64
IMAGENET_D_MARGIN = 0.05  # EATA's redundancy margin for 1,000 classes (its main.py default)


@torch.no_grad()
def _detached(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def eata_fisher(model: nn.Module, batches: Iterable[Tensor | Sequence[Any]]) -> list[Tensor]:
    """EATA's diagonal Fisher of the norm params (in :func:`select_norm_params` order) on clean data.

    As published: the model configured for adaptation (BatchNorm on batch statistics), the
    cross-entropy against its own predictions per batch, the squared gradients averaged over the
    batches. The model is left as it was.
    """
    params = [p for _, p in select_norm_params(model)]
    config = configure_for_adaptation(model)
    fisher = [torch.zeros_like(p) for p in params]
    count = 0
    try:
        for batch in batches:
            x = batch_inputs(batch).to(params[0].device)
            with torch.enable_grad():
                logits = model(x)
                loss = F.cross_entropy(logits, logits.argmax(1))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:
                    f.add_(g.detach() ** 2)
            count += 1
    finally:
        config.restore()
    if count == 0:
        raise ValueError("eata_fisher got no batches")
    return [f / count for f in fisher]


class EATA(MGTTA):
    """Efficient anti-forgetting test-time adaptation (see the module doc).

    ``fisher``: :func:`eata_fisher` of the source model (``None``: no regulariser).
    ``kept_samples`` counts the samples that passed both filters.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        *,
        fisher: Sequence[Tensor] | None = None,
        fisher_alpha: float = 2000.0,
        margin_coeff: float = MARGIN_COEFF,
        d_margin: float = IMAGENET_D_MARGIN,
        probs_momentum: float = 0.9,
        episodic: bool = False,
    ):
        super().__init__(
            model, "sgd", lr=PUBLISHED_LR if lr is None else lr, loss="entropy", episodic=episodic
        )
        params = self.optimizer.param_groups[0]["params"]
        if fisher is not None:
            fisher = list(fisher)
            if [tuple(f.shape) for f in fisher] != [tuple(p.shape) for p in params]:
                raise ValueError("the Fisher tensors do not match the model's norm params (another model?)")
        self.fisher = None if fisher is None else [f.to(params[0].device) for f in fisher]
        self.anchor = _detached(params)
        self.fisher_alpha = fisher_alpha
        self.margin_coeff = margin_coeff
        self.d_margin = d_margin
        self.probs_momentum = probs_momentum
        self.model_probs: Tensor | None = None
        self.kept_samples = 0
        self._kept = False

    def forward_backward(self, x: Tensor) -> Tensor:
        """Logits of ``x``; gradients of the weighted entropy of the kept samples + the Fisher term."""
        with torch.enable_grad():
            logits = self.model(x)
            entropy = softmax_entropy(logits)
            margin = entropy_margin(logits.shape[1], self.margin_coeff)
            keep = (entropy < margin).detach()
            probs = logits.detach().softmax(1)
            if self.model_probs is not None:
                cosine = F.cosine_similarity(self.model_probs.unsqueeze(0), probs, dim=1)
                keep &= cosine.abs() < self.d_margin
            self._update_probs(probs[keep])
            weight = torch.exp(margin - entropy.detach())
            loss = masked_mean(entropy * weight, keep)
            if self.fisher is not None:
                params = self.optimizer.param_groups[0]["params"]
                loss = loss + self.fisher_alpha * sum(
                    (f * (p - p0) ** 2).sum()
                    for f, p, p0 in zip(self.fisher, params, self.anchor, strict=True)
                )
            self.optimizer.zero_grad(set_to_none=True)
            self._kept = bool(keep.any())
            if self._kept:
                loss.backward()
        self.kept_samples += int(keep.sum())
        self.last_loss = loss.detach()
        return logits.detach()

    def _update_probs(self, kept: Tensor) -> None:
        if len(kept) == 0:
            return
        mean = kept.mean(0)
        m = self.probs_momentum
        self.model_probs = mean if self.model_probs is None else m * self.model_probs + (1 - m) * mean

    def step(self) -> None:
        """The SGD step, unless no sample of the batch survived the filters."""
        if self._kept:
            self.optimizer.step()
        self._kept = False
        self.num_updates += 1
        self.total_updates += 1

    def reset(self) -> None:
        """:meth:`MGTTA.reset`, and the moving average of kept predictions forgotten."""
        super().reset()
        self.model_probs = None
        self._kept = False
