"""The bundled benchmark (the demo): small source models trained on MNIST, evaluated under the
ImageNet-C corruptions; data (:mod:`~mgg_fast.evaluation.bundled.data`), source models
(:mod:`~mgg_fast.evaluation.bundled.source_models`), the run
(:mod:`~mgg_fast.evaluation.bundled.benchmark`) and its reports
(:mod:`~mgg_fast.evaluation.bundled.report`)."""
