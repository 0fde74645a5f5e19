"""Fused Triton kernels of the MGG optimizer step (installed as ``mgg_fast.kernels``).

``fused_group_step`` runs a whole MGG optimizer step of one parameter group in one pass over
memory; ``fused_mgg_forward`` is the fused MGG call alone. The naive reference of both is
:mod:`mgg_fast.reference`.
"""

from .mgg_forward import fused_mgg_forward
from .mgg_step import fused_group_step

__all__ = ["fused_group_step", "fused_mgg_forward"]
