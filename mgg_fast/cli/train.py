"""``train``: meta-train an MGG on bundled validation corruptions or a folder, or (``--model``)
for your timm model on your images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mgg_fast.cli.common import (
    BUNDLED,
    BenchmarkConfig,
    bundled_group,
    cache_options,
    check_meta_batches,
    check_output_file,
    common_options,
    list_of,
    meta_train_and_save,
    positive_float,
    positive_int,
    rank_parts,
    resolve_device,
    say,
    source_options,
    user_model_options,
)


def add_parser(sub: Any, fmt: dict[str, Any]) -> None:
    """The ``train`` subcommand's options: the shared ones, then a section for --model and one for
    the bundled models."""
    p = sub.add_parser(
        "train",
        **fmt,
        description="Meta-train an MGG (unlabeled images) on a bundled source model, or with --model on a "
        "timm model and your images, and save it. Each epoch needs 2 batches or more (the MGG learns "
        "nothing from an epoch's first batch); the meta-loss of the first and the last epoch is reported.",
    )
    p.add_argument(
        "--data",
        default=BUNDLED,
        help="'bundled' (MNIST under the 4 validation corruptions) or a folder of png/jpg images; with "
        "--model: ROOT of your images (imagenet-c or imagefolder layout)",
    )
    p.add_argument("--output", type=Path, default=Path("mgg.pt"), help="where to save the MGG")
    p.add_argument(
        "--images",
        "--n-images",
        dest="n_images",
        type=positive_int,
        default=BenchmarkConfig.n_meta,
        help="at most this many images (with --model: round-robin over the corruptions)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=BenchmarkConfig.batch_size, help="meta-training batch size"
    )
    p.add_argument(
        "--epochs", type=positive_int, default=BenchmarkConfig.meta_epochs, help="most passes over the images"
    )
    p.add_argument(
        "--patience",
        type=positive_int,
        default=BenchmarkConfig.meta_patience,
        help="stop after this many epochs without a 0.1%% better meta-loss",
    )
    p.add_argument("--adapt-lr", type=positive_float, default=1e-3, help="step size of the adaptation")
    p.add_argument(
        "--mgg-lr", type=positive_float, default=BenchmarkConfig.mgg_lr, help="Adam lr of the MGG itself"
    )
    source_options(p)
    own = user_model_options(p)
    own.add_argument("--corruptions", type=list_of(str), default=None, help="corruption folders; unset: all")
    bundled = bundled_group(p)
    bundled.add_argument("--arch", default="vit", help="source model: vit or resnet")
    cache_options(p, bundled)
    common_options(
        p,
        seed="seed of the images chosen and their order, the MGG's initialisation and the bundled "
        "source model's training",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Meta-train an MGG and save it."""
    check_output_file(args.output)
    if args.model is not None:
        from mgg_fast.cli.own_model import cmd_train_model

        cmd_train_model(args)
        return
    import torch

    from mgg_fast.cli.bundled import image_folder, source_model
    from mgg_fast.evaluation.bundled.benchmark import BenchmarkConfig, clean_source_stats, meta_batches
    from mgg_fast.evaluation.bundled.data import resolve_cache_dir, to_tensor
    from mgg_fast.tta.data_parallel import init_from_torchrun, rank_zero_first

    device = resolve_device(args.device)
    data_parallel = init_from_torchrun(device)
    cache = resolve_cache_dir(args.cache_dir)
    loss = args.loss or "foa"
    if args.data == BUNDLED:
        cfg = BenchmarkConfig(
            n_meta=args.n_images, batch_size=args.batch_size, seed=args.seed, device=str(device)
        )
        batches = meta_batches(cfg, cache, device)
        what = f"{sum(len(b) for b in batches)} bundled validation-corruption images"
    else:
        data = image_folder(args.data)
        images = data.images[: args.n_images]
        x = to_tensor(images).to(device)
        batches = list(x.split(args.batch_size))
        what = f"{len(images)} images from {args.data}"
    check_meta_batches(loss, batches, args.batch_size)
    if data_parallel:  # each process meta-trains on its part of every batch
        batches = rank_parts(batches)
    torch.manual_seed(args.seed)
    with rank_zero_first(data_parallel):  # rank 0 trains and caches the source model
        src = source_model(args.arch, args, device)
    stats = clean_source_stats(src.model) if loss == "foa" else None
    say(
        f"meta-training an MGG on {what} ({args.arch} source model, {args.epochs} epochs, "
        f"adapt lr {args.adapt_lr})"
    )
    meta_train_and_save(src.model, batches, loss, stats, args, data_parallel=data_parallel)
