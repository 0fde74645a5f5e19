"""``adapt``: evaluate a saved MGG against the baselines on the bundled benchmark or a folder, or
(``--model``) adapt your timm model on your folders."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgg_fast.cli.common import (
    BUNDLED,
    DEFAULT_METHODS,
    CLIError,
    benchmark_options,
    bundled_group,
    cache_options,
    check_output_folder,
    common_options,
    list_of,
    load_mgg,
    positive_float,
    positive_int,
    resolve_device,
    say,
    show_progress,
    source_options,
    user_model_options,
)

if TYPE_CHECKING:
    import torch

OWN_MODEL_BATCH = 64  # --batch-size of adapt --model when unset (the published ImageNet-C batch)


def add_parser(sub: Any, fmt: dict[str, Any]) -> None:
    """The ``adapt`` subcommand's options: the shared ones, then a section for --model and one
    for the bundled models."""
    p = sub.add_parser(
        "adapt",
        **fmt,
        description="Evaluate a saved MGG against the baselines: on the bundled benchmark (learning rates "
        "tuned on the validation corruptions, as in the demo) or on a folder of images with the "
        "given learning rates (accuracy if the folder has class subfolders named 0..9). With --model: "
        "adapt a timm model on your ImageNet-C or ImageFolder tree, one resumable result per stream.",
    )
    p.add_argument(
        "--mgg",
        type=Path,
        default=None,
        help="an MGG saved by 'train' (MGG.save) or the published checkpoint",
    )
    p.add_argument(
        "--data", default=BUNDLED, help="'bundled', a folder of png/jpg images, or with --model: ROOT"
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        nargs="+",
        metavar="LR",
        default=None,
        help="bundled models on a folder: TENT ADAM MGG (default: the middle of each tuning grid); with "
        "--model: one for all methods or one per --method (default: 1e-3, the published adapt_lr)",
    )
    source_options(p)
    own = user_model_options(p)
    own.add_argument(
        "--method",
        type=list_of(str),
        default=None,
        help=f"methods among noadapt,tent,adam,mgg (default: {','.join(DEFAULT_METHODS)}, and mgg when "
        "--mgg is given)",
    )
    own.add_argument("--episodic", action="store_true", help="reset before every batch")
    own.add_argument("--class-mask", type=Path, default=None, help="text file of the class indices to keep")
    own.add_argument("--images", type=positive_int, default=None, help="at most this many images per stream")
    own.add_argument(
        "--resume", action="store_true", help="continue the run in --out, skipping finished streams"
    )
    bundled = bundled_group(p)
    benchmark_options(p, bundled)
    cache_options(p, bundled)
    common_options(
        p,
        seed="seed of the batch order and of the --images choice (--model); of the corruptions and the "
        "source models' training (bundled models)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate a saved MGG against the baselines (bundled), or adapt your own model (``--model``)."""
    if args.model is not None:
        from mgg_fast.cli.own_model import cmd_adapt_model

        args.batch_size = args.batch_size or OWN_MODEL_BATCH
        cmd_adapt_model(args)
        return
    from mgg_fast.cli.bundled import benchmark_config, report
    from mgg_fast.tta.data_parallel import init_from_torchrun

    if args.mgg is None:
        raise CLIError("the bundled models need --mgg FILE (an MGG from the train command); or give --model")
    if args.lr is not None and len(args.lr) != 3:
        raise CLIError(f"--lr for the bundled models takes 3 values (TENT ADAM MGG), got {len(args.lr)}")
    device = resolve_device(args.device)
    data_parallel = init_from_torchrun(device)  # each process adapts on its part of every batch
    mgg = load_mgg(args.mgg, device)
    if args.data == BUNDLED:
        from mgg_fast.evaluation.bundled.benchmark import run_benchmark

        check_output_folder(args.out)
        cfg = benchmark_config(args, device)
        results = run_benchmark(
            cfg,
            cache_dir=args.cache_dir,
            mgg=mgg,
            progress=show_progress(args),
            log=say,
            data_parallel=data_parallel,
        )
        report(results, args.out)
        return
    _adapt_folder(args, device, mgg, data_parallel)


def _adapt_folder(args: argparse.Namespace, device: torch.device, mgg: Any, data_parallel: bool) -> None:
    """Every benchmark method on one folder of images with the bundled models, at the given (or
    the grids' middle) learning rates: accuracy (labeled folders), mean confidence, time."""
    import torch

    from mgg_fast.cli.bundled import image_folder, source_model
    from mgg_fast.evaluation.bundled.benchmark import clean_source_stats
    from mgg_fast.evaluation.bundled.config import ARCHS, NORMALISED_GRID, SGD_GRID
    from mgg_fast.evaluation.bundled.data import to_tensor
    from mgg_fast.evaluation.protocol import Runner
    from mgg_fast.evaluation.streams import make_batches
    from mgg_fast.tta.data_parallel import rank_zero_first
    from mgg_fast.tta.registry import MethodOptions, label, memory_dtype

    data = image_folder(args.data)
    middle = [g[len(g) // 2] for g in (SGD_GRID, NORMALISED_GRID, NORMALISED_GRID)]
    lrs = dict(zip(("tent", "adam", "mgg"), args.lr or middle, strict=True))
    batches = make_batches(data, args.batch_size or OWN_MODEL_BATCH, device, to_tensor)
    if min(len(x) for x, _ in batches) < 2:
        raise CLIError(
            "the foa loss needs batches of at least 2 images: give more images or a smaller --batch-size"
        )
    for arch in args.archs or ARCHS:
        torch.manual_seed(args.seed)
        with rank_zero_first(data_parallel):  # rank 0 trains and caches the source model
            src = source_model(arch, args, device)
        options = MethodOptions(
            mgg=mgg,
            source_stats=clean_source_stats(src.model),
            memory_W_dtype=memory_dtype(args.mgg_memory),
            data_parallel=data_parallel,
        )
        say(f"{arch} on {len(data)} images from {args.data} ({'labeled' if data.labeled else 'unlabeled'})")
        for method in ("noadapt", "tent", "adam", "sar", "eata", "mgg"):
            runner = Runner(src.model, method, lr=lrs.get(method), options=options)
            correct, confidence = 0, 0.0
            for x, y in batches:
                probs = runner(x).softmax(1).cpu()
                confidence += float(probs.max(1).values.sum())
                correct += int((probs.argmax(1) == y).sum())
            acc = f"accuracy {100 * correct / len(data):5.1f}%  " if data.labeled else ""
            say(
                f"  {label(method):<11} lr {lrs.get(method, 0):<8g} {acc}mean confidence "
                f"{confidence / len(data):.3f}  {1e3 * runner.seconds / runner.batches:.1f} ms/batch"
            )
