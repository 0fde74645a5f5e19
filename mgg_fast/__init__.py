"""mgg_fast: the Meta Gradient Generator (a learned optimizer for test-time adaptation), made fast.

Public API:
    MGG, MGGState    the learned optimizer network and its per-coordinate memory
    MGGOptimizer     a torch.optim.Optimizer performing the published MGTTA step
    MGTTA            test-time adaptation of a model's norm layers (MGG, or Tent/Adam baselines)
    fit_source_stats, SourceStats   source feature statistics for the FOA loss
    train_mgg        meta-training of an MGG on unlabeled batches
"""

from mgg_fast.adaptation import MGTTA
from mgg_fast.losses import SourceStats, fit_source_stats
from mgg_fast.meta_training import train_mgg
from mgg_fast.mgg import MGG, MGGState
from mgg_fast.optimizer import MGGOptimizer

__all__ = ["MGG", "MGTTA", "MGGOptimizer", "MGGState", "SourceStats", "fit_source_stats", "train_mgg"]
__version__ = "0.1.0"
