"""The core: the MGG math and its contract, on which everything else stands.

* :mod:`~mgg_fast.core.reference`: the pure-PyTorch reference of one MGG call and one optimizer
  step, the single source of truth (differentiable; the kernels are tested against it).
* :mod:`~mgg_fast.core.mgg`: the :class:`MGG` module (published parameter names and
  initialisation, its checkpoint format).
* :mod:`~mgg_fast.core.files`: atomic writes and weights-only loads that name the file.
"""

from mgg_fast.core.mgg import MGG, MGGState
from mgg_fast.core.reference import MGGWeights

__all__ = ["MGG", "MGGState", "MGGWeights"]
