"""The MGTTA paper's filtered-entropy baselines, SAR and EATA, as :class:`MGTTA`-style adapters.

Both adapt the same norm-layer affine parameters with SGD (momentum 0.9), predict a batch with
the parameters of that moment and then adapt on it, and reset like :class:`MGTTA`. Each keeps
its own published objective (entropy of the reliable samples), not the FOA loss:

* :class:`SAR` (Niu et al., ICLR 2023): samples with entropy < ``0.4 ln C`` only; a
  sharpness-aware step (SAM, ``rho`` 0.05: perturb the params along the normalised gradient,
  take the gradient of the re-filtered entropy there, step from the unperturbed params); model
  recovery: an exponential moving average (0.9) of the second entropy below 0.2 resets the
  model and the optimizer.
* :class:`EATA` (Niu et al., ICML 2022): samples with entropy < ``0.4 ln C`` whose softmax is not
  redundant with a moving average (0.9) of earlier kept ones (|cosine| < ``d_margin``), weighted by
  ``exp(e_margin - entropy)``; plus ``fisher_alpha · Σ F (p - p0)²``, an anti-forgetting
  regulariser with the diagonal Fisher ``F`` of the source model on clean data
  (:func:`eata_fisher`). No update when no sample survives the filters.

``C`` is the number of classes (the logits' width). Defaults are the published ones: SGD lr
2.5e-4 (their batch 64), ``fisher_alpha`` 2000, ``d_margin`` 0.05 (the ImageNet value).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgg_fast.adaptation import MGTTA
from mgg_fast.losses import _batch_inputs, softmax_entropy
from mgg_fast.norm_params import configure_for_adaptation, select_norm_params

PUBLISHED_LR = 2.5e-4
MARGIN_COEFF = 0.4  # entropy margin = 0.4 ln C (SAR's e0, EATA's e_margin)
IMAGENET_D_MARGIN = 0.05  # EATA's redundancy margin for 1,000 classes (its main.py default)


def entropy_margin(num_classes: int, coeff: float = MARGIN_COEFF) -> float:
    """``coeff · ln C``: the published reliable-entropy threshold."""
    return coeff * math.log(num_classes)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; 0 (with zero gradients) when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


class SAR(MGTTA):
    """Sharpness-aware, reliable-entropy adaptation with model recovery (see the module doc).

    ``forward_backward(x)`` predicts and takes the gradient of the reliable entropy; ``step()``
    does the SAM ascent, the second forward and backward on the same ``x``, the SGD step, and the
    recovery check. ``recoveries`` counts the resets it triggered.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        *,
        rho: float = 0.05,
        margin_coeff: float = MARGIN_COEFF,
        reset_constant: float = 0.2,
        ema_momentum: float = 0.9,
        episodic: bool = False,
    ):
        super().__init__(
            model, "sgd", lr=PUBLISHED_LR if lr is None else lr, loss="entropy", episodic=episodic
        )
        self.rho = rho
        self.margin_coeff = margin_coeff
        self.reset_constant = reset_constant
        self.ema_momentum = ema_momentum
        self.ema: float | None = None
        self.recoveries = 0
        self._pending: tuple[Tensor, Tensor] | None = None

    def _params(self) -> list[Tensor]:
        return self.optimizer.param_groups[0]["params"]

    def forward_backward(self, x: Tensor) -> Tensor:
        """Logits of ``x``; gradients of the mean entropy of its reliable samples."""
        with torch.enable_grad():
            logits = self.model(x)
            entropy = softmax_entropy(logits)
            reliable = (entropy < entropy_margin(logits.shape[1], self.margin_coeff)).detach()
            loss = _masked_mean(entropy, reliable)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self._pending = (x, reliable)
        self.last_loss = loss.detach()
        return logits.detach()

    def step(self) -> None:
        """SAM step on the batch of the last ``forward_backward``, then the recovery check."""
        if self._pending is None:
            raise RuntimeError("SAR.step() needs a forward_backward(x) first")
        x, reliable = self._pending
        self._pending = None
        params = [p for p in self._params() if p.grad is not None]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            ascent = [p.grad * (self.rho / (norm + 1e-12)) for p in params]
            torch._foreach_add_(params, ascent)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = self.model(x)
            entropy = softmax_entropy(logits)
            keep = reliable & (entropy < entropy_margin(logits.shape[1], self.margin_coeff)).detach()
            second = _masked_mean(entropy, keep)
            second.backward()
        if bool(keep.any()):
            value = float(second.detach())
            m = self.ema_momentum
            self.ema = value if self.ema is None else m * self.ema + (1 - m) * value
        with torch.no_grad():
            torch._foreach_sub_(params, ascent)
        super().step()
        if self.ema is not None and self.ema < self.reset_constant:
            self.reset()
            self.recoveries += 1

    def reset(self) -> None:
        """:meth:`MGTTA.reset`, and the recovery average forgotten (as SAR's own reset does)."""
        super().reset()
        self.ema = None
        self._pending = None


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
            x = _batch_inputs(batch).to(params[0].device)
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
            loss = _masked_mean(entropy * weight, keep)
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
