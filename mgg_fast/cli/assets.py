"""``assets``: make the shipped source models and meta-trained MGGs again (see
:mod:`mgg_fast.evaluation.bundled.make_assets`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mgg_fast.cli.common import (
    benchmark_options,
    cache_options,
    check_output_folder,
    common_options,
    list_of,
    positive_int,
    resolve_device,
    say,
)


def add_parser(sub: Any, fmt: dict[str, Any]) -> None:
    """The ``assets`` subcommand's options."""
    p = sub.add_parser(
        "assets",
        **fmt,
        help="train the source models and MGGs the demo ships (into --out)",
        description="Train the bundled benchmark's source models and meta-train its MGGs exactly as a run "
        "with --retrain would, into --out, with a manifest (sha256, command, versions, machine); without "
        "--cache-dir in a fresh temporary cache, so the files depend on the command alone. To ship them: "
        "--out mgg_fast/evaluation/bundled/assets.",
    )
    benchmark_options(p)
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds --seed, --seed+1, ...")
    p.add_argument("--recipes", type=list_of(str), default=["demo"], help="meta-training recipes")
    p.add_argument(
        "--n-meta", type=positive_int, default=None, help="meta-training images (unset: the regime's)"
    )
    p.add_argument("--meta-epochs", type=positive_int, default=None, help="most meta-training epochs")
    cache_options(p)
    common_options(p, threads=1)
    p.set_defaults(run=run, pin_numerics=True)


def run(args: argparse.Namespace) -> None:
    """Make the assets into ``--out``."""
    from mgg_fast.cli.bundled import benchmark_config
    from mgg_fast.evaluation.bundled.make_assets import make_assets

    check_output_folder(args.out)
    cfg = benchmark_config(args, resolve_device(args.device))
    cfg.n_seeds, cfg.recipes, cfg.threads = args.seeds, tuple(args.recipes), args.threads
    if args.n_meta is not None:
        cfg.n_meta = args.n_meta
    if args.meta_epochs is not None:
        cfg.meta_epochs = args.meta_epochs
    path = make_assets(Path(args.out), cfg, cache_dir=args.cache_dir, log=say)
    say(f"wrote {path}")
