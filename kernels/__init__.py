"""Fused Triton kernels of the MGG optimizer step (installed as ``mgg_fast.kernels``).

``fused_group_step`` runs a whole MGG optimizer step of one parameter group: the step prologue
(``StepGuard.check``: non-finite check and step counts) and the fused update, two launches;
``fused_mgg_forward`` is the fused MGG call alone. The naive reference of both is
:mod:`mgg_fast.reference`.
"""

from .mgg_forward import fused_mgg_forward
from .mgg_step import GroupWork, fused_group_step, fused_group_update, prepare_group, rebind_update
from .step_prologue import StepGuard

__all__ = [
    "GroupWork",
    "StepGuard",
    "fused_group_step",
    "fused_group_update",
    "fused_mgg_forward",
    "prepare_group",
    "rebind_update",
]
