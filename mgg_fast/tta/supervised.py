"""The supervised oracle: online adaptation of the same parameters on the true labels.

Not a test-time method (it reads the labels): a reference row that shows how much a stream lets
any optimizer of the norm parameters gain. Each batch is predicted first, then the parameters
take one step on its cross-entropy, exactly as the unsupervised methods take theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgg_fast.tta.mgtta import MGTTA


class SupervisedOracle(MGTTA):
    """Cross-entropy on the labels given by :meth:`set_labels` before each batch (Adam by default).

    ``forward(x)`` needs the batch's labels first: ``oracle.set_labels(y); logits = oracle(x)``.
    """

    needs_labels = True

    def __init__(
        self, model: nn.Module, lr: float | None = None, *, optimizer: str = "adam", episodic: bool = False
    ):
        super().__init__(model, optimizer, lr=lr, loss="entropy", episodic=episodic)
        self._labels: Tensor | None = None

    def set_labels(self, labels: Tensor) -> None:
        """The labels of the next batch (class indices, on any device)."""
        self._labels = labels

    def forward_backward(self, x: Tensor) -> Tensor:
        """Logits of ``x``; gradients of the cross-entropy with the labels of :meth:`set_labels`."""
        labels, self._labels = self._labels, None
        if labels is None or len(labels) != len(x):
            raise ValueError("the supervised oracle needs the batch's labels: call set_labels(y) first")
        if bool((labels < 0).any()):
            raise ValueError("the supervised oracle needs labeled data (a label is -1)")
        with torch.enable_grad():
            logits = self.model(x)
            loss = F.cross_entropy(logits, labels.to(logits.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.last_loss = loss.detach()
        return logits.detach()
