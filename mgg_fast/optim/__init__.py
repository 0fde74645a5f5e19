"""The MGG as a ``torch.optim.Optimizer``.

* :mod:`~mgg_fast.optim.optimizer`: :class:`MGGOptimizer` (torch's contract: groups, state,
  state dicts, hooks, copies; the whole-step non-finite decision).
* :mod:`~mgg_fast.optim.functional`: :func:`mgg_step`, the step of one packed group on a backend.
* :mod:`~mgg_fast.optim.packed_state`: a group's state in flat buffers, ``state[p]`` as views.
* :mod:`~mgg_fast.optim.validation`: every check, before anything changes.
* :mod:`~mgg_fast.optim.dtensor`: DTensor shards and the ranks' joint decisions.
"""

from mgg_fast.optim.functional import mgg_step
from mgg_fast.optim.optimizer import MGGOptimizer

__all__ = ["MGGOptimizer", "mgg_step"]
