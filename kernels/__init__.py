"""Fused Triton kernels of the MGG optimizer step (installed as ``mgg_fast.kernels``).

``fused_group_step`` runs a whole MGG optimizer step of one parameter group: the step prologue
(``StepGuard.check``: non-finite check and step counts) and the fused update, two launches;
``single_launch_step`` does the same step in one launch (opt-in, ``forced_single_launch``);
``fused_mgg_forward`` is the fused MGG call alone. The naive reference of all of them is
:mod:`mgg_fast.reference`.
"""

from .mgg_forward import fused_mgg_forward
from .mgg_step import GroupWork, fused_group_step, fused_group_update, prepare_group, rebind_update
from .mgg_step_single import forced_single_launch, single_launch_step, use_single_launch
from .step_prologue import StepGuard

__all__ = [
    "GroupWork",
    "StepGuard",
    "forced_single_launch",
    "fused_group_step",
    "fused_group_update",
    "fused_mgg_forward",
    "prepare_group",
    "rebind_update",
    "single_launch_step",
    "use_single_launch",
]
