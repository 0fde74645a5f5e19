"""mgg_fast: the Meta Gradient Generator (a learned optimizer for test-time adaptation), made fast.

Public API:
    MGG, MGGState    the learned optimizer network and its per-coordinate memory
    MGGOptimizer     a torch.optim.Optimizer performing the published MGTTA step
"""

from mgg_fast.mgg import MGG, MGGState
from mgg_fast.optimizer import MGGOptimizer

__all__ = ["MGG", "MGGOptimizer", "MGGState"]
__version__ = "0.1.0"
