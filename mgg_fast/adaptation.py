"""The import path of ``MGTTA`` and ``MGTTADropIn`` before the layers had packages; they live in
:mod:`mgg_fast.tta.mgtta` (or ``from mgg_fast import MGTTA, MGTTADropIn``)."""

from mgg_fast.tta.mgtta import DEFAULT_LR, MGTTA, MGTTADropIn

__all__ = ["DEFAULT_LR", "MGTTA", "MGTTADropIn"]
