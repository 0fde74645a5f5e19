"""MGTTA: online test-time adaptation of a model's norm layers, the base class of every method.

``MGTTA`` itself steps with the learned MGG (``optimizer="mgg"``) or a hand-made optimizer of
the same loss (``"sgd"``: Tent, ``"adam"``); SAR and EATA subclass it with their own
objectives (:mod:`mgg_fast.tta.sar`, :mod:`mgg_fast.tta.eata`), and
:mod:`mgg_fast.tta.registry` names them all. ``MGTTADropIn`` is the official ``MGTTA``'s call
signature for harnesses written against the published code."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import mgg_fast.tta.data_parallel as distributed
from mgg_fast.core.arguments import beta_pair, finite_number
from mgg_fast.core.mgg import MGG
from mgg_fast.optim import MGGOptimizer
from mgg_fast.optim.functional import triton_usable
from mgg_fast.optim.sign_momentum import SignMomentum
from mgg_fast.tta.losses import AdaptationLoss, ClassMask
from mgg_fast.tta.norm_params import configure_for_adaptation, select_norm_params
from mgg_fast.tta.source_stats import SourceStats

OPTIMIZERS = ("mgg", "sgd", "adam", "signum")
DEFAULT_LR = {"mgg": 1e-3, "sgd": 1e-3, "adam": 1e-3, "signum": 1e-3}
SGD_MOMENTUM = 0.9


class MGTTA(nn.Module):
    """Online test-time adaptation: ``logits = adapter(x)`` predicts, then adapts on ``x``.

    The affine parameters of the model's LayerNorm/BatchNorm/GroupNorm layers are updated by one
    optimizer step per batch on an unsupervised loss; BatchNorm uses test-batch statistics. The
    baselines share the parameters and the loss, so only the optimizer differs:

    * ``"mgg"``: the learned MGG optimizer (:class:`MGGOptimizer`; published ``adapt_lr`` 1e-3).
    * ``"sgd"``: Tent (SGD, momentum 0.9, lr 1e-3).
    * ``"adam"``: Adam (lr 1e-3, ``betas``).
    * ``"signum"``: sign momentum (lr 1e-3, momentum ``betas[0]``; :mod:`mgg_fast.optim.sign_momentum`),
      the rule a saturated MGG approximates.

    Args:
        model: the model to adapt; configured in place (norm layers in train mode, the rest in
            eval mode so dropout stays off; only norm params trainable).
        optimizer: ``"mgg"``, ``"sgd"``, ``"adam"`` or ``"signum"``.
        mgg: the trained MGG (``None``: an untrained ``MGG()``, with a warning). It is never
            modified; if it lives on another device than the model, a copy is moved there.
        lr: step size; ``None`` takes the default above.
        loss: ``"foa"`` (entropy + source-statistics discrepancy; needs ``source_stats`` from
            :func:`fit_source_stats`) or ``"entropy"`` (Tent).
        episodic: reset before every batch (each batch adapts from the original model);
            otherwise adaptation is continual.
        class_mask: class indices (or a boolean mask) to keep from the logits before the loss and
            in the returned logits (ImageNet-R/A style subsets). Checked against the head at
            construction where the model gives its ``num_classes`` (timm models), else on every
            batch before the loss (:class:`~mgg_fast.tta.losses.ClassMask`).
        backend: MGG step backend (``"auto"``, ``"triton"`` or ``"reference"``; see
            :class:`MGGOptimizer`).
        betas: moment coefficients of the MGG features and of Adam.
        carry_memory: ``False``: the memoryless MGG of the ablation (every step starts from the
            learned memory; see :class:`MGGOptimizer`); ``"mgg"`` only.
        memory_W_dtype: storage dtype of the MGG's memory matrices (``None`` or
            ``torch.bfloat16``; see :class:`MGGOptimizer`); ``"mgg"`` only.
        data_parallel: each rank of the default process group adapts on its part of the batch
            (the same size on every rank): rank 0's parameters, buffers and MGG are broadcast at
            construction, the gradients are averaged over the ranks before every step and the
            FOA feature statistics are those of the whole batch (gathered), so every rank holds
            the same adapted parameters, as one process on the whole batch would (BatchNorm
            layers still normalise with their rank's part: ``nn.SyncBatchNorm`` on GPUs).
        whole_batches: with ``data_parallel``, every rank passes the *whole* batch (the same on
            every rank) and gets the whole batch's logits back: each rank adapts on its
            contiguous part (:func:`mgg_fast.tta.data_parallel.part_slice`; sizes may differ by one)
            and weighs its loss by its share of the batch, so the averaged gradients are the
            whole batch's for any batch size. A batch with fewer samples than ranks is not split:
            every rank adapts on all of it. ``forward`` checks the whole batch, so the ranks agree
            on bad input instead of some waiting in a collective.

    Attributes:
        num_updates: optimizer steps since construction or the last :meth:`reset`.
        total_updates: optimizer steps since construction.
        last_loss: the (detached) loss of the latest batch, or ``None``.
        param_names: qualified names of the adapted parameters, in order.

    ``needs_labels`` is ``False``: the methods are unsupervised (the oracle of
    :mod:`mgg_fast.tta.supervised` sets it).

    Move the model to its device (and dtype) before wrapping it: the optimizer state and the
    reset snapshot live there. Raises ``ValueError`` for a model without norm params,
    ``loss="foa"`` without statistics, and (per call) an empty batch, a batch holding NaN/Inf or
    living on another device than the model; nothing changes in those cases.
    """

    needs_labels = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: str = "mgg",
        mgg: MGG | None = None,
        lr: float | None = None,
        loss: str = "foa",
        source_stats: SourceStats | None = None,
        episodic: bool = False,
        class_mask: Sequence[int] | Tensor | None = None,
        backend: str = "auto",
        betas: tuple[float, float] = (0.9, 0.99),
        memory_W_dtype: torch.dtype | None = None,
        carry_memory: bool = True,
        data_parallel: bool = False,
        whole_batches: bool = False,
    ):
        super().__init__()
        if data_parallel:
            distributed.require_process_group("MGTTA(data_parallel=True)")
        elif whole_batches:
            raise ValueError("whole_batches=True is a setting of data_parallel=True")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        lr = None if lr is None else finite_number("lr", lr)
        betas = beta_pair("betas", betas)
        named = select_norm_params(model)  # raises for models without norm params
        self.device = named[0][1].device
        mask = None if class_mask is None else ClassMask(class_mask, self.device, _head_width(model))
        gather = self._gather_features if data_parallel else None
        self.loss_fn = AdaptationLoss(model, loss, source_stats, mask, gather)
        self.data_parallel = data_parallel
        self.whole_batches = whole_batches
        self._divided = data_parallel  # whether the current batch is split over the ranks
        self._sizes: list[int] | None = None  # with whole_batches: the ranks' part sizes of it
        self.model = model
        self.optimizer_name = optimizer
        self.episodic = episodic
        self.lr = DEFAULT_LR[optimizer] if lr is None else lr
        self.param_names = [name for name, _ in named]
        params = [p for _, p in named]
        if optimizer != "mgg" and memory_W_dtype is not None:
            raise ValueError(f"memory_W_dtype is a setting of the 'mgg' optimizer, not of {optimizer!r}")
        if optimizer != "mgg" and not carry_memory:
            raise ValueError(f"carry_memory is a setting of the 'mgg' optimizer, not of {optimizer!r}")
        if optimizer == "mgg" and backend == "triton" and not triton_usable(self.device):
            raise ValueError(
                f"backend='triton' needs a CUDA model (or TRITON_INTERPRET=1); it is on {self.device}"
            )
        if optimizer == "mgg":
            self.optimizer: torch.optim.Optimizer = MGGOptimizer(
                params,
                _mgg_on(mgg, self.device),
                lr=self.lr,
                betas=betas,
                backend=backend,
                memory_W_dtype=memory_W_dtype,
                carry_memory=carry_memory,
            )
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=SGD_MOMENTUM)
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=self.lr, betas=betas)
        else:
            self.optimizer = SignMomentum(params, lr=self.lr, beta=betas[0])
        self._config = configure_for_adaptation(model)
        # Only the adapted params and the buffers can change: snapshot those, not the whole model.
        self._tracked = params + [b for b in model.buffers() if b is not None]
        if data_parallel:
            mgg_weights = list(self.mgg.parameters()) if self.mgg is not None else []
            distributed.broadcast_from_rank_zero(self._tracked + mgg_weights)
        self._initial = [t.detach().clone() for t in self._tracked]
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self.num_updates = 0
        self.total_updates = 0
        self.last_loss: Tensor | None = None
        self._released = False

    @property
    def mgg(self) -> MGG | None:
        """The MGG that the ``"mgg"`` optimizer reads (``None`` for the baselines)."""
        return self.optimizer.mgg if isinstance(self.optimizer, MGGOptimizer) else None

    def forward(self, x: Tensor) -> Tensor:
        """Predict on ``x`` with the current parameters, adapt on it, return the detached logits."""
        self._check_input(x)
        if self.episodic:
            self.reset()
        logits = self.forward_backward(x)
        self.step()
        return logits

    def forward_backward(self, x: Tensor) -> Tensor:
        """The model part of :meth:`forward` (no input checks): loss and gradients; returns logits.

        Gradients are enabled inside, so the adapter also works in a ``torch.no_grad()`` loop."""
        part, weight = self._own_part(x)
        with torch.enable_grad():
            logits, loss = self.loss_fn(lambda: self.model(part))
            self.optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
        if self.data_parallel:
            distributed.average_gradients(self._tracked)
        self.last_loss = loss.detach()
        if self.whole_batches and self._divided:
            return distributed.gather_batch(logits.detach(), self._sizes)
        return logits.detach()

    def _own_part(self, x: Tensor) -> tuple[Tensor, float]:
        """The samples of ``x`` this rank adapts on, and the weight of their loss: with
        ``whole_batches``, the rank's part and ``W · n_r / N`` (the mean over ranks of
        weighted part means is the whole batch's mean; a gathered FOA term gets weights that
        sum to ``W``, as unweighted equal parts do); otherwise ``x`` itself and 1."""
        if not self.whole_batches:
            return x, 1.0
        world = torch.distributed.get_world_size()
        self._divided = len(x) >= world
        if not self._divided:
            return x, 1.0
        self._sizes = distributed.part_sizes(len(x), world)
        part = x[distributed.part_slice(len(x))]
        return part, world * len(part) / len(x)

    def _gather_features(self, features: Tensor) -> Tensor:
        """The FOA features of the whole batch when it is split over the ranks (else as given)."""
        if not self._divided:
            return features
        return distributed.gather_batch(features, self._sizes)

    def step(self) -> None:
        """The optimizer part of :meth:`forward`: one step on the gradients left by ``forward_backward``."""
        self.optimizer.step()
        self.num_updates += 1
        self.total_updates += 1

    def reset(self) -> None:
        """Restore the adapted parameters, the model's buffers and the optimizer state (moments,
        MGG memory, step counts) to their values at construction, bitwise. (The other
        parameters are frozen and never change.)"""
        with torch.no_grad():
            torch._foreach_copy_(self._tracked, self._initial)
        self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates = 0
        self.last_loss = None

    def restore_model(self) -> nn.Module:
        """Reset, then undo the adaptation configuration (modes, ``requires_grad``, BatchNorm
        running statistics). The adapter cannot be used afterwards; returns the model."""
        self.reset()
        self._config.restore()
        self._released = True
        return self.model

    def extra_repr(self) -> str:
        n = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        return (
            f"optimizer={self.optimizer_name!r}, lr={self.lr}, params={n} in {len(self.param_names)} "
            f"tensors, episodic={self.episodic}, total_updates={self.total_updates}"
        )

    def _check_input(self, x: Tensor) -> None:
        if self._released:
            raise RuntimeError("restore_model() was called: this adapter no longer owns the model")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "test-time adaptation needs gradients: call the adapter outside torch.inference_mode()"
            )
        if not isinstance(x, Tensor):
            raise TypeError(f"the batch must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"empty batch (shape {list(x.shape)}): nothing was adapted")
        if x.device != self.device:
            raise ValueError(f"the batch is on {x.device} but the model is on {self.device}; move it first")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("the batch holds NaN or Inf values: nothing was adapted")


class MGTTADropIn(nn.Module):
    """A drop-in for the official ``MGTTA(model, mgg, adapt_lr)`` in peers' harnesses:
    ``outputs, loss = adapter(x)`` predicts on ``x``, adapts on it, and returns both detached.

    Harnesses written for the published code (its ``main.py``, TTA suites that list ``mgtta``
    beside ``tent`` or ``sar``) call the adapter this way and ``reset()`` it between corruptions;
    swapping in this class changes the construction line only. It is :class:`MGTTA` with
    ``optimizer="mgg"`` underneath (same parameters, loss and step). ``mgg`` is an :class:`MGG`
    or the path of a checkpoint (ours or the published ``{"model_state_dict": ...}`` file);
    ``source_stats`` is a :class:`SourceStats`, the path of a ``stats`` file or of the published
    ``train_info.pt``, or ``None`` for the entropy loss. Other keywords go to :class:`MGTTA`.
    Move the model to its device first."""

    def __init__(
        self,
        model: nn.Module,
        mgg: MGG | str | os.PathLike,
        adapt_lr: float = DEFAULT_LR["mgg"],
        *,
        source_stats: SourceStats | str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        device = next(model.parameters()).device
        if isinstance(mgg, (str, os.PathLike)):
            mgg = MGG.load(mgg, map_location=device)
        if isinstance(source_stats, (str, os.PathLike)):
            source_stats = SourceStats.load(source_stats, model)
        kwargs.setdefault("loss", "foa" if source_stats is not None else "entropy")
        self.adapter = MGTTA(
            model, optimizer="mgg", mgg=mgg, lr=adapt_lr, source_stats=source_stats, **kwargs
        )

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(outputs, loss)`` of the batch, both detached (the official call's return value)."""
        outputs = self.adapter(x)
        return outputs, self.adapter.last_loss

    def reset(self) -> None:
        """Back to the source model and a fresh optimizer state (as the official ``reset``)."""
        self.adapter.reset()


def _head_width(model: nn.Module) -> int | None:
    """How many classes the model predicts, where it says so without running (timm's
    ``num_classes``); ``None`` otherwise (the class mask is then checked on the first batch)."""
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _mgg_on(mgg: MGG | None, device: torch.device) -> MGG:
    if mgg is None:
        warnings.warn(
            "MGTTA(optimizer='mgg') without a trained MGG: using an untrained MGG(); meta-train one "
            "with mgg_fast.train_mgg or load one with MGG.load",
            stacklevel=3,
        )
        return MGG().to(device)
    if not isinstance(mgg, MGG):
        raise TypeError(f"mgg must be an mgg_fast.MGG, got {type(mgg).__name__}")
    return mgg if mgg.W1.device == device else copy.deepcopy(mgg).to(device)
