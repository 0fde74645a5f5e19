"""Evaluation: one protocol, one statistics module, one report stack, and the suites built on them.

* :mod:`~mgg_fast.evaluation.protocol`: online accuracy on streams (episodic, continual),
  learning-rate tuning, updates-to-target; the :class:`~mgg_fast.evaluation.protocol.Runner`
  that wraps any registered method.
* :mod:`~mgg_fast.evaluation.stats`: means, t-intervals and paired differences over seeds.
* :mod:`~mgg_fast.evaluation.report`: tables, the accuracy-against-updates plot, machine info, files.
* :mod:`~mgg_fast.evaluation.images`, :mod:`~mgg_fast.evaluation.models`,
  :mod:`~mgg_fast.evaluation.corruptions`: the one image-folder loader, timm models, ImageNet-C.
* The suites, each on those pieces and never on each other: :mod:`~mgg_fast.evaluation.bundled`
  (corrupted MNIST, the demo), :mod:`~mgg_fast.evaluation.realnet` (MobileNetV2 on corrupted
  photos) and :mod:`~mgg_fast.evaluation.folders` (your model on your folders).
"""
