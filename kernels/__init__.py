"""Fused Triton kernels of the MGG optimizer (installed as ``mgg_fast.kernels``).

``mgg_step_`` runs a whole MGG optimizer step of one parameter group whose state is packed in
flat buffers (one update launch, then the step-count advance); ``fused_mgg_forward`` is the
fused MGG call alone. Their naive reference is :mod:`mgg_fast.core.reference`; the launch policy
(BLOCK x warps table, supported sizes) is :mod:`mgg_fast.kernels.launch_policy`.
"""

from .launch_policy import launch_config
from .mgg_forward import fused_mgg_forward
from .mgg_step import chunk_layout, mgg_step_

__all__ = ["chunk_layout", "fused_mgg_forward", "launch_config", "mgg_step_"]
