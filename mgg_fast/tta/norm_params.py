"""Which parameters test-time adaptation updates: the affine parameters of the norm layers.

As published (Tent, MGTTA), only the scale and shift of LayerNorm / BatchNorm / GroupNorm
layers adapt; the rest of the model is frozen, and BatchNorm normalises with the statistics of
the test batch. timm's norm layers (``LayerNorm2d``, ``BatchNormAct2d``, ``GroupNorm1``, ...)
subclass these torch classes and are included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
AFFINE_NAMES = ("weight", "bias")


def _norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def select_norm_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of every norm layer's affine weight/bias, in model order.

    Raises ``ValueError`` if the model has none (no norm layers, or none with affine parameters).
    """
    selected, seen = [], set()
    for prefix, module in _norm_modules(model):
        for local in AFFINE_NAMES:
            p = module._parameters.get(local)
            if isinstance(p, nn.Parameter) and id(p) not in seen:  # a shared norm counts once
                seen.add(id(p))
                selected.append((f"{prefix}.{local}" if prefix else local, p))
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has no LayerNorm/BatchNorm/GroupNorm layer with affine "
            "parameters: test-time adaptation has nothing to update"
        )
    return selected


def norm_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters test-time adaptation updates (what :class:`~mgg_fast.MGTTA` adapts): the
    affine weight and bias of every LayerNorm / BatchNorm / GroupNorm layer, in model order, each
    once. Pass them to :class:`~mgg_fast.MGGOptimizer` to use the learned optimizer in your own
    loop. ``ValueError`` if the model has none."""
    return [p for _, p in select_norm_params(model)]


@dataclass
class AdaptationConfig:
    """What :func:`configure_for_adaptation` changed; :meth:`restore` puts it back."""

    model: nn.Module
    training: dict[nn.Module, bool] = field(default_factory=dict)
    requires_grad: dict[nn.Parameter, bool] = field(default_factory=dict)
    batchnorm: dict[nn.Module, tuple[bool, Tensor | None, Tensor | None]] = field(default_factory=dict)

    def restore(self) -> None:
        """Restore train/eval modes, ``requires_grad`` flags and BatchNorm running statistics."""
        for m, training in self.training.items():
            m.training = training
        for p, flag in self.requires_grad.items():
            p.requires_grad_(flag)
        for m, (track, mean, var) in self.batchnorm.items():
            m.track_running_stats = track
            m.running_mean = mean
            m.running_var = var


def configure_for_adaptation(model: nn.Module) -> AdaptationConfig:
    """Prepare ``model`` for norm-layer adaptation, in place; returns the handle that undoes it.

    ``requires_grad`` only on :func:`select_norm_params`; BatchNorm layers normalise with the test
    batch's statistics (``track_running_stats=False``, running statistics set to ``None``; the
    handle keeps the originals). The norm layers are in train mode, every other module in eval
    mode: dropout and stochastic depth stay off, so the predictions and the gradients are those of
    the deployed model and a seed gives the same numbers every run. (The published Tent and
    MGTTA code calls ``model.train()``; that differs only on models with dropout or drop-path
    active, which the published ViT and ResNet are not.) Raises ``ValueError`` without norm
    params.
    """
    norm_params = {id(p) for _, p in select_norm_params(model)}  # raises before any change
    config = AdaptationConfig(model)
    for m in model.modules():
        config.training[m] = m.training
    for p in model.parameters():
        config.requires_grad[p] = p.requires_grad
    model.eval()
    for p in model.parameters():
        p.requires_grad_(id(p) in norm_params)
    for _, m in _norm_modules(model):
        m.train()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            config.batchnorm[m] = (m.track_running_stats, m.running_mean, m.running_var)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return config
