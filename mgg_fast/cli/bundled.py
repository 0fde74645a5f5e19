"""What the commands on the bundled models share (``demo``, ``train``, ``adapt`` without
``--model``): the benchmark's configuration from the options, the source models, a folder of
images at their input size, and the printed and written reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgg_fast.cli.common import say, show_progress

if TYPE_CHECKING:
    import torch


def benchmark_config(args: argparse.Namespace, device: torch.device) -> Any:
    """The benchmark's configuration: the regime's (``--regime``), changed by the options given."""
    from mgg_fast.evaluation.bundled.config import BenchmarkConfig

    given = {
        "archs": tuple(args.archs) if args.archs else None,
        "corruptions": tuple(args.corruptions) if args.corruptions else None,
        "n_test": args.n_test,
        "batch_size": args.batch_size,
        "source_epochs": args.source_epochs,
        "n_train": args.source_images,
    }
    return BenchmarkConfig.regime(
        args.regime,
        **{k: v for k, v in given.items() if v is not None},
        seed=args.seed,
        device=str(device),
        mgg_memory=args.mgg_memory,
    )


def report(results: dict[str, Any], out: Path) -> None:
    from mgg_fast.evaluation.bundled.report import format_text, write_reports
    from mgg_fast.tta.data_parallel import is_rank_zero

    say(format_text(results))
    if not is_rank_zero():  # under torchrun rank 0 writes the reports
        return
    paths = write_reports(results, out)
    say("")
    say(f"Results: {', '.join(map(str, paths.values()))}")


def source_model(arch: str, args: argparse.Namespace, device: torch.device) -> Any:
    from mgg_fast.evaluation.bundled.source_models import source_model as trained

    return trained(
        arch,
        epochs=args.source_epochs,
        n_train=args.source_images,
        seed=args.seed,
        cache_dir=args.cache_dir,
        device=device,
        progress=show_progress(args),
    )


def image_folder(path: str) -> Any:
    from mgg_fast.evaluation.bundled.data import load_image_folder

    data = load_image_folder(path, warn=lambda message: print(message, file=sys.stderr, flush=True))
    if data.skipped:
        print(f"warning: {data.skipped} unreadable image(s) skipped", file=sys.stderr, flush=True)
    return data
