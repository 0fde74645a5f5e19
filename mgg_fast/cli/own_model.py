"""The ``--model`` commands: ``adapt``, ``train`` and ``stats`` for a timm model on your folders.

Parsed by :mod:`mgg_fast.cli` (which owns the options and the one-line error handling); the
pieces live in :mod:`mgg_fast.evaluation.models` (model, weights, preprocessing),
:mod:`mgg_fast.evaluation.images` (layouts, labels, loaders) and
:mod:`mgg_fast.evaluation.folders` (the run and its reports). Everything the user gave is
checked before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from mgg_fast.cli.common import (
    BUNDLED,
    DEFAULT_METHODS,
    CLIError,
    check_meta_batches,
    check_output_file,
    check_output_folder,
    load_mgg,
    meta_train_and_save,
    rank_parts,
    resolve_device,
    say,
    show_progress,
)
from mgg_fast.tta.data_parallel import (
    broadcast_from_rank_zero,
    init_from_torchrun,
    is_rank_zero,
    rank_zero_first,
)


def _warn(message: str) -> None:
    """A warning on stderr (under torchrun from rank 0 only: every rank sees the same data)."""
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)


def _user_model(
    args: argparse.Namespace, device: torch.device, data_parallel: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """``(model on device, its transform, its data config)`` from the --model options; under
    torchrun rank 0 builds it first (downloads --pretrained weights once) and every rank gets
    rank 0's weights (timm's random ones too)."""
    from mgg_fast.evaluation.models import create_model, preprocessing

    if args.checkpoint is None and not args.pretrained:
        _warn(f"warning: neither --checkpoint nor --pretrained: {args.model} keeps timm's random weights")
    with rank_zero_first(data_parallel):
        model = create_model(
            args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, model_args=args.model_args
        )
    model = model.to(device)
    if data_parallel:
        broadcast_from_rank_zero([*model.parameters(), *model.buffers()])
    transform, config = preprocessing(model, args.input_size)
    return model, transform, config


def _probe(model: Any, stream: Any, transform: Any, device: torch.device) -> None:
    """One forward on the first readable images of ``stream``, before anything is written."""
    from mgg_fast.evaluation.images import ImageFiles
    from mgg_fast.evaluation.models import probe

    items = ImageFiles(stream, transform)
    images = [x for x, *_ in (items[i] for i in range(min(len(stream), 8))) if x is not None][:2]
    if images:
        probe(model, torch.stack(images).to(device), "--input-size and --model-args")


def _user_streams(
    args: argparse.Namespace, root_text: str, num_labels: int | None, flag: str = "--data"
) -> tuple[Any, str, list[Any]]:
    """``(root, layout, streams)`` of a data folder given by ``flag``; ``num_labels=None``: its
    images are unlabeled (source statistics, meta-training)."""
    from mgg_fast.evaluation.images import check_root, detect_layout, find_streams

    if root_text == BUNDLED:
        raise CLIError(
            f"--model needs {flag} ROOT, a folder of your images (the bundled data fits only the demo)"
        )
    root = check_root(root_text, flag)
    layout = (args.layout if flag == "--data" else None) or detect_layout(root)
    corruptions = getattr(args, "corruptions", None) if flag == "--data" else None
    streams = find_streams(
        root,
        layout,
        corruptions=corruptions,
        severity=args.severity,
        num_labels=num_labels,
        labeled=num_labels is not None,
    )
    return root, layout, streams


def _images_of(
    stream: Any, transform: Any, args: argparse.Namespace, device: torch.device
) -> list[torch.Tensor]:
    """The decodable images of ``stream`` as batches on ``device`` (unreadable ones skipped, warned)."""
    from mgg_fast.evaluation.images import Skipped, make_loader

    loader = make_loader(
        stream, transform, batch_size=args.batch_size, workers=args.workers, device=device, seed=args.seed
    )
    skipped, batches = Skipped(), []
    for batch in loader:
        skipped.add(stream, batch, _warn)
        if batch.x is not None:
            batches.append(batch.x.to(device))
    if skipped.count:
        _warn(f"warning: {skipped.count} unreadable image(s) skipped")
    if not batches:
        raise CLIError(f"none of the {len(stream)} images could be read")
    return batches


def _stats_from(
    args: argparse.Namespace, streams: list[Any], n: int, model: Any, transform: Any, device: torch.device
) -> tuple[Any, int]:
    """FOA source statistics of ``model`` over at most ``n`` images of the streams; and the image count."""
    from mgg_fast.evaluation.images import interleave
    from mgg_fast.tta.source_stats import fit_source_stats

    batches = _images_of(interleave(streams, n, args.seed), transform, args, device)
    return fit_source_stats(model, batches), sum(len(b) for b in batches)


def _user_loss(args: argparse.Namespace, model: Any, transform: Any, device: torch.device) -> tuple[str, Any]:
    """``(loss, source statistics or None)`` from --loss, --source-stats and --source-data."""
    from mgg_fast.tta.losses import SourceStats

    stats = None
    if args.source_stats is not None:
        stats = SourceStats.load(args.source_stats, model)
    elif args.source_data is not None:
        n = args.source_images or 512
        streams = _user_streams(args, args.source_data, None, "--source-data")[2]
        stats, used = _stats_from(args, streams, n, model, transform, device)
        say(f"source statistics from {used} images of {args.source_data}")
    loss = args.loss or ("foa" if stats is not None else "entropy")
    if loss == "foa" and stats is None:
        raise CLIError("--loss foa needs --source-stats FILE or --source-data ROOT (or use --loss entropy)")
    if args.loss is None and stats is None:
        say("no --source-stats or --source-data: adapting with the entropy loss")
    return loss, stats


def _absolute(path: Any) -> str | None:
    return None if path is None else str(Path(path).expanduser().absolute())


def cmd_adapt_model(args: argparse.Namespace) -> None:
    """Adapt a timm model on your folders: every --method on every stream, resumable, with reports."""
    from mgg_fast.evaluation.folders import (
        METHODS,
        RunSettings,
        RunSetup,
        format_text,
        run_all,
        write_reports,
    )
    from mgg_fast.evaluation.images import read_class_mask, subsample
    from mgg_fast.evaluation.models import num_outputs
    from mgg_fast.tta.registry import method as registered

    check_output_folder(args.out)
    methods = args.method or [*DEFAULT_METHODS, *(["mgg"] if args.mgg is not None else [])]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    adapting = [m for m in methods if m != "noadapt"]
    if args.lr is not None and len(args.lr) not in (1, len(adapting)):
        raise CLIError(
            f"--lr takes one value or one per adapting method ({len(adapting)}: {','.join(adapting)}), "
            f"got {len(args.lr)}"
        )
    if "mgg" in methods and args.mgg is None:
        raise CLIError(
            "--method mgg needs --mgg FILE (from the train command with --model, or the published one)"
        )
    device = resolve_device(args.device)
    data_parallel = init_from_torchrun(device)  # each process adapts on its part of every batch
    mgg = load_mgg(args.mgg, device) if "mgg" in methods else None
    model, transform, data_config = _user_model(args, device, data_parallel)
    mask = read_class_mask(args.class_mask, num_outputs(model)) if args.class_mask is not None else None
    root, layout, streams = _user_streams(args, args.data, len(mask) if mask else num_outputs(model))
    streams = [subsample(s, args.images, args.seed) for s in streams]
    _probe(model, streams[0], transform, device)
    loss, stats = _user_loss(args, model, transform, device)
    given = args.lr or [None]
    lrs = {m: given[i if len(given) > 1 else 0] or registered(m).default_lr for i, m in enumerate(adapting)}
    settings = RunSettings(
        methods=methods,
        lrs=lrs,
        loss=loss,
        batch_size=args.batch_size,
        episodic=args.episodic,
        class_mask=mask,
        seed=args.seed,
        mgg_memory=args.mgg_memory,
        workers=args.workers,
    )
    described = {
        "model": args.model,
        "checkpoint": _absolute(args.checkpoint),
        "pretrained": args.pretrained,
        "model_args": args.model_args,
        "input_size": list(data_config["input_size"]),
        "data": _absolute(root),
        "layout": layout,
        "severity": args.severity,
        "images": args.images,
        "mgg": _absolute(args.mgg) if mgg is not None else None,
        "source_stats": _absolute(args.source_stats),
        "source_data": _absolute(args.source_data),
    }
    setup = RunSetup(
        model=model,
        transform=transform,
        streams=streams,
        settings=settings,
        mgg=mgg,
        stats=stats,
        device=device,
        described=described,
        data_parallel=data_parallel,
    )
    labeled = "labeled" if all(s.labeled for s in streams) else "unlabeled"
    say(
        f"adapting {args.model} on {device}: {len(streams)} stream(s) of {root} ({layout}, {labeled}), "
        f"methods {', '.join(methods)}, loss {loss}"
    )
    results = run_all(setup, args.out, resume=args.resume, progress=show_progress(args), log=say, warn=_warn)
    say(format_text(results))
    if is_rank_zero():  # under torchrun rank 0 writes the reports
        paths, note = write_reports(results, args.out)
        say(f"Results: {', '.join(str(p) for p in paths)}" + (f"; {note}" if note else ""))


def cmd_train_model(args: argparse.Namespace) -> None:
    """Meta-train an MGG for a timm model on images of your folders and save it."""
    from mgg_fast.evaluation.images import interleave

    device = resolve_device(args.device)
    data_parallel = init_from_torchrun(device)  # each process meta-trains on its part of every batch
    model, transform, _ = _user_model(args, device, data_parallel)
    root, layout, streams = _user_streams(args, args.data, None)
    _probe(model, streams[0], transform, device)
    loss, stats = _user_loss(args, model, transform, device)
    batches = _images_of(interleave(streams, args.n_images, args.seed), transform, args, device)
    check_meta_batches(loss, batches, args.batch_size)
    if data_parallel:
        batches = rank_parts(batches)
    say(
        f"meta-training an MGG for {args.model} on {sum(len(b) for b in batches)} images of {root} "
        f"({layout}: {', '.join(s.name for s in streams)}), {args.epochs} epochs, adapt lr {args.adapt_lr}, "
        f"loss {loss}"
    )
    meta_train_and_save(model, batches, loss, stats, args, data_parallel=data_parallel)


def cmd_stats(args: argparse.Namespace) -> None:
    """FOA source statistics of a timm model over clean images, saved with ``SourceStats.save``."""
    check_output_file(args.output)
    device = resolve_device(args.device)
    model, transform, _ = _user_model(args, device, data_parallel=False)
    streams = _user_streams(args, args.data, None)[2]
    _probe(model, streams[0], transform, device)
    stats, used = _stats_from(args, streams, args.images, model, transform, device)
    stats.save(args.output)
    say(
        f"saved source statistics of {used} images ({len(stats.layers)} {stats.mode} layers, "
        f"{stats.mean.numel()} features) to {args.output}"
    )
