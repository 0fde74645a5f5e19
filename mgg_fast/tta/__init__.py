"""Test-time adaptation: the methods and what they share.

* :mod:`~mgg_fast.tta.norm_params`: which parameters adapt (norm-layer affines) and the model's
  configuration for it.
* :mod:`~mgg_fast.tta.losses` and :mod:`~mgg_fast.tta.source_stats`: entropy, FOA and the
  source feature statistics.
* :mod:`~mgg_fast.tta.mgtta` (the base class, MGG / Tent / Adam), :mod:`~mgg_fast.tta.sar`,
  :mod:`~mgg_fast.tta.eata`: one file per method; :mod:`~mgg_fast.tta.registry` names them.
* :mod:`~mgg_fast.tta.meta_training`: training the MGG itself.
* :mod:`~mgg_fast.tta.data_parallel`: the same over several processes.
"""

from mgg_fast.tta.eata import EATA, eata_fisher
from mgg_fast.tta.meta_training import train_mgg
from mgg_fast.tta.mgtta import MGTTA, MGTTADropIn
from mgg_fast.tta.norm_params import norm_params
from mgg_fast.tta.sar import SAR
from mgg_fast.tta.source_stats import SourceStats, fit_source_stats

__all__ = [
    "EATA",
    "MGTTA",
    "SAR",
    "MGTTADropIn",
    "SourceStats",
    "eata_fisher",
    "fit_source_stats",
    "norm_params",
    "train_mgg",
]
