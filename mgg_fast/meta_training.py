"""Meta-training of the MGG: the published one-step truncated scheme, on unlabeled batches.

At step t the model runs with its norm parameters ``p_t`` (a functional substitute, the model's
own parameters are never changed). The loss is back-propagated; its gradient w.r.t. ``p_t``
flows into the MGG output that produced ``p_t`` (one step back), and Adam updates the MGG. Then
the (detached) gradient ``g_t`` feeds the moments and features, the MGG runs *with* autograd
(its memory carried but detached between steps), and ``p_{t+1} = p_t.detach() - adapt_lr * u_t``
keeps a graph to the MGG only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mgg_fast import distributed
from mgg_fast.losses import AdaptationLoss, SourceStats, _batch_inputs
from mgg_fast.mgg import MGG, MGGState
from mgg_fast.norm_params import configure_for_adaptation, select_norm_params
from mgg_fast.reference import bias_corrections, moment_features_

MOMENT_EPS = 1e-8


class MetaTrainer:
    """One-step truncated meta-training of an MGG on a model's norm parameters.

    :meth:`step` runs one batch and returns ``{"loss": float, "mgg_grads": {name: tensor or
    None}}``, the MGG gradients as the meta-optimizer saw them (before its step). The model is
    configured for adaptation while the trainer is open (use it as a context manager, or call
    :meth:`close`). The MGG is trained in place and must be on the model's device.

    Args:
        model: the model whose norm params are adapted (never modified itself).
        mgg: the MGG to train (float32 or float64; the moments use its dtype).
        mgg_lr: Adam learning rate of the MGG (0 leaves it unchanged).
        adapt_lr: step size of the simulated adaptation ``p -= adapt_lr * u``.
        loss: ``"foa"`` (needs ``source_stats``), ``"entropy"`` or a callable
            ``model outputs -> scalar``.
        betas, eps: moment coefficients, as in :class:`MGGOptimizer`.
        data_parallel: each rank of the default process group runs its part of every batch
            (the same size on every rank): rank 0's MGG is broadcast at construction, the
            gradients of the adapted parameters and of the MGG are averaged over the ranks
            before they are used, and the FOA feature statistics are the whole batch's, so every
            rank trains the same MGG, as one process on the union of the batches would.
    """

    def __init__(
        self,
        model: nn.Module,
        mgg: MGG,
        *,
        mgg_lr: float = 1e-2,
        adapt_lr: float = 1e-4,
        loss: str | Callable[[Tensor], Tensor] = "foa",
        source_stats: SourceStats | None = None,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = MOMENT_EPS,
        data_parallel: bool = False,
    ):
        if data_parallel:
            distributed.require_process_group("meta-training with data_parallel=True")
        named = select_norm_params(model)
        self.device = named[0][1].device
        if not isinstance(mgg, MGG):
            raise TypeError(f"mgg must be an mgg_fast.MGG, got {type(mgg).__name__}")
        if mgg.W1.device != self.device:
            raise ValueError(f"the MGG is on {mgg.W1.device} but the model is on {self.device}")
        self.loss_fn = AdaptationLoss(
            model, loss, source_stats, gather=distributed.gather_batch if data_parallel else None
        )
        self.data_parallel = data_parallel
        if data_parallel:
            distributed.broadcast_from_rank_zero(mgg.parameters())
        self.model = model
        self.mgg = mgg
        self.adapt_lr = adapt_lr
        self.betas = betas
        self.eps = eps
        self._initial = {name: p.detach() for name, p in named}
        self.meta_optimizer = torch.optim.Adam(mgg.parameters(), lr=mgg_lr)
        self._config = configure_for_adaptation(model)
        self.reset()

    def reset(self) -> None:
        """Start a new adaptation run: original params, zero moments, no MGG memory, step 0."""
        dtype = self.mgg.W1.dtype
        self.params: dict[str, Tensor] = {
            name: p.clone().requires_grad_(True) for name, p in self._initial.items()
        }
        n = sum(p.numel() for p in self.params.values())
        self.exp_avg = torch.zeros(n, dtype=dtype, device=self.device)
        self.exp_avg_sq = torch.zeros(n, dtype=dtype, device=self.device)
        self.state: MGGState | None = None
        self.num_steps = 0

    def step(self, batch: Tensor | Sequence[Any]) -> dict[str, Any]:
        """One batch (a tensor, or ``(x, y)`` with ``y`` ignored): meta-update, then adapt."""
        x = _batch_inputs(batch).to(self.device)
        for p in self.params.values():
            if not p.is_leaf:
                p.retain_grad()
        _, loss = self.loss_fn(lambda: functional_call(self.model, self.params, (x,)))
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"meta-training loss is {loss.item()} at step {self.num_steps + 1}")
        self.meta_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.data_parallel:
            distributed.average_gradients([*self.params.values(), *self.mgg.parameters()])
        mgg_grads = {
            name: None if p.grad is None else p.grad.detach().clone()
            for name, p in self.mgg.named_parameters()
        }
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self._adapt()
        return {"loss": float(loss.detach()), "mgg_grads": mgg_grads}

    def _adapt(self) -> None:
        """p_{t+1} = p_t - adapt_lr * MGG(features(g_t)), with autograd into the MGG."""
        self.num_steps += 1
        dtype = self.exp_avg.dtype
        params = list(self.params.values())
        grad = torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
        ).to(dtype)
        beta1, beta2 = self.betas
        bc1, bc2 = bias_corrections(self.num_steps, beta1, beta2)
        features = moment_features_(grad, self.exp_avg, self.exp_avg_sq, bc1, bc2, beta1, beta2, self.eps)
        update, self.state = self.mgg(features, self.state)
        flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in params]) - self.adapt_lr * update
        chunks = flat.split([p.numel() for p in params])
        self.params = {
            name: chunk.view(p.shape).to(p.dtype)
            for (name, p), chunk in zip(self.params.items(), chunks, strict=True)
        }

    def close(self) -> None:
        """Undo the model's adaptation configuration."""
        self._config.restore()

    def __enter__(self) -> MetaTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train_mgg(
    model: nn.Module,
    batches: Iterable[Tensor | Sequence[Any]],
    *,
    epochs: int = 1,
    mgg: MGG | None = None,
    mgg_lr: float = 1e-2,
    adapt_lr: float = 1e-4,
    loss: str | Callable[[Tensor], Tensor] = "foa",
    source_stats: SourceStats | None = None,
    betas: tuple[float, float] = (0.9, 0.99),
    seed: int = 0,
    validate: Callable[[MGG], float] | None = None,
    progress: bool = True,
    hidden_size: int = 8,
    num_heads: int = 1,
    data_parallel: bool = False,
) -> MGG:
    """Meta-train an MGG on unlabeled batches of ``model`` (labels in ``(x, y)`` batches are ignored).

    Every epoch starts a fresh adaptation run (original norm params, zero moments, empty MGG
    memory); the MGG and its Adam state carry over. ``batches`` must be re-iterable for
    ``epochs > 1`` (a list or a DataLoader). ``mgg=None`` creates ``MGG(hidden_size, num_heads)``
    seeded by ``seed`` (the global RNG is restored afterwards); a given MGG is trained in place
    (moved to the model's device). ``validate(mgg) -> float`` (higher is better) runs after each
    epoch; the model's state is restored after each call, and a deep copy of the best-scoring MGG
    is returned. Without ``validate`` the final MGG is returned. The model is left as it was.
    ``data_parallel``: see :class:`MetaTrainer` (each rank passes its part of every batch;
    progress is shown on rank 0 only).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = select_norm_params(model)[0][1].device
    progress = progress and distributed.is_rank_zero()
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        mgg = MGG(hidden_size, num_heads) if mgg is None else mgg
        mgg.to(device)
        best: MGG | None = None
        best_score = -math.inf
        with MetaTrainer(
            model,
            mgg,
            mgg_lr=mgg_lr,
            adapt_lr=adapt_lr,
            loss=loss,
            source_stats=source_stats,
            betas=betas,
            data_parallel=data_parallel,
        ) as trainer:
            for epoch in range(epochs):
                trainer.reset()
                bar = tqdm(batches, desc=f"meta-train {epoch + 1}/{epochs}", disable=not progress)
                total = 0.0
                for batch in bar:
                    loss_t = trainer.step(batch)["loss"]
                    total += loss_t
                    bar.set_postfix(loss=f"{loss_t:.4f}", mean=f"{total / trainer.num_steps:.4f}")
                if trainer.num_steps == 0:
                    raise ValueError(f"epoch {epoch + 1} got no batches (is `batches` a one-shot iterator?)")
                if validate is not None:
                    score = _validate(model, mgg, validate)
                    if progress:
                        tqdm.write(f"meta-train {epoch + 1}/{epochs}: validation score {score:.4f}")
                    if best is None or score > best_score:
                        best, best_score = copy.deepcopy(mgg), score
    return mgg if best is None else best


def _validate(model: nn.Module, mgg: MGG, validate: Callable[[MGG], float]) -> float:
    """Call ``validate(mgg)``, then put the model's parameters and buffers back."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        return float(validate(mgg))
    finally:
        model.load_state_dict(saved)
