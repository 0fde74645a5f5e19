"""Meta-training of the MGG: the published one-step truncated scheme and K-step truncated unrolls.

At step t the model runs with its norm parameters ``p_t`` (a functional substitute, the model's
own parameters are never changed) and gives the loss ``L_t``. Its (detached) gradient ``g_t``
feeds the moments and features, the MGG runs *with* autograd and ``p_{t+1} = p_t - adapt_lr * u_t``.

Truncation over ``unroll = K`` steps: the losses of a window of K steps are summed and
back-propagated through the parameters *and* the MGG memory of the window (the gradients ``g_t``
stay detached: no second-order terms), Adam updates the MGG, and the parameters and memory are
detached before the next window. ``K = 1`` is the published scheme: each loss reaches the MGG
output that produced ``p_t`` (one step back), and the memory is detached between steps.
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

import mgg_fast.tta.data_parallel as distributed
from mgg_fast.core.arguments import beta_pair, finite_number, whole_number
from mgg_fast.core.mgg import MGG, MGGState, check_sizes
from mgg_fast.core.reference import optimizer_step
from mgg_fast.tta.batches import batch_inputs
from mgg_fast.tta.losses import AdaptationLoss
from mgg_fast.tta.norm_params import configure_for_adaptation, select_norm_params
from mgg_fast.tta.source_stats import SourceStats

MOMENT_EPS = 1e-8
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


class MetaTrainer:
    """Truncated meta-training of an MGG on a model's norm parameters (see the module doc).

    :meth:`step` runs one batch and returns ``{"loss": float, "meta_step": bool, "mgg_grads":
    {name: tensor or None}}``: whether the window closed at this batch (every ``unroll``-th
    batch of a run) and the MGG gradients the meta-optimizer saw then, before its step (all
    ``None`` inside a window). :meth:`flush` closes a partial window. The model is
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
        unroll: K, the adaptation steps per truncation window (1: as published).
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
        unroll: int = 1,
        data_parallel: bool = False,
    ):
        mgg_lr, adapt_lr = finite_number("mgg_lr", mgg_lr), finite_number("adapt_lr", adapt_lr)
        betas, eps = beta_pair("betas", betas), finite_number("eps", eps)
        unroll = whole_number("unroll", unroll, 1)
        if not isinstance(mgg, MGG):
            raise TypeError(f"mgg must be an mgg_fast.MGG, got {type(mgg).__name__}")
        if data_parallel:
            distributed.require_process_group("meta-training with data_parallel=True")
        named = select_norm_params(model)
        self.device = named[0][1].device
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
        self.unroll = unroll
        self._initial = {name: p.detach() for name, p in named}
        self.meta_optimizer = torch.optim.Adam(mgg.parameters(), lr=mgg_lr)
        self._config = configure_for_adaptation(model)
        self.reset()

    def reset(self, params: bool = True) -> None:
        """Start a new adaptation run: zero moments, no MGG memory, step 0, no open window; and,
        with ``params``, the original norm params (``False`` keeps the current ones, detached:
        the published recipe lets them drift from one epoch to the next)."""
        dtype = self.mgg.W1.dtype
        start = self._initial if params else self.params
        self.params: dict[str, Tensor] = {
            name: p.detach().clone().requires_grad_(True) for name, p in start.items()
        }
        n = sum(p.numel() for p in self.params.values())
        self.exp_avg = torch.zeros(n, dtype=dtype, device=self.device)
        self.exp_avg_sq = torch.zeros(n, dtype=dtype, device=self.device)
        self.state: MGGState | None = None
        self.num_steps = 0
        self._window: list[Tensor] = []

    def step(self, batch: Tensor | Sequence[Any]) -> dict[str, Any]:
        """One batch (a tensor, or ``(x, y)`` with ``y`` ignored): its loss, the meta-update if it
        closes a window, then the adaptation step."""
        x = batch_inputs(batch).to(self.device)
        params = list(self.params.values())
        _, loss = self.loss_fn(lambda: functional_call(self.model, self.params, (x,)))
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"meta-training loss is {loss.item()} at step {self.num_steps + 1}")
        self._window.append(loss)
        closes = len(self._window) == self.unroll
        if closes:  # one backward gives both g_t (the last loss alone depends on p_t) and the MGG grads
            for p in params:
                if not p.is_leaf:
                    p.retain_grad()
            mgg_grads = self._meta_update()
            grads = [p.grad for p in params]
        else:
            grads = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            if self.data_parallel:
                distributed.average_tensors([g for g in grads if g is not None])
            mgg_grads = {name: None for name, _ in self.mgg.named_parameters()}
        self._adapt(
            [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
        )
        return {"loss": float(loss.detach()), "meta_step": closes, "mgg_grads": mgg_grads}

    def flush(self) -> dict[str, Tensor | None] | None:
        """Close a partial window (meta-update on its losses); ``None`` if none is open."""
        return self._meta_update() if self._window else None

    def _meta_update(self) -> dict[str, Tensor | None]:
        """Back-propagate the window's summed loss, step the MGG, truncate the graph."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        torch.stack(self._window).sum().backward()
        self._window = []
        if self.data_parallel:
            distributed.average_gradients([*self.params.values(), *self.mgg.parameters()])
        mgg_grads = {
            name: None if p.grad is None else p.grad.detach().clone()
            for name, p in self.mgg.named_parameters()
        }
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.params = {name: p.detach() for name, p in self.params.items()}
        if self.state is not None:
            self.state = MGGState(self.state.W1.detach(), self.state.b1.detach())
        return mgg_grads

    def _adapt(self, grads: list[Tensor]) -> None:
        """p_{t+1} = p_t - adapt_lr * MGG(features(g_t)), with autograd into the MGG and, inside a
        window, through p_t and the memory: the reference's differentiable optimizer step."""
        self.num_steps += 1
        dtype = self.exp_avg.dtype
        params = list(self.params.values())
        grad = torch.cat([g.reshape(-1) for g in grads]).to(dtype)
        beta1, beta2 = self.betas
        if self.state is None:  # the learned memory, tiled (gradients reach W1 and b1)
            n = grad.shape[0]
            W = self.mgg.W1.unsqueeze(0).expand(n, -1, -1, -1)
            b = self.mgg.b1[:, 0, :].unsqueeze(0).expand(n, -1, -1)
        else:
            W, b = self.state
        update, self.exp_avg, self.exp_avg_sq, W_new, b_new = optimizer_step(
            grad, self.exp_avg, self.exp_avg_sq, W, b, self.num_steps, self.mgg.weights(),
            beta1=beta1, beta2=beta2, eps=self.eps,
        )  # fmt: skip
        self.state = MGGState(W_new, b_new)
        flat = torch.cat([p.reshape(-1).to(dtype) for p in params]) - self.adapt_lr * update
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
    unroll: int = 1,
    shuffle: bool = False,
    reset_params: bool = True,
    history: list[dict[str, float]] | None = None,
    data_parallel: bool = False,
    patience: int | None = None,
    min_delta: float = 1e-3,
) -> MGG:
    """Meta-train an MGG on unlabeled batches of ``model`` (labels in ``(x, y)`` batches are ignored).

    Every epoch starts a fresh adaptation run (zero moments, empty MGG memory, step 0, and with
    ``reset_params`` the original norm params; ``False`` lets them drift across epochs, as the
    published ``init_state()`` does); the MGG and its Adam state carry over. ``unroll`` is the
    truncation window K (see :class:`MetaTrainer`); a partial window at the end of an epoch is
    closed there. ``shuffle`` re-draws the order of the images every epoch (a seeded shuffled
    loader with the size of the first batch; the last batch may be smaller). ``history``, if
    given, receives ``{"epoch", "mean_loss", "score"}`` per epoch. ``batches`` must be re-iterable for
    ``epochs > 1`` (a list or a DataLoader). ``mgg=None`` creates ``MGG(hidden_size, num_heads)``
    seeded by ``seed`` (the global RNG is restored afterwards); a given MGG is trained in place
    (moved to the model's device). ``validate(mgg) -> float`` (higher is better) runs after each
    epoch; the model's state is restored after each call, and a deep copy of the best-scoring MGG
    is returned, the latest of equal scores (a flat validation curve keeps the most trained MGG).
    Without ``validate`` the final MGG is returned. ``patience``: stop early once the epoch's
    mean meta-loss has not improved on the best by more than ``min_delta`` (relative) for that
    many epochs (``epochs`` is then the most); ``history`` entries also count the meta-updates.
    The model is left as it was.
    ``data_parallel``: see :class:`MetaTrainer` (each rank passes its part of every batch;
    progress is shown on rank 0 only). ``progress`` draws one bar over all epochs' batches (the
    epoch and the losses in its postfix).

    Every numeric argument is checked before anything changes (a ``TypeError``/``ValueError``
    naming it), and a call that fails later (a non-finite loss, an epoch without batches, a
    ``validate`` that raises) puts a given MGG back as it was (weights, device, gradients) and
    ``history`` too: a failed call changes nothing. An epoch of fewer than two batches is a
    ``ValueError``: an epoch's first batch gives the MGG no meta-gradient (its loss comes before
    the epoch's first MGG update), so one batch per epoch would return the MGG untrained.
    """
    epochs = whole_number("epochs", epochs, 1)
    seed = whole_number("seed", seed, SEED_RANGE[0], SEED_RANGE[1])
    check_sizes(hidden_size, num_heads)
    finite_number("mgg_lr", mgg_lr)
    finite_number("adapt_lr", adapt_lr)
    beta_pair("betas", betas)
    whole_number("unroll", unroll, 1)
    if mgg is not None and not isinstance(mgg, MGG):
        raise TypeError(f"mgg must be an mgg_fast.MGG, got {type(mgg).__name__}")
    if history is not None and not isinstance(history, list):
        raise TypeError(f"history must be a list (or None), got {type(history).__name__}")
    device = select_norm_params(model)[0][1].device
    progress = progress and distributed.is_rank_zero()
    rng_devices = [device] if device.type == "cuda" else []
    given = _Snapshot(mgg) if mgg is not None else None
    logged = len(history) if history is not None else 0
    best: MGG | None = None
    best_score = -math.inf
    best_loss, stale, meta_updates = math.inf, 0, 0
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            mgg = MGG(hidden_size, num_heads) if mgg is None else mgg
            mgg.to(device)
            order = _Shuffler(batches, seed) if shuffle else None
            per_epoch = order.batches if order is not None else _length(batches)
            bar = tqdm(
                total=None if per_epoch is None else epochs * per_epoch,
                desc="meta-train MGG",
                unit="batch",
                disable=not progress,
                leave=False,
            )
            with (
                bar,
                MetaTrainer(
                    model,
                    mgg,
                    mgg_lr=mgg_lr,
                    adapt_lr=adapt_lr,
                    loss=loss,
                    source_stats=source_stats,
                    betas=betas,
                    unroll=unroll,
                    data_parallel=data_parallel,
                ) as trainer,
            ):
                for epoch in range(epochs):
                    trainer.reset(params=reset_params or epoch == 0)
                    epoch_batches = order.epoch() if order is not None else batches
                    mean_loss, updates = _run_epoch(trainer, epoch_batches, f"{epoch + 1}/{epochs}", bar)
                    meta_updates += updates
                    score = _validate(model, mgg, validate) if validate is not None else math.nan
                    if validate is not None:
                        if progress:
                            bar.write(f"meta-train epoch {epoch + 1}/{epochs}: validation score {score:.4f}")
                        if best is None or score >= best_score:  # ties: the more trained MGG
                            best, best_score = copy.deepcopy(mgg), score
                    if history is not None:
                        history.append(
                            {
                                "epoch": epoch + 1,
                                "mean_loss": mean_loss,
                                "score": score,
                                "meta_updates": meta_updates,
                            }
                        )
                    improved = best_loss == math.inf or mean_loss < best_loss - min_delta * abs(best_loss)
                    best_loss, stale = (mean_loss, 0) if improved else (min(best_loss, mean_loss), stale + 1)
                    if patience is not None and stale >= patience:
                        break
    except BaseException:
        if given is not None:
            given.restore()
        if history is not None:
            del history[logged:]
        raise
    return mgg if best is None else best


def _run_epoch(trainer: MetaTrainer, batches: Iterable[Any], label: str, bar: Any) -> tuple[float, int]:
    """One pass of ``trainer`` over ``batches`` (its partial window closed), drawn on ``bar``; the
    mean loss and the number of meta-updates. Fewer than two batches is an error (see
    :func:`_check_epoch`)."""
    total, updates = 0.0, 0
    for batch in batches:
        result = trainer.step(batch)
        total += result["loss"]
        updates += result["meta_step"]
        bar.update()
        bar.set_postfix(epoch=label, loss=f"{result['loss']:.4f}", mean=f"{total / trainer.num_steps:.4f}")
    _check_epoch(label, trainer.num_steps)
    updates += trainer.flush() is not None
    return total / trainer.num_steps, updates


def _length(batches: Iterable[Any]) -> int | None:
    """The number of batches of an epoch, where ``batches`` knows it (a list, a DataLoader)."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_epoch(label: str, steps: int) -> None:
    """An epoch must have two batches or more: the loss of its first batch is computed before any
    MGG output has moved the parameters (each epoch is a fresh adaptation run), so it sends no
    gradient to the MGG, and an epoch of one batch would return the MGG unchanged."""
    if steps == 0:
        raise ValueError(f"epoch {label} got no batches (is `batches` a one-shot iterator?)")
    if steps == 1:
        raise ValueError(
            f"epoch {label.split('/')[0]} has 1 batch, and the first batch of an epoch gives the MGG no "
            "meta-gradient (its loss comes before the epoch's first MGG update): training would "
            "leave the MGG unchanged; give at least 2 batches per epoch (smaller batches or more images)"
        )


class _Snapshot:
    """A given MGG's parameters as they were (values, device, gradients), to put back when
    :func:`train_mgg` fails: it trains that MGG in place."""

    def __init__(self, mgg: MGG):
        self.saved = [
            (p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
            for p in mgg.parameters()
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for p, data, grad in self.saved:
                p.data = data
                p.grad = grad


class _Shuffler:
    """A seeded shuffled loader over the images of ``batches``: a new permutation every epoch."""

    def __init__(self, batches: Iterable[Tensor | Sequence[Any]], seed: int):
        inputs = [batch_inputs(b) for b in batches]
        if not inputs:
            raise ValueError("shuffle=True got no batches")
        self.images = torch.cat(inputs)
        self.batch_size = len(inputs[0])
        self.batches = math.ceil(len(self.images) / self.batch_size)  # per epoch
        self.generator = torch.Generator().manual_seed(seed)

    def epoch(self) -> list[Tensor]:
        perm = torch.randperm(len(self.images), generator=self.generator).to(self.images.device)
        return list(self.images[perm].split(self.batch_size))


def _validate(model: nn.Module, mgg: MGG, validate: Callable[[MGG], float]) -> float:
    """Call ``validate(mgg)``, then put the model's parameters and buffers back."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        return float(validate(mgg))
    finally:
        model.load_state_dict(saved)
