"""``demo``: the distribution-shift benchmark on bundled data (corrupted MNIST), the main job."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mgg_fast.cli.bundled import benchmark_config, report
from mgg_fast.cli.common import (
    benchmark_options,
    cache_options,
    check_output_folder,
    common_options,
    list_of,
    positive_float,
    positive_int,
    resolve_device,
    say,
)
from mgg_fast.evaluation.bundled.config import DEFAULT_GRID, METHODS, RECIPES


def method_lrs(text: str) -> tuple[str, tuple[float, ...]]:
    """``METHOD=LR,LR,...`` → ``(method, lrs)``: a tuned method (the MGG's memoryless row follows
    ``mgg``) and positive learning rates."""
    method, sep, lrs = text.partition("=")
    tuned = [m for m in DEFAULT_GRID if m != "bn-stats"]
    if not sep or method.strip() not in tuned:
        raise argparse.ArgumentTypeError(
            f"expected METHOD=LR,LR,... with METHOD one of {', '.join(tuned)}, got {text!r}"
        )
    return method.strip(), tuple(list_of(positive_float)(lrs))


def add_parser(sub: Any, fmt: dict[str, Any]) -> None:
    """The ``demo`` subcommand's options."""
    p = sub.add_parser(
        "demo",
        **fmt,
        help="benchmark NoAdapt/Tent/Adam/MGG on corrupted MNIST (bundled data)",
        description="Distribution-shift benchmark on bundled data: source models trained on clean MNIST, "
        "evaluated on 15 ImageNet-C corruptions (severity 5); the MGG is meta-trained on the 4 "
        "validation corruptions. Data and source models are cached; reports go to --out.",
    )
    benchmark_options(p)
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="seeds --seed, --seed+1, ... (mean ± 95%% CI over them)",
    )
    p.add_argument(
        "--recipes",
        type=list_of(str),
        default=["demo"],
        help=f"MGG meta-training recipes side by side: {', '.join(RECIPES)}",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the source models and meta-train the MGGs (cached) instead of the shipped ones",
    )
    p.add_argument(
        "--losses",
        type=list_of(str),
        default=["foa"],
        help="losses of the shared-loss methods (Tent, Adam, sign momentum, MGG): foa, entropy; the first is "
        "the main one, each other adds rows",
    )
    p.add_argument(
        "--methods",
        type=list_of(str),
        default=None,
        help="methods and reference rows, or 'all' (unset: the demo's: noadapt,tent,adam,signum,mgg,"
        "mgg-memoryless,supervised)",
    )
    p.add_argument(
        "--lrs",
        type=method_lrs,
        action="append",
        default=[],
        metavar="METHOD=LR,LR,...",
        help="the learning rates tuned for METHOD instead of its grid (repeatable; the MGG rows: one "
        "meta-trained MGG per lr), e.g. mgg=2e-4,1e-3 to fit a smaller budget (grids: "
        + "; ".join(f"{m} {','.join(f'{lr:g}' for lr in DEFAULT_GRID[m])}" for m in ("tent", "adam", "mgg"))
        + ")",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "reference", "cpu", "triton"),
        default="auto",
        help="the MGG optimizer's step (auto: the fused step of the device, Triton on CUDA and the "
        "compiled one on the CPU, else the reference)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="evaluation dtype (unset: the regime's; float64 gives the same numbers on any x86-64 CPU)",
    )
    cache_options(p)
    common_options(p, threads=1)
    p.set_defaults(run=run, pin_numerics=True)


def run(args: argparse.Namespace) -> None:
    """The benchmark at demo size, with timing of the whole run."""
    from mgg_fast.evaluation.bundled.benchmark import run_benchmark
    from mgg_fast.evaluation.bundled.data import resolve_cache_dir

    check_output_folder(args.out)
    device = resolve_device(args.device)
    cfg = benchmark_config(args, device)
    cfg.n_seeds, cfg.recipes, cfg.threads = args.seeds, tuple(args.recipes), args.threads
    cfg.loss, cfg.extra_losses = args.losses[0], tuple(args.losses[1:])
    cfg.use_bundled = not args.retrain
    if args.dtype is not None:
        cfg.dtype = args.dtype
    cfg.backend = args.backend
    for method, lrs in args.lrs:
        cfg.lr_grid[method] = lrs
    if args.methods:
        cfg.methods = METHODS if args.methods == ["all"] else tuple(args.methods)
    cfg.validate()
    cache = resolve_cache_dir(args.cache_dir)
    say(
        f"mgg_fast demo on {device}: regime {args.regime}, archs {', '.join(cfg.archs)}, "
        f"{cfg.n_seeds} seed(s); cache {cache}"
    )
    start = time.perf_counter()
    results = run_benchmark(cfg, cache_dir=cache, progress=not args.no_progress, log=say)
    report(results, args.out)
    say(f"Total time {time.perf_counter() - start:.0f} s (data and source models cached in {cache})")
