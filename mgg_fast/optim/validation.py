"""The checks of :class:`~mgg_fast.optim.optimizer.MGGOptimizer`: hyper-parameters, parameters,
gradients, the MGG and saved counters. Each raises a clear error and changes nothing; the
optimizer runs them before anything is written, so a step or a load that fails leaves
parameters and state as they were."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mgg_fast.core.mgg import MGG
from mgg_fast.optim.dtensor import is_dtensor, local_tensor

STATE_DTYPES = (torch.float32, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The skip counter is saved in every parameter group too: DCP keeps only "state" and "param_groups".
SKIPPED_GROUP_KEY = "mgg_fast_skipped_steps"


def real(value: Any) -> float | None:
    """``value`` as a float if it is a real number or a one-element real tensor, else ``None``."""
    if type(value) is float:
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def hyperparams(group: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """``(lr, beta1, beta2, eps)`` of a group, checked: finite, lr and eps >= 0, betas in [0, 1)."""
    lr, betas, eps = group["lr"], group["betas"], group["eps"]
    lr_value = real(lr)
    if lr_value is None or not math.isfinite(lr_value) or lr_value < 0:
        raise ValueError(f"invalid learning rate {lr!r}: it must be a finite number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid betas {betas!r}: a pair of numbers in [0, 1)")
    beta1, beta2 = (real(b) for b in betas)
    if beta1 is None or beta2 is None or not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"invalid betas {betas!r}: each must be in [0, 1)")
    eps_value = real(eps)
    if eps_value is None or not math.isfinite(eps_value) or eps_value < 0:
        raise ValueError(f"invalid eps {eps!r}: it must be a finite number >= 0")
    return lr_value, beta1, beta2, eps_value


def check_group_params(params: Sequence[Any]) -> None:
    """A parameter group's tensors: at least one, each a floating tensor of a supported dtype
    (DTensors with Shard or Replicate placements), listed once, all on one device."""
    if not params:
        raise ValueError("a parameter group needs at least one parameter")
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"MGGOptimizer can only optimize tensors, got {type(p).__name__}")
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"MGGOptimizer supports {PARAM_DTYPES} parameters, got {p.dtype}")
        if is_dtensor(p) and any(pl.is_partial() for pl in p.placements):
            raise ValueError(
                f"a DTensor parameter with Partial placements {tuple(p.placements)} has no local "
                "values to step: redistribute it to Shard or Replicate placements first"
            )
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter appears more than once in the group: list each parameter once")
    if len({p.device for p in params}) > 1:
        raise ValueError("all parameters of one group must be on the same device")


def check_mgg_dtype(mgg: MGG) -> None:
    if mgg.W1.dtype not in STATE_DTYPES:
        raise TypeError(f"the MGG must be float32 or float64 (it holds the state dtype), got {mgg.W1.dtype}")


def check_mgg(mgg: MGG) -> None:
    """An MGG the optimizer can use: float32/float64, every weight finite."""
    check_mgg_dtype(mgg)
    for name, t in mgg.named_parameters():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"the MGG's {name} holds NaN or Inf values")


def local_grad(p: Tensor, g: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor parameter's gradient, which must be laid out as the
    parameter is (same mesh and placements: FSDP2's reduce-scattered gradients are)."""
    if g is None:
        return None
    if is_dtensor(p) != is_dtensor(g):
        kinds = ("a plain tensor", "a DTensor")
        raise TypeError(f"the gradient is {kinds[is_dtensor(g)]} but the parameter is {kinds[is_dtensor(p)]}")
    if is_dtensor(p) and (g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements)):
        raise ValueError(
            f"the gradient is laid out as {tuple(g.placements)} on {g.device_mesh}, the parameter as "
            f"{tuple(p.placements)} on {p.device_mesh}: reduce it to the parameter's placements first"
        )
    return local_tensor(g)


def check_grad(p: Tensor, g: Tensor, device: torch.device) -> None:
    """A gradient the step can use for parameter ``p``: dense, of its shape, dtype and device."""
    if g.layout != torch.strided:
        raise RuntimeError(f"MGGOptimizer supports dense (strided) gradients only, got {g.layout}")
    if g.shape != p.shape:
        raise ValueError(f"gradient shape {list(g.shape)} does not match parameter shape {list(p.shape)}")
    if g.dtype != p.dtype:
        raise TypeError(f"gradient dtype {g.dtype} does not match parameter dtype {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"gradient on {g.device} but parameter on {p.device}")
    if p.device != device:
        raise ValueError(f"parameter on {p.device} but the MGG is on {device}")


def saved_skip_count(extra: Mapping[str, Any], groups: list[Any]) -> int:
    """The skip counter of a state dict: its ``mgg_fast`` entry's, else the first parameter
    group's (a DCP checkpoint has no ``mgg_fast`` entry), else 0; checked: a whole number >= 0."""
    value = extra.get("skipped_steps")
    if value is None:
        saved = (g[SKIPPED_GROUP_KEY] for g in groups if isinstance(g, Mapping) and SKIPPED_GROUP_KEY in g)
        value = next(saved, 0)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid skipped-step count {value!r} in the state dict: a whole number >= 0")
    return value
