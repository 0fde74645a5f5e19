"""``stats``: FOA source statistics of your timm model over clean images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mgg_fast.cli.common import BenchmarkConfig, common_options, list_of, positive_int, user_model_options


def add_parser(sub: Any, fmt: dict[str, Any]) -> None:
    """The ``stats`` subcommand's options."""
    p = sub.add_parser(
        "stats",
        **fmt,
        description="Per-feature std and mean of the model's features (CLS token after every block for "
        "ViTs, pooled stage outputs for CNNs) over clean source images, saved for the FOA loss.",
    )
    p.add_argument("--data", required=True, help="ROOT of clean images (imagefolder, or imagenet-c layout)")
    p.add_argument("--output", type=Path, default=Path("stats.pt"), help="where to save the statistics")
    p.add_argument("--images", type=positive_int, default=512, help="at most this many images")
    p.add_argument("--batch-size", type=positive_int, default=BenchmarkConfig.batch_size)
    p.add_argument("--corruptions", type=list_of(str), default=None, help="imagenet-c layout: folders")
    user_model_options(p, required=True)
    common_options(p, seed="seed of the images chosen and their order")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Fit and save the statistics (:func:`mgg_fast.cli.own_model.cmd_stats`)."""
    from mgg_fast.cli.own_model import cmd_stats

    cmd_stats(args)
