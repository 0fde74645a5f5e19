"""Fused Triton kernels of the MGG optimizer (installed as ``mgg_fast.kernels``).

``mgg_step_`` runs a whole MGG optimizer step of one parameter group whose state is packed in
flat buffers (one update launch, then the step-count advance); ``fused_mgg_forward`` is the
fused MGG call alone. Their naive reference is :mod:`mgg_fast.core.reference`; the launch policy
(BLOCK x warps table, supported sizes, the interpreter flag) is
:mod:`mgg_fast.kernels.launch_policy`. The kernels are defined on first use of these names:
importing the launch policy alone defines none (Triton decides at definition whether it
interprets).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "chunk_layout": "mgg_step",
    "mgg_step_": "mgg_step",
    "fused_mgg_forward": "mgg_forward",
    "launch_config": "launch_policy",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
