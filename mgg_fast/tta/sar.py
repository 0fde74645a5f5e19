"""SAR (Niu et al., ICLR 2023): sharpness-aware, reliable-entropy adaptation with model recovery.

It adapts the norm-layer affine parameters with SGD (momentum 0.9), predicts a batch with the
parameters of that moment and then adapts on it, and resets like :class:`MGTTA`. Its objective
is its own, not the FOA loss: the entropy of the samples with entropy < ``0.4 ln C`` (``C``
the number of classes, the logits' width); a sharpness-aware step (SAM, ``rho`` 0.05: perturb
the params along the normalised gradient, take the gradient of the re-filtered entropy there,
step from the unperturbed params); model recovery: an exponential moving average (0.9) of the
second entropy below 0.2 resets the model and the optimizer. Defaults are the published ones
(SGD lr 2.5e-4 at their batch 64).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mgg_fast.tta.losses import MARGIN_COEFF, entropy_margin, masked_mean, softmax_entropy
from mgg_fast.tta.mgtta import MGTTA

PUBLISHED_LR = 2.5e-4  # SAR's SGD lr at batch 64


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
            loss = masked_mean(entropy, reliable)
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
            second = masked_mean(entropy, keep)
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
